"""The cache folder (`PAGEDLLM_CACHE`, default ~/.cache/pagedllm). The server loads what it holds (the
model, the compiled kernels, the launcher's shim) and runs it, so nobody but its user may write there."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from pagedllm.errors import CacheDirError

logger = logging.getLogger(__name__)


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


@contextlib.contextmanager
def build_lock(artifact: Path) -> Iterator[None]:
    """Held while an artifact is checked, built and recorded, so that two processes starting at once neither
    build it twice nor take the other's fresh build, not yet recorded, for a changed one."""
    artifact.parent.mkdir(parents=True, exist_ok=True)
    with open(artifact.with_name(artifact.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _digest_file(artifact: Path) -> Path:
    return artifact.with_name(artifact.name + ".sha256")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def record_build(artifact: Path) -> None:
    """Notes the sha256 of what a build just wrote, beside it (written whole, then renamed into place)."""
    partial = _digest_file(artifact).with_name(f"{artifact.name}.sha256.{os.getpid()}")
    partial.write_text(_sha256(artifact) + "\n")
    partial.replace(_digest_file(artifact))


def is_as_built(artifact: Path) -> bool:
    """Whether a compiled artifact is still exactly what its build wrote: False (and the reason logged) when it
    has no recorded digest or its bytes changed since (a partial write, a copy from elsewhere, tampering)."""
    noted = _digest_file(artifact)
    if not noted.exists():
        logger.warning("%s has no record of its build: building it again", artifact)
        return False
    if noted.read_text().strip() != _sha256(artifact):
        logger.warning("%s is not what its build wrote (its sha256 changed): building it again", artifact)
        return False
    return True
