"""Finding and running tritonserver: the NGC container's (on PATH) or the copy in the nvidia-pytriton wheel."""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from pagedllm.cache import build_lock, cache_dir, is_as_built, record_build
from pagedllm.errors import TritonNotFoundError
from pagedllm.parent_death import die_with_parent

logger = logging.getLogger("pagedllm.launcher")
CONTROL_MODES = ("none", "poll", "explicit")
ADMIN_KEY_ENV = "PAGEDLLM_ADMIN_KEY"
ADMIN_HEADER = "admin-key"
GRPC_ADMIN_HEADER = f"triton-grpc-protocol-{ADMIN_HEADER}"  # how Triton names the same key in gRPC metadata



@dataclass
class TritonInstall:
    binary: Path
    backend_dir: Path | None = None  # None: the binary's own default (/opt/tritonserver/backends)
    lib_dirs: list[str] = field(default_factory=list)


def find_tritonserver() -> TritonInstall:
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonInstall(Path(on_path))
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotFoundError("tritonserver is not on PATH and nvidia-pytriton is not installed (run `make setup`)")
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    libs = root.parent.parent / "nvidia_pytriton.libs"
    return TritonInstall(root / "bin" / "tritonserver", _python_backend_dir(root), [str(libs)])


def _python_backend_dir(root: Path) -> Path:
    """A backend directory whose python/ holds the backend and the stub for this interpreter."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    target = cache_dir() / "triton_backends" / version
    python = target / "python"
    python.mkdir(parents=True, exist_ok=True)
    sources = [root / "backends" / "python" / "libtriton_python.so",
               root / "backends" / "python" / "triton_python_backend_utils.py",
               root / "python_backend_stubs" / version / "triton_python_backend_stub"]
    for source in sources:
        link = python / source.name
        if not link.exists():
            link.symlink_to(source)
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Triton's API groups that change the server rather than serve models. They all need the admin key; with none
# set they are closed by a random one that nobody holds (shared memory included: a shared-memory region is a
# way into the Python backend's stub, CVE-2025-23319). Statistics stay open: read-only counts and timings,
# which perf_analyzer reads.
ADMIN_GROUPS = ("model-repository", "shared-memory", "trace", "logging")
LOOPBACK = "127.0.0.1"
READY_POLL_SECONDS = 0.1  # between readiness checks while tritonserver loads: at 0.5, 0.25 s of a 5 s start on average
# tritonserver's arguments carry this; the preloaded shim puts the key from the environment in its place
KEY_PLACEHOLDER = "@PAGEDLLM_ADMIN_KEY@"
SHIM_SOURCE = Path(__file__).parent / "csrc" / "admin_key_shim.c"


@dataclass
class ServerOptions:
    model_repository: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    # None: explicit with an admin key (versions load and unload through the repository API, and an llm model
    # whose engine stays down unloads itself), none without (every model loads at start; the API cannot
    # load). explicit without a key is refused: a load runs the model's code as the server.
    model_control_mode: str | None = None
    repository_poll_secs: int = 2
    exit_timeout_secs: int = 30
    log_verbose: int = 0
    # the address HTTP, gRPC and metrics listen on: loopback unless the operator opens it
    host: str = LOOPBACK
    # every admin group needs the header `admin-key: <admin_key>` (gRPC: GRPC_ADMIN_HEADER) when set
    admin_key: str | None = field(default_factory=lambda: os.environ.get(ADMIN_KEY_ENV) or None, repr=False)
    extra_args: list[str] = field(default_factory=list)

    def control_mode(self) -> str:
        mode = self.model_control_mode or ("explicit" if self.admin_key else "none")
        if mode not in CONTROL_MODES:
            raise ValueError(f"model_control_mode: {mode!r} is not one of {', '.join(CONTROL_MODES)}")
        if mode == "explicit" and not self.admin_key:
            raise ValueError(f"model_control_mode: explicit loads models through the repository API, which runs "
                             f"their code as the server; set {ADMIN_KEY_ENV} to a secret first (or use none / poll)")
        return mode

    @property
    def local_host(self) -> str:
        """Where this machine reaches the server: the bound address, or loopback when bound to all."""
        return LOOPBACK if self.host in ("0.0.0.0", "::", "") else self.host


def server_command(install: TritonInstall, opts: ServerOptions) -> list[str]:
    mode = opts.control_mode()
    cmd = [str(install.binary), f"--model-repository={opts.model_repository}",
           f"--http-address={opts.host}", f"--grpc-address={opts.host}", f"--metrics-address={opts.host}",
           f"--http-port={opts.http_port}", f"--grpc-port={opts.grpc_port}", f"--metrics-port={opts.metrics_port}",
           f"--model-control-mode={mode}", f"--exit-timeout-secs={opts.exit_timeout_secs}",
           f"--log-verbose={opts.log_verbose}", "--allow-gpu-metrics=false",
           "--disable-auto-complete-config"]  # our configs are whole: no stub per model first to complete them
    if install.backend_dir is not None:
        cmd.append(f"--backend-directory={install.backend_dir}")
    if mode == "poll":
        cmd.append(f"--repository-poll-secs={opts.repository_poll_secs}")
    if mode == "explicit":
        cmd.append("--load-model=*")
    restricted = f"{','.join(ADMIN_GROUPS)}:{ADMIN_HEADER}={KEY_PLACEHOLDER}"
    cmd += [f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}"]
    return cmd + opts.extra_args


def admin_key_shim() -> Path | None:
    """The preload library that keeps the admin key out of tritonserver's arguments (which every user of the
    machine can read in /proc), built once per source into the cache; None where it cannot be built."""
    digest = hashlib.sha256(SHIM_SOURCE.read_bytes()).hexdigest()[:16]
    target = cache_dir() / "shims" / f"admin_key_shim-{digest}.so"
    with build_lock(target):
        if target.exists() and is_as_built(target):
            return target
        try:
            subprocess.run([os.environ.get("CC", "cc"), "-shared", "-fPIC", "-O2", "-o", str(target),
                            str(SHIM_SOURCE)], check=True, capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as e:
            logger.warning("cannot build %s (%s): the admin key shows in tritonserver's arguments", SHIM_SOURCE, e)
            return None
        record_build(target)
    return target


def with_admin_key(cmd: list[str], env: dict[str, str], key: str | None) -> tuple[list[str], dict[str, str]]:
    """`key` (a random one nobody holds when None) for the placeholder: through the shim and the environment,
    or in the arguments where the shim cannot be built."""
    key = key or secrets.token_urlsafe(32)
    shim = admin_key_shim()
    if shim is None:
        return [arg.replace(KEY_PLACEHOLDER, key) for arg in cmd], {k: v for k, v in env.items() if k != ADMIN_KEY_ENV}
    preload = " ".join(filter(None, [str(shim), env.get("LD_PRELOAD", "")]))
    return cmd, {**env, ADMIN_KEY_ENV: key, "LD_PRELOAD": preload}


def server_env(install: TritonInstall) -> dict[str, str]:
    """The Python stub finds its interpreter on PATH: this environment's must come first. It also links
    libpython dynamically: this interpreter's own must win over the system's, or the two disagree
    about the standard library's compiled modules (seen: `_ssl ... undefined symbol`)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    own = [libdir] if libdir and any(Path(libdir).glob("libpython*.so*")) else []
    paths = own + install.lib_dirs + [env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(paths).strip(os.pathsep)
    return env


class TritonServer:
    """A tritonserver child process: start, wait until ready, stop (SIGTERM, then SIGKILL)."""

    def __init__(self, opts: ServerOptions, log_path: Path | None = None) -> None:
        self.opts = opts
        self.install = find_tritonserver()
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"{self.opts.local_host}:{self.opts.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.opts.local_host}:{self.opts.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.opts.local_host}:{self.opts.metrics_port}/metrics"

    def start(self) -> TritonServer:
        out = open(self.log_path, "wb") if self.log_path else None
        cmd, env = with_admin_key(server_command(self.install, self.opts), server_env(self.install),
                                  self.opts.admin_key)
        # from the main thread, tritonserver dies with this process however it dies (PR_SET_PDEATHSIG follows the
        # thread that starts it); its stubs follow it (serving/python_backend.py), and their engines them
        follow = die_with_parent if threading.current_thread() is threading.main_thread() else None
        self.process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                        preexec_fn=follow)
        return self

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.process.returncode}{self._log_tail()}")
            if self.is_ready():
                return
            time.sleep(READY_POLL_SECONDS)
        raise TimeoutError(f"tritonserver not ready after {timeout:.0f}s{self._log_tail()}")

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, timeout: float | None = None) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout if timeout is not None else self.opts.exit_timeout_secs + 15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def _log_tail(self) -> str:
        tail = self.log()[-6000:]
        return f"\n--- tritonserver log (tail) ---\n{tail}" if tail else ""

    def start_ready(self, timeout: float = 300.0) -> TritonServer:
        """Start and wait until ready; a server that does not come up is stopped before the error rises."""
        self.start()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> TritonServer:
        return self.start_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()
