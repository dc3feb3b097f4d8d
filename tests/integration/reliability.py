"""Figures the hardening tests measure, gathered into docs/RELIABILITY.md at the end of the session."""
from __future__ import annotations

import datetime
import os
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "RELIABILITY.md"
ORDER = ["bad input", "fuzz", "overload", "cancellation storm", "faults", "shutdown", "security"]


class Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []

    def add(self, area: str, what: str, figure: object) -> None:
        self.rows.append((area, what, str(figure)))

    def write(self) -> None:
        if not self.rows:
            return
        rows = sorted(self.rows, key=lambda r: ORDER.index(r[0]) if r[0] in ORDER else len(ORDER))
        table = "".join(f"| {a} | {w} | {f} |\n" for a, w, f in rows)
        DOC.parent.mkdir(exist_ok=True)
        DOC.write_text(
            "# Reliability\n\nWritten by `tests/integration/test_reliability.py` (run by `make test`) against real "
            "tritonserver processes; each figure is what the last run measured, every row an assertion that passed "
            f"or a figure it recorded.\n\n_{datetime.date.today().isoformat()} · {os.cpu_count()} cores_\n\n"
            "| area | what | figure |\n|---|---|---|\n" + table + KNOWN_ISSUES)


KNOWN_ISSUES = """
## Known Triton issue

Triton 2.51 has a bug that can leak a model version when a gRPC stream is cancelled after its final response.
It shows under CPU load. The version never finishes unloading (finalize is never called), and SIGTERM then
waits out the exit timeout and exits 1. `tests/integration/repro_triton_cancel_leak.py` reproduces it,
intermittently, with a minimal decoupled model that contains no pagedllm code. HTTP streams, and gRPC streams
closed without cancelling, are not affected. pagedllm's clients and tests cancel only a request that is left
early. The unload row above asserts that the version is actually unloaded, not merely no longer ready.
"""


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (tritonserver and its Python stubs)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            continue
    return total
