"""Figures the hardening tests measure, gathered at the end of the session into perf/out/RELIABILITY.md (not
tracked: `make test` leaves the checkout as it was), or into docs/RELIABILITY.md with PAGEDLLM_WRITE_DOCS=1."""
from __future__ import annotations

import datetime
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRACKED = ROOT / "docs" / "RELIABILITY.md"
DOC = TRACKED if os.environ.get("PAGEDLLM_WRITE_DOCS") else ROOT / "perf" / "out" / "RELIABILITY.md"


def _previous() -> str:
    """The last tables written: this run's file, else the tracked one (rows not measured this run are kept)."""
    source = DOC if DOC.exists() else TRACKED
    return source.read_text() if source.exists() else ""
ORDER = ["bad input", "fuzz", "overload", "cancellation storm", "faults", "shutdown", "security"]


class Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []

    def add(self, area: str, what: str, figure: object) -> None:
        self.rows.append((area, what, str(figure)))

    def write(self) -> None:
        """Rows of the areas measured this run replace theirs; a run of a few tests keeps the other areas'."""
        if not self.rows:
            return
        rows = merge_rows(_written_rows("|---|---|---|\n", 3), self.rows)
        rows = sorted(rows, key=lambda r: ORDER.index(r[0]) if r[0] in ORDER else len(ORDER))
        table = "".join(f"| {a} | {w} | {f} |\n" for a, w, f in rows)
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(
            "# Reliability\n\nWritten by `tests/integration/test_reliability.py` (run by `make test`) against real "
            "tritonserver processes; each figure is what the last run measured, every row an assertion that passed "
            f"or a figure it recorded.\n\n_{datetime.date.today().isoformat()} · {os.cpu_count()} cores_\n\n"
            "| area | what | figure |\n|---|---|---|\n" + table + KNOWN_ISSUES + _faults_block())


FAULTS_START, FAULTS_END = "<!-- process faults -->\n", "<!-- /process faults -->\n"


def _written_rows(separator: str, columns: int) -> list[tuple[str, ...]]:
    """The rows of the table under `separator` as docs/RELIABILITY.md has them."""
    text = _previous()
    table = text.split(separator, 1)[1].split("\n\n", 1)[0] if separator in text else ""
    return [tuple(line[2:-2].split(" | ", columns - 1)) for line in table.splitlines() if line.startswith("| ")]


def merge_rows(written: list[tuple[str, ...]], measured: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """A table after a run: the rows of each key (first column) it measured replace that key's rows, in
    place; keys it did not measure keep theirs, so a run of a few tests leaves the other figures be."""
    keys = {row[0] for row in measured}
    merged, placed = [], set()
    for row in written:
        if row[0] not in keys:
            merged.append(row)
        elif row[0] not in placed:
            merged += [r for r in measured if r[0] == row[0]]
            placed.add(row[0])
    return merged + [r for r in measured if r[0] not in placed]


def _faults_block() -> str:
    """The process-faults table, as test_process_faults.py last wrote it (kept when the rest is rewritten)."""
    text = _previous()
    start, end = text.find(FAULTS_START), text.find(FAULTS_END)
    return "\n" + text[start:end + len(FAULTS_END)] if 0 <= start < end else ""


class FaultTable:
    """docs/RELIABILITY.md's "process faults" table, written by tests/integration/test_process_faults.py."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, ...]] = []

    def add(self, fault: str, in_flight: str, ended: str, not_ready: str, serving: str) -> None:
        self.rows.append((fault, in_flight, ended, not_ready, serving))

    def write(self) -> None:
        if not self.rows:
            return
        rows = merge_rows(_written_rows("|---|---|---|---|---|\n", 5), self.rows)
        table = "".join("| " + " | ".join(row) + " |\n" for row in rows)
        block = (FAULTS_START + "## Process faults\n\nWritten by `tests/integration/test_process_faults.py`, with "
                 f"real signals on the real processes. _{datetime.date.today().isoformat()}_\n\n"
                 "| fault | requests in flight | how each ended | time to not-ready | time to serving again |\n"
                 "|---|---|---|---|---|\n" + table + FAULTS_NOTE + FAULTS_END)
        text = _previous()
        start, end = text.find(FAULTS_START), text.find(FAULTS_END)
        text = text[:start] + block + text[end + len(FAULTS_END):] if 0 <= start < end else text + "\n" + block
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(text)


FAULTS_NOTE = """
Triton 2.51's Python backend has no readiness hook for a model instance, so a model's readiness can only go
false by unloading it. While its engine process restarts (a few seconds), the `llm` model stays ready and
refuses each request at once with a retryable error (`engine restarting: ...`). Clients and the gateway retry
it; the gateway retries on another replica and skips that model there for 3 s, a refusal after that re-arming
it. Unloading instead would take every version of the model down, and a version that dies during a rollout
must not take the other with it (`tests/integration/test_rollout.py` kills version 1's engine while version 2
serves: no request fails). A model whose engine stays down unloads itself, and is then not ready.

Inside tritonserver, a killed Python stub (not the engine process) is beyond repair on Triton 2.51. The
streams it held stay open until each client times out. A `load` brings the model back in its normal load
time, but the old version stays UNLOADING, and shutdown waits out `--exit-timeout-secs`. The engine process
dies with the stub (PR_SET_PDEATHSIG), so its memory is freed. The other way round, every stub of ours exits
2 s after tritonserver does, however it ends (`exit_with_server`, serving/python_backend.py): Triton 2.51's
stubs outlived a tritonserver that died of a broken output pipe while they loaded. The 2 s keep their exits
apart from the server's, which `pagedllm serve` reads to tell a stub that took tritonserver down (restart)
from a tritonserver that died alone (stop). And a tritonserver started by `pagedllm serve` dies with it
(PR_SET_PDEATHSIG), so a serve killed with SIGKILL leaves nothing behind.

`pagedllm serve` spots the dead stub (a zombie child of tritonserver) and restarts tritonserver as a whole,
as the table shows. That restarts the other models too. Under a bare `tritonserver`, a dead stub needs a
restart of the pod. The kernel's OOM killer picks the engine process, not the stub: the engine process holds
the weights and the KV cache.
"""


KNOWN_ISSUES = """
## Known Triton issue

Triton 2.51 has a bug that can leak a model version when a gRPC stream is cancelled after its final response.
It shows under CPU load. The version never finishes unloading (finalize is never called), and SIGTERM then
waits out the exit timeout and exits 1. `tests/support/repro_triton_cancel_leak.py` reproduces it,
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
