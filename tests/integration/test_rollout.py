"""Version rollouts by directory, under traffic: add llm_tiny/2/, new traffic moves to it, pinned clients
keep version 1 (whose engine, killed, comes back without touching version 2), remove the folder and traffic
rolls back; no request fails."""
from __future__ import annotations

import os
import shutil
import signal
import threading
import urllib.error
import urllib.request

import pytest

from pagedllm.serving.repository import write_llm, write_llm_version
from tests.integration.conftest import engine_pid, show_log_on_failure, start_server, stream, tiny_engine, wait_for

pytestmark = pytest.mark.integration


def _ready(server, version: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{server.http_url}/v2/models/llm_tiny/versions/{version}/ready",
                                    timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


class Traffic(threading.Thread):
    """Streams requests back to back until stopped; records each one's version, text and error."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.stopped, self.results = url, threading.Event(), []

    def run(self) -> None:
        while not self.stopped.is_set():
            responses, error = stream(self.url, "llm_tiny", {"text_input": "Hello there", "sampling_parameters": {
                "temperature": 0, "max_tokens": 24, "ignore_eos": True}, "return_finish_reason": True})
            reason = responses[-1].get("finish_reason") if responses else None
            self.results.append((responses[-1]["_version"] if responses else None, error,
                                 reason[0].decode() if reason is not None else None))

    def versions_since(self, start: int) -> set:
        return {v for v, _, _ in self.results[start:]}


def _kill_version_1_engine(server, traffic: Traffic) -> None:
    """Version 1's engine dies while version 2 takes the traffic: version 2 is untouched, version 1 comes
    back by itself."""
    pid = engine_pid(server, "llm_tiny", version=1)
    mark = len(traffic.results)
    os.kill(pid, signal.SIGKILL)
    hi = {"text_input": "Hi", "sampling_parameters": {"max_tokens": 4}}
    assert wait_for(lambda: stream(server.grpc_url, "llm_tiny", hi, version="1")[1] is None, timeout=120)
    assert engine_pid(server, "llm_tiny", version=1) not in (None, pid) and _ready(server, "2")
    assert len(traffic.results) > mark and traffic.versions_since(mark) == {"2"}


def test_rollout_and_rollback_under_traffic(request, tmp_path, tiny_model_dir):
    repo = tmp_path / "repo"
    write_llm(repo, "llm_tiny", tiny_engine(tiny_model_dir("llama-tied")))
    server = start_server(repo, tmp_path / "tritonserver.log", mode="poll")
    traffic = Traffic(server.grpc_url)
    try:
        traffic.start()
        assert wait_for(lambda: len(traffic.results) >= 3)
        write_llm_version(repo / "llm_tiny", 2, tiny_engine(tiny_model_dir("llama-tied")))
        assert wait_for(lambda: _ready(server, "2"), timeout=60)
        mark = len(traffic.results)
        assert wait_for(lambda: "2" in traffic.versions_since(mark) and len(traffic.results) > mark + 3)
        pinned, error = stream(server.grpc_url, "llm_tiny", {"text_input": "Hi", "sampling_parameters": {
            "max_tokens": 4}}, version="1")
        assert error is None and pinned[-1]["_version"] == "1"
        _kill_version_1_engine(server, traffic)
        shutil.rmtree(repo / "llm_tiny" / "2")
        assert wait_for(lambda: not _ready(server, "2"), timeout=60)
        mark = len(traffic.results)
        assert wait_for(lambda: len(traffic.results) > mark + 3)
        assert traffic.versions_since(mark + 1) == {"1"}
    finally:
        traffic.stopped.set()
        traffic.join(timeout=60)
        server.stop()
        show_log_on_failure(request, server)
    errors = [r for r in traffic.results if r[1] is not None or r[2] != "length"]
    assert not errors, errors[:5]
    assert {"1", "2"} <= {v for v, _, _ in traffic.results}
