"""CPU time of processes, read from /proc: a served run's cost split by process, per 1,000 tokens."""
from __future__ import annotations

import os
from pathlib import Path

STUB_COMM = "triton_python_b"  # Triton's Python-backend stub, its name cut to 15 characters


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of a live process (0.0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _children() -> dict[int, list[tuple[int, str]]]:
    """Each parent pid's children, as (pid, comm)."""
    children: dict[int, list[tuple[int, str]]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            comm, rest = proc.joinpath("stat").read_text().split(" (", 1)[1].rsplit(") ", 1)
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(int(rest.split()[1]), []).append((int(proc.name), comm))
    return children


def server_processes(server_pid: int) -> dict[str, list[int]]:
    """tritonserver's processes by role: the server itself, its Python stubs, and the stubs' children (the
    engine processes)."""
    children = _children()
    stubs = [pid for pid, comm in children.get(server_pid, []) if comm == STUB_COMM]
    engines = [pid for stub in stubs for pid, _ in children.get(stub, [])]
    return {"engine processes": engines, "Python stubs": stubs, "tritonserver": [server_pid]}


def cpu_by_role(roles: dict[str, list[int]]) -> dict[str, float]:
    return {role: sum(cpu_seconds(pid) for pid in pids) for role, pids in roles.items()}
