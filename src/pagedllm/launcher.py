"""Finding and running tritonserver: the NGC container's (on PATH) or the copy in the nvidia-pytriton wheel."""
from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from pagedllm.errors import TritonNotFoundError
from pagedllm.weights import cache_dir

CONTROL_MODES = ("none", "poll", "explicit")
ADMIN_KEY_ENV = "PAGEDLLM_ADMIN_KEY"
ADMIN_HEADER = "admin-key"



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


@dataclass
class ServerOptions:
    model_repository: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    # explicit: all models load at start; versions load and unload through the repository API (protected
    # by $PAGEDLLM_ADMIN_KEY when set), and an llm model whose engine stays down unloads itself (not ready).
    model_control_mode: str = "explicit"
    repository_poll_secs: int = 2
    exit_timeout_secs: int = 30
    log_verbose: int = 0
    # Model-repository control (load / unload) needs the header `admin-key: <admin_key>` when set.
    admin_key: str | None = field(default_factory=lambda: os.environ.get(ADMIN_KEY_ENV) or None, repr=False)
    extra_args: list[str] = field(default_factory=list)


def server_command(install: TritonInstall, opts: ServerOptions) -> list[str]:
    if opts.model_control_mode not in CONTROL_MODES:
        raise ValueError(f"model_control_mode: {opts.model_control_mode!r} is not one of {', '.join(CONTROL_MODES)}")
    cmd = [str(install.binary), f"--model-repository={opts.model_repository}",
           f"--http-port={opts.http_port}", f"--grpc-port={opts.grpc_port}", f"--metrics-port={opts.metrics_port}",
           f"--model-control-mode={opts.model_control_mode}", f"--exit-timeout-secs={opts.exit_timeout_secs}",
           f"--log-verbose={opts.log_verbose}", "--allow-gpu-metrics=false"]
    if install.backend_dir is not None:
        cmd.append(f"--backend-directory={install.backend_dir}")
    if opts.model_control_mode == "poll":
        cmd.append(f"--repository-poll-secs={opts.repository_poll_secs}")
    if opts.model_control_mode == "explicit":
        cmd.append("--load-model=*")
    if opts.admin_key:
        restricted = f"model-repository:{ADMIN_HEADER}={opts.admin_key}"
        cmd += [f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}"]
    return cmd + opts.extra_args


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
        return f"localhost:{self.opts.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"localhost:{self.opts.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://localhost:{self.opts.metrics_port}/metrics"

    def start(self) -> TritonServer:
        out = open(self.log_path, "wb") if self.log_path else None
        self.process = subprocess.Popen(server_command(self.install, self.opts), env=server_env(self.install),
                                        stdout=out, stderr=subprocess.STDOUT if out else None)
        return self

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.process.returncode}{self._log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.5)
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
