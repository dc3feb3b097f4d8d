"""A child process that dies with its parent, however the parent dies (Linux's PR_SET_PDEATHSIG): the engine
process with its Triton stub, tritonserver with `pagedllm serve`. The signal follows the thread that started
the child, so that thread must live as long as the parent does."""
from __future__ import annotations

import ctypes
import signal

try:  # resolved at import: between fork and exec (a Popen's preexec_fn) the child only makes the call
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: nothing to set
    _prctl = None

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """SIGKILL to this process when its parent's starting thread ends."""
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
