"""`pagedllm serve`'s care of its processes: tritonserver, and the OpenAI gateway beside it.

- SIGTERM or Ctrl-C, to serve alone or to its process group, drains. The gateway's streams finish, then
  tritonserver's, and the exit code is 0. A second signal stops everything at once.
- A child that dies by itself stops the rest, and serve exits 1 at once, so its own supervisor restarts
  the whole.
- A model's Python stub that dies is restarted with tritonserver. It shows as a zombie child of
  tritonserver. Triton 2.51 cannot recover such a stub: the streams it held stay open, its version never
  finishes unloading, and shutdown waits out the exit timeout. So tritonserver is killed (every stream ends
  at once with a connection error, which clients retry) and started again. That happens after 1, 2, 4... s,
  and after `max_restarts` within `restart_window` s serve gives up and exits 1. A killed stub that held the
  backend's IPC mutex makes tritonserver abort (boost's lock_exception) within milliseconds, before any poll
  would see the zombie; so serve holds a pidfd of every stub and of tritonserver and wakes on the first exit.
  Under load the abort can come later, after tritonserver reaped the stub: a tritonserver that dies within
  STUB_CAUSED_EXIT_SECONDS of a stub's exit died of it, and is restarted too.

The signal handler only sets a flag. Waiting on a child inside it, while the main thread waits on the same
child, deadlocks on Popen's lock."""
from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from pagedllm.launcher import ADMIN_KEY_ENV, READY_POLL_SECONDS, TritonServer
from pagedllm.restart_policy import RestartPolicy

POLL_SECONDS = 0.25
UNLOAD_GRACE_SECONDS = 0.2  # a stub's exit to tritonserver reaping it, when its model is unloaded
# a tritonserver that dies this soon after one of its stubs exited died of it: under load (the test suite on 2
# cores) its abort came later than UNLOAD_GRACE_SECONDS, after it had reaped the stub, 1 run in 4
STUB_CAUSED_EXIT_SECONDS = 10.0


def python_stubs(parent_pid: int) -> dict[int, str]:
    """The Python-backend stubs among `parent_pid`'s children, with their state ("Z": died, not reaped).
    Their comm is cut to 15 chars."""
    stubs = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            comm, rest = proc.joinpath("stat").read_text().split(") ", 1)
        except (OSError, ValueError):
            continue
        state, ppid = rest.split()[:2]
        if int(ppid) == parent_pid and comm.endswith("triton_python_b"):
            stubs[int(proc.name)] = state
    return stubs


def dead_stubs(parent_pid: int) -> list[int]:
    """The Python-backend stubs of `parent_pid` that died and were not reaped."""
    return [pid for pid, state in python_stubs(parent_pid).items() if state == "Z"]


def dead_stub(parent_pid: int) -> int | None:
    return next(iter(dead_stubs(parent_pid)), None)


class ExitWatch:
    """Wakes the moment tritonserver or one of its Python stubs exits (a pidfd turns readable at exit), so a
    stub's death is seen even when tritonserver aborts because of it a few milliseconds later."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.fds = {server_pid: os.pidfd_open(server_pid)}
        self.last_stub_exit: tuple[int, float] | None = None  # (pid, time.monotonic()) of one not yet blamed

    def add_stubs(self) -> None:
        for pid in python_stubs(self.server_pid):
            if pid not in self.fds:
                try:
                    self.fds[pid] = os.pidfd_open(pid)
                except ProcessLookupError:  # gone already; dead_stub() or the server's exit will tell
                    pass

    def wait(self, timeout: float) -> int | None:
        """A stub that died, after the first exit or `timeout` s. A stub that tritonserver reaps (its model
        unloaded) is not one: it is gone from /proc within the grace, while a dead stub stays a zombie or
        takes tritonserver down with it, at once or up to STUB_CAUSED_EXIT_SECONDS later."""
        exited = self._exited(timeout)
        stubs = [pid for pid in exited if pid != self.server_pid]
        if not stubs:
            return self._stub_behind_server_exit() if exited else None
        server_died = self.server_pid in exited or bool(self._exited(UNLOAD_GRACE_SECONDS, [self.server_pid]))
        zombies = dead_stubs(self.server_pid)
        for pid in stubs:
            os.close(self.fds.pop(pid))
        self.last_stub_exit = (stubs[0], time.monotonic())
        return next((pid for pid in stubs if server_died or pid in zombies), None)

    def _stub_behind_server_exit(self) -> int | None:
        if self.last_stub_exit is None:
            return None
        pid, when = self.last_stub_exit
        return pid if time.monotonic() - when <= STUB_CAUSED_EXIT_SECONDS else None

    def _exited(self, timeout: float, pids: list[int] | None = None) -> list[int]:
        fds = {pid: self.fds[pid] for pid in (pids or self.fds)}
        ready, _, _ = select.select(list(fds.values()), [], [], timeout)
        return [pid for pid, fd in fds.items() if fd in ready]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


class Supervisor:
    def __init__(self, server: TritonServer, gateway_command: list[str] | None = None,
                 restarts: RestartPolicy | None = None) -> None:
        self.server, self.gateway_command = server, gateway_command
        self.gateway: subprocess.Popen | None = None
        self.restarts = restarts or RestartPolicy()
        self.stopping = threading.Event()

    def children(self) -> list[subprocess.Popen]:
        return [p for p in (self.server.process, self.gateway) if p is not None]

    def _on_signal(self, *_: object) -> None:
        if self.stopping.is_set():  # the second signal: at once
            # the stubs first: orphaned by a killed tritonserver, one stayed up (held its engine process and
            # its memory), deaf to SIGTERM; each engine process follows its stub (PR_SET_PDEATHSIG)
            if self.server.process is not None:
                for stub in python_stubs(self.server.process.pid):
                    with contextlib.suppress(OSError):
                        os.kill(stub, signal.SIGKILL)
            for child in self.children():
                child.kill()
            os._exit(1)
        self.stopping.set()

    def run(self, on_ready=None) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        self.server.start()
        if not self._wait_ready():
            return self._stop()
        if on_ready is not None:
            on_ready()
        if self.gateway_command:
            env = {k: v for k, v in os.environ.items() if k != ADMIN_KEY_ENV}  # the gateway has no use for it
            self.gateway = subprocess.Popen(self.gateway_command, env=env)
        watch = ExitWatch(self.server.process.pid)
        try:
            while not self.stopping.is_set():
                watch.add_stubs()
                # the watch first: a tritonserver that died of its stub must not read as one that died alone
                stub = watch.wait(POLL_SECONDS) or dead_stub(self.server.process.pid)
                if stub is None:
                    if any(child.poll() is not None for child in self.children()):
                        break
                    continue
                watch.close()
                if not self._restart_server(stub):
                    return self._stop(gave_up=True)
                if self.stopping.is_set():
                    break
                watch = ExitWatch(self.server.process.pid)
        finally:
            watch.close()
        return self._stop()

    def _wait_ready(self) -> bool:
        while not self.stopping.is_set():
            if self.server.process.poll() is not None:
                return False
            if self.server.is_ready():
                return True
            self.stopping.wait(READY_POLL_SECONDS)
        return False

    def _restart_server(self, stub: int) -> bool:
        delay = self.restarts.on_death(time.monotonic())
        if delay is None:
            _say(f"a Python stub died again ({len(self.restarts.deaths)} times within "
                 f"{self.restarts.restart_window:.0f} s); giving up")
            return False
        _say(f"a model's Python stub (pid {stub}) died; Triton 2.51 cannot recover it: restarting tritonserver "
             f"in {delay:.0f} s")
        self.server.process.kill()
        self.server.process.wait()
        if self.stopping.wait(delay):
            return True
        self.server.start()
        return self._wait_ready() or self.stopping.is_set()

    def _stop(self, gave_up: bool = False) -> int:
        """The gateway first (its streams drain), then tritonserver. 0 when asked to stop and all went well."""
        died = [c for c in self.children() if c.poll() is not None] if not self.stopping.is_set() else []
        for child in died:
            name = "tritonserver" if child is self.server.process else "the gateway"
            _say(f"{name} exited by itself (code {child.returncode}); stopping")
        if self.gateway is not None and self.gateway.poll() is None:
            self.gateway.send_signal(signal.SIGTERM)
            self.gateway.wait()
        code = self.server.stop()
        return 1 if died or gave_up else (code or 0)


def _say(message: str) -> None:
    print(f"pagedllm serve: {message}", file=sys.stderr, flush=True)
