"""pagedllm serve's supervisor on the CPU: it spots a dead Python stub among tritonserver's children, also when
tritonserver aborts because of it, and leaves alone a stub that tritonserver reaps (its model unloaded)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from pagedllm import supervisor
from pagedllm.supervisor import ExitWatch, dead_stub, python_stubs


@pytest.fixture
def stub_binary(tmp_path):
    stub = tmp_path / "triton_python_backend_stub"
    shutil.copy(shutil.which("sleep"), stub)
    return stub


def test_a_dead_stub_is_a_zombie_child_named_like_the_stub(tmp_path, stub_binary):
    other = tmp_path / "something_else"
    shutil.copy(shutil.which("true"), other)
    zombie_stub, zombie_other = subprocess.Popen([stub_binary, "0"]), subprocess.Popen([other])
    time.sleep(0.5)  # both have exited; neither is reaped yet
    try:
        assert dead_stub(os.getpid()) == zombie_stub.pid
    finally:
        zombie_stub.wait(), zombie_other.wait()
    assert dead_stub(os.getpid()) is None


# Stand-ins for tritonserver: each starts one stub, then does what its name says once the stub exits.
KEEPS_THE_ZOMBIE = "time.sleep(60)"
ABORTS = "select.select([os.pidfd_open(stub.pid)], [], []); os.abort()"
REAPS = "stub.wait(); time.sleep(60)"
REAPS_THEN_ABORTS = "stub.wait(); time.sleep(1); os.abort()"  # what a loaded tritonserver did, 1 run in 4


def fake_server(stub_binary, then: str, stub_seconds: str = "60") -> subprocess.Popen:
    start = f"stub = subprocess.Popen([{str(stub_binary)!r}, {stub_seconds!r}])"
    code = f"import os, select, subprocess, time; {start}; {then}"
    return subprocess.Popen([sys.executable, "-c", code])


def watching(server: subprocess.Popen) -> tuple[ExitWatch, int]:
    deadline = time.monotonic() + 10
    while not (stubs := python_stubs(server.pid)) and time.monotonic() < deadline:
        time.sleep(0.02)
    watch = ExitWatch(server.pid)
    watch.add_stubs()
    assert len(watch.fds) == 2
    return watch, next(iter(stubs))


@pytest.mark.parametrize("then", [KEEPS_THE_ZOMBIE, ABORTS], ids=["zombie", "server-aborts"])
def test_a_killed_stub_is_named_also_when_the_server_aborts_right_after(stub_binary, then):
    server = fake_server(stub_binary, then)
    watch, stub = watching(server)
    try:
        os.kill(stub, signal.SIGKILL)
        assert watch.wait(5) == stub
    finally:
        watch.close()
        server.kill(), server.wait()
    if then == ABORTS:
        assert server.returncode == -signal.SIGABRT


def test_a_stub_its_server_reaps_is_not_a_death(stub_binary):
    server = fake_server(stub_binary, REAPS, stub_seconds="0.3")
    watch, _ = watching(server)
    try:
        assert watch.wait(5) is None
        assert watch.fds.keys() == {server.pid}
    finally:
        watch.close()
        server.kill(), server.wait()


def test_a_killed_server_is_not_a_stub_death(stub_binary):
    server = fake_server(stub_binary, KEEPS_THE_ZOMBIE)
    watch, stub = watching(server)
    try:
        server.kill()
        assert watch.wait(5) is None
    finally:
        watch.close()
        server.wait()
        os.kill(stub, signal.SIGKILL)


def test_a_server_that_reaps_its_killed_stub_and_aborts_later_died_of_the_stub(stub_binary):
    server = fake_server(stub_binary, REAPS_THEN_ABORTS)
    watch, stub = watching(server)
    try:
        os.kill(stub, signal.SIGKILL)
        assert watch.wait(5) is None  # reaped, and the server still up after the unload grace
        assert watch.wait(5) == stub  # its abort, a second later, is the stub's doing
    finally:
        watch.close()
        server.kill(), server.wait()
    assert server.returncode == -signal.SIGABRT


def test_a_server_that_dies_long_after_an_unload_died_alone(stub_binary, monkeypatch):
    monkeypatch.setattr(supervisor, "STUB_CAUSED_EXIT_SECONDS", 0.5)
    server = fake_server(stub_binary, REAPS_THEN_ABORTS, stub_seconds="0.1")
    watch, _ = watching(server)
    try:
        assert watch.wait(5) is None
        assert watch.wait(5) is None
    finally:
        watch.close()
        server.kill(), server.wait()
