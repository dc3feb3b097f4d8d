"""A model's stub ends with its tritonserver, however the server ends (here a stand-in, killed with SIGKILL),
and at once where the server died before the stub started watching it (init adopted the stub)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.processes import alive

# the stand-in server is a Python process: the stub watches for its parent by that name
STUB = ("import os, time; from pagedllm.serving.python_backend import exit_with_server; "
        "exit_with_server({name!r}); time.sleep(60)")


def _exits_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def _server_with_stub(server_name: str) -> tuple[subprocess.Popen, int]:
    stub_code = STUB.format(name=server_name)
    server_code = (f"import subprocess, sys, time; stub = subprocess.Popen([sys.executable, '-c', {stub_code!r}]); "
                   "print(stub.pid, flush=True); time.sleep(60)")
    server = subprocess.Popen([sys.executable, "-c", server_code], stdout=subprocess.PIPE, text=True)
    return server, int(server.stdout.readline())


def test_a_stub_exits_when_its_server_is_killed():
    name = Path(f"/proc/{os.getpid()}/comm").read_text().strip()  # this interpreter's, as the stand-in's
    server, stub = _server_with_stub(name)
    try:
        assert not _exits_within(stub, 1.0)  # up, and watching
        server.kill()
        server.wait()
        assert _exits_within(stub, 10)
    finally:
        server.kill(), server.wait()
        if alive(stub):
            os.kill(stub, signal.SIGKILL)


def test_a_stub_whose_parent_is_not_the_server_exits_at_once():
    server, stub = _server_with_stub("tritonserver")
    try:
        assert _exits_within(stub, 10)
    finally:
        server.kill(), server.wait()
        if alive(stub):
            os.kill(stub, signal.SIGKILL)
