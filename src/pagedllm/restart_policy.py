"""When a dead process is started again, and when it is left down: the one rule for the engine process
(engine/engine_process.py) and for tritonserver under `pagedllm serve` (supervisor.py)."""
from __future__ import annotations

from dataclasses import dataclass, field

from pagedllm.engine.sampling_params import check_int


@dataclass
class RestartPolicy:
    """Restarts after 1, 2, 4... s (`initial_backoff` doubling); after `max_restarts` deaths within
    `restart_window` s, none."""
    max_restarts: int = 3
    restart_window: float = 300.0
    initial_backoff: float = 1.0
    deaths: list[float] = field(default_factory=list)  # times (monotonic) of the deaths in the window

    def __post_init__(self) -> None:
        check_int("max_restarts", self.max_restarts, 0)
        if not self.restart_window > 0:
            raise ValueError(f"restart_window: must be positive, got {self.restart_window}")
        if not self.initial_backoff >= 0:
            raise ValueError(f"initial_backoff: must be >= 0, got {self.initial_backoff}")

    def on_death(self, now: float) -> float | None:
        """Records a death at `now`: the seconds to wait before the restart, or None to stay down."""
        self.deaths = [t for t in self.deaths if now - t < self.restart_window] + [now]
        if len(self.deaths) > self.max_restarts:
            return None
        return self.initial_backoff * 2.0 ** (len(self.deaths) - 1)
