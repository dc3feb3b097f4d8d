"""The generated model repository (serving/repository.py)."""
from __future__ import annotations

import filecmp
from pathlib import Path

from pagedllm.serving.repository import write_repository

REPO = Path(__file__).resolve().parent.parent / "model_repository"



def test_committed_repository_matches_generator(tmp_path):
    write_repository(tmp_path)
    cmp = filecmp.dircmp(REPO, tmp_path, ignore=["__pycache__"])

    def differences(c):
        return c.left_only + c.right_only + c.diff_files + [d for sub in c.subdirs.values() for d in differences(sub)]
    assert not differences(cmp), "run `make repository` and commit model_repository/"
