"""The cache folder (`PAGEDLLM_CACHE`, default ~/.cache/pagedllm). The server loads what it holds (the
model, the compiled kernels, the launcher's shim) and runs it, so nobody but its user may write there."""
from __future__ import annotations

import os
import stat
from pathlib import Path

from pagedllm.errors import CacheDirError


def cache_dir() -> Path:
    path = Path(os.environ.get("PAGEDLLM_CACHE") or Path.home() / ".cache" / "pagedllm").absolute()
    if not path.exists():
        path.mkdir(parents=True, mode=0o700)
    check_private(path)
    return path


def check_private(path: Path) -> None:
    """Refuses a folder that a user other than this one (or root) owns, or that others can write, and
    the same of every folder above it (a world-writable one with the sticky bit, as /tmp, is fine above)."""
    uid = os.getuid()
    for part in [path, *path.parents]:
        st = part.stat()
        if st.st_uid not in (uid, 0):
            raise CacheDirError(f"PAGEDLLM_CACHE: {part} belongs to user {st.st_uid}, not to this one ({uid}); "
                                "point PAGEDLLM_CACHE at a folder of your own")
        shared = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if shared and not (part != path and st.st_mode & stat.S_ISVTX):
            raise CacheDirError(f"PAGEDLLM_CACHE: {part} can be written by others (mode {st.st_mode & 0o7777:o}); "
                                f"`chmod go-w {part}`, or point PAGEDLLM_CACHE elsewhere")
