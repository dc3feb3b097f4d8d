"""pagedllm serve's supervisor on the CPU: it spots a dead, unreaped Python stub among a process's children."""
from __future__ import annotations

import os
import shutil
import subprocess
import time

from pagedllm.supervisor import dead_stub


def test_a_dead_stub_is_a_zombie_child_named_like_the_stub(tmp_path):
    stub = tmp_path / "triton_python_backend_stub"
    shutil.copy(shutil.which("true"), stub)
    other = tmp_path / "something_else"
    shutil.copy(shutil.which("true"), other)
    zombie_stub, zombie_other = subprocess.Popen([stub]), subprocess.Popen([other])
    time.sleep(0.5)  # both have exited; neither is reaped yet
    try:
        assert dead_stub(os.getpid()) == zombie_stub.pid
    finally:
        zombie_stub.wait(), zombie_other.wait()
    assert dead_stub(os.getpid()) is None
