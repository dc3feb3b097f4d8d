"""A real tritonserver for the integration tests: the project's repository, generated into a temporary
folder, plus a tiny random model served beside it as `llm_tiny`."""
from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import np_to_triton_dtype

from pagedllm.launcher import ServerOptions, TritonServer, free_port
from pagedllm.serving.repository import SERVED_ENGINE, write_baselines, write_llm, write_repository

pytestmark = pytest.mark.integration


SESSION_LLM_MODELS = ("llm", "llm_tiny", "llm_spec")  # the session server's LLM models, as a gateway serves them
SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


TINY_ADAPTERS = {"sql": (8, ["q_proj", "v_proj", "down_proj"]),
                 "poet": (4, ["k_proj", "o_proj", "gate_proj", "up_proj"])}


LATE_ADAPTER = "late"


def write_adapters(version_dir: Path, model_dir: Path) -> None:
    """llm_tiny's adapters (PEFT's files, seeded) and the multi_lora.json that serves them, as Triton's vLLM
    backend reads it; and one more in its lora_dir that none lists, for loading while it runs."""
    from tests.support.lora import make_adapter
    for seed, (name, (rank, targets)) in enumerate({**TINY_ADAPTERS, LATE_ADAPTER: (2, ["v_proj"])}.items()):
        make_adapter(model_dir, version_dir / "adapters" / name, rank, targets, seed=20 + seed)
    (version_dir / "multi_lora.json").write_text(json.dumps({name: f"adapters/{name}" for name in TINY_ADAPTERS}))


def tiny_engine(model_dir: Path) -> dict:
    return {"model": str(model_dir), "dtype": "float32", "block_size": 4, "num_kv_blocks": 128,
            "max_num_seqs": 4, "max_num_batched_tokens": 256, "max_waiting_requests": 4}


TEST_ADMIN_KEY = "integration-tests-admin-key"  # explicit model control needs one


def start_server(repo: Path, log: Path, mode: str = "none") -> TritonServer:
    opts = ServerOptions(repo, free_port(), free_port(), free_port(), mode, repository_poll_secs=1,
                         admin_key=TEST_ADMIN_KEY if mode == "explicit" else None)
    return TritonServer(opts, log).start_ready(400)


@pytest.fixture(scope="session")
def server(request, tmp_path_factory, tiny_model_dir, smollm_dir):
    repo = tmp_path_factory.mktemp("repo")
    write_repository(repo, {**SERVED_ENGINE, "kv_cache_memory": 256 << 20, "max_num_seqs": 32})
    write_llm(repo, "llm_tiny", {**tiny_engine(tiny_model_dir("llama-tied")), "enable_lora": True, "max_loras": 2,
                                 "max_lora_rank": 8, "lora_dir": "adapters"})
    write_adapters(repo / "llm_tiny" / "1", tiny_model_dir("llama-tied"))
    write_llm(repo, "llm_spec", {**tiny_engine(tiny_model_dir("llama-tied", vocab_size=16)), "stream_interval": 3,
                                 "speculative_config": SPEC})
    write_baselines(repo, str(tiny_model_dir("llama-tied")), max_batch_size=4, dtype="float32")  # perf/compare.py's
    log = repo.parent / "tritonserver.log"
    srv = start_server(repo, log)
    yield srv
    srv.stop()
    show_log_on_failure(request, srv)


def show_log_on_failure(request: pytest.FixtureRequest, srv: TritonServer) -> None:
    if request.session.testsfailed:
        sys.__stderr__.write(f"\n--- tritonserver log {srv.log_path} (tail) ---\n{srv.log()[-8000:]}\n")


def grpc_inputs(fields: dict) -> list[grpcclient.InferInput]:
    inputs = []
    for name, value in fields.items():
        if isinstance(value, str):
            arr = np.array([value.encode()], dtype=np.object_)
        elif isinstance(value, bytes):
            arr = np.array([value], dtype=np.object_)
        elif isinstance(value, np.ndarray):
            arr = value
        elif isinstance(value, bool):
            arr = np.array([value])
        elif isinstance(value, dict):
            arr = np.array([json.dumps(value).encode()], dtype=np.object_)
        else:
            raise TypeError(name)
        t = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        t.set_data_from_numpy(arr)
        inputs.append(t)
    return inputs


def stream(url: str, model: str, fields: dict, version: str = "",
           stop_after: int | None = None) -> tuple[list, str | None]:
    """Send one streaming request; returns (responses' outputs as dicts, error message or None)."""
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    out, error, finished = [], None, False
    try:
        client.async_stream_infer(model, grpc_inputs({"stream": True, **fields}), model_version=version,
                                  enable_empty_final_response=True)
        while not finished:
            result, err = results.get(timeout=120)
            if err is not None:
                error, finished = str(err), True
                break
            resp = result.get_response()
            out.append({o.name: result.as_numpy(o.name) for o in resp.outputs} | {"_version": resp.model_version})
            finished = resp.parameters["triton_final_response"].bool_param
            if stop_after and len(out) >= stop_after:
                break
    finally:
        # Cancel only a request left early: cancelling a finished stream can leak the model version on
        # Triton 2.51 (docs/RELIABILITY.md), as the client package avoids too.
        client.stop_stream(cancel_requests=not finished)
        client.close()
    return out, error


def texts(responses: list) -> str:
    return "".join(r["text_output"][0].decode() for r in responses if "text_output" in r)


def num_tokens(responses: list) -> int:
    """Output tokens across a stream's responses (each counts its own, as in Triton's vLLM backend)."""
    return sum(int(r["num_output_tokens"][0]) for r in responses if "num_output_tokens" in r)


def metric(server: TritonServer, name: str, model: str = "llm", version: str = "1", **labels: str) -> float:
    """The sum of `name`'s series for the model's version (and `labels`); NaN where it has none."""
    with urllib.request.urlopen(server.metrics_url, timeout=5) as r:
        body = r.read().decode()
    wanted = {"model": model, "version": version, **labels}
    looks = "".join(f'(?=[^}}]*{key}="{re.escape(value)}")' for key, value in wanted.items())
    found = re.findall(rf'^{re.escape(name)}{{{looks}[^}}]*}} (\S+)$', body, re.M)
    return sum(float(v) for v in found) if found else float("nan")


def answers_200(url: str) -> bool:
    """A readiness probe: the URL answers 200 (anything else, or nothing listening, is not ready)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def engine_pid(server, model: str, version: int = 1) -> int | None:
    """The engine process of `model`'s `version` on this server (other servers in the session have models of
    the same name): the child of its Python stub that multiprocessing spawned, not its resource tracker."""
    procs = [p for p in Path("/proc").iterdir() if p.name.isdigit()]
    stubs = [int(p.name) for p in procs if _ppid(p) == server.process.pid and f"{model}_0_0" in _cmdline(p)
             and any(arg.endswith(f"/{model}/{version}/model.py") for arg in _cmdline(p))]
    engines = [int(p.name) for p in procs if stubs and _ppid(p) == stubs[0] and "spawn_main" in " ".join(_cmdline(p))]
    return engines[0] if engines else None


def descendants(pid: int) -> list[int]:
    """Every process below `pid` now: its Python stubs, their engine processes and resource trackers."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            children.setdefault(_ppid(p), []).append(int(p.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def kill_all(pids: list[int]) -> None:
    """SIGKILL whatever of `pids` is still alive: a SIGKILLed tritonserver leaves its Python stubs and their
    engines running, orphaned (seen: two of them, 0.9 GB, hours after a test run)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def triton_pid(serve: subprocess.Popen) -> int:
    return next(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(p) == serve.pid
                and _cmdline(p)[0].endswith("tritonserver"))


def _cmdline(p: Path) -> list[str]:
    try:
        return p.joinpath("cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _ppid(p: Path) -> int:
    try:
        return int(p.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.2) -> bool:
    """Whether `predicate` comes true within `timeout`; a port that refuses it meanwhile counts as not yet (Triton's
    metrics port once did for a moment after the server was ready), and the last try raises what it raises."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except OSError:
            pass
        time.sleep(interval)
    return predicate()


class GatewayProcess:
    """`pagedllm gateway` as a child process, as an operator runs it; `log()` is its stderr (JSON lines)."""

    def __init__(self, triton_urls: list[str], log: Path, api_keys: Path | None = None, *extra: str,
                 models: tuple[str, ...] = SESSION_LLM_MODELS) -> None:
        self.port, self.log_path = free_port(), log
        command = [sys.executable, "-m", "pagedllm.cli", "gateway", "--port", str(self.port), *extra]
        for model in models:
            command += ["--model", model]
        for url in triton_urls:
            command += ["--triton", url]
        if api_keys is not None:
            command += ["--api-keys", str(api_keys)]
        self.process = subprocess.Popen(command, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60.0) -> GatewayProcess:
        def ready() -> bool:
            assert self.process.poll() is None, f"gateway exited:\n{self.log()}"
            return answers_200(f"{self.url}/ready")
        assert wait_for(ready, timeout), f"gateway not ready:\n{self.log()}"
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.log().splitlines() if line.startswith("{")]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)


@contextlib.contextmanager
def running_serve(tmp_path: Path, tiny_dir: Path, *extra: str,
                  env: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen, list[str]]]:
    """`pagedllm serve` on a tiny `llm` model, in its own process group, once tritonserver is ready;
    `process.log_path` is its output. Whatever is still running of it at the end is killed."""
    repo = tmp_path / "repo"
    if not repo.exists():
        write_llm(repo, "llm", tiny_engine(tiny_dir))
    ports = [str(free_port()) for _ in range(3)]
    log = open(tmp_path / f"serve-{time.monotonic_ns()}.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "pagedllm.cli", "serve", "--model-repository", str(repo),
                                "--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2],
                                *extra], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, **(env or {})})
    process.log_path = Path(log.name)
    try:
        assert wait_for(lambda: answers_200(f"http://localhost:{ports[0]}/v2/health/ready"), 300), log.name
        yield process, ports
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
