"""The cache folder: created private, and refused when someone else could write what the server runs."""
from __future__ import annotations

import os

import pytest

from pagedllm.cache import cache_dir, is_as_built, record_build
from pagedllm.errors import CacheDirError
from pagedllm.launcher import admin_key_shim


def test_a_new_cache_is_private(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDLLM_CACHE", str(tmp_path / "a" / "cache"))
    assert cache_dir() == tmp_path / "a" / "cache" and (tmp_path / "a" / "cache").stat().st_mode & 0o777 == 0o700


def test_a_cache_others_can_write_is_refused_with_the_fix(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "cache").mkdir(mode=0o700)
    monkeypatch.setenv("PAGEDLLM_CACHE", str(shared / "cache"))
    for folder in (shared, shared / "cache"):
        os.chmod(folder, 0o777)
        with pytest.raises(CacheDirError, match=f"{folder} can be written by others .*chmod go-w {folder}"):
            cache_dir()
        os.chmod(folder, 0o755)
    os.chmod(shared, 0o1777)  # sticky, as /tmp: only owners remove or replace what is theirs
    assert cache_dir() == shared / "cache"


@pytest.mark.skipif(os.getuid() != 0, reason="giving a folder to another user needs root")
def test_a_cache_owned_by_another_user_is_refused(tmp_path, monkeypatch):
    os.chown(tmp_path, 65534, 65534)
    monkeypatch.setenv("PAGEDLLM_CACHE", str(tmp_path))
    with pytest.raises(CacheDirError, match="belongs to user 65534"):
        cache_dir()


def test_a_compiled_artifact_is_used_only_as_its_build_wrote_it(tmp_path):
    artifact = tmp_path / "lib.so"
    artifact.write_bytes(b"\x7fELF built")
    assert not is_as_built(artifact)  # no record of its build: built again
    record_build(artifact)
    assert is_as_built(artifact)
    artifact.write_bytes(b"\x7fELF changed")
    assert not is_as_built(artifact)


def test_a_changed_admin_key_shim_is_built_again(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDLLM_CACHE", str(tmp_path / "cache"))
    shim = admin_key_shim()
    if shim is None:
        pytest.skip("no C compiler here")
    built = shim.read_bytes()
    with shim.open("ab") as f:
        f.write(b"appended")
    assert admin_key_shim() == shim and shim.read_bytes() == built and is_as_built(shim)


def test_a_build_killed_midway_does_not_block_the_next(tmp_path, monkeypatch):
    """torch's build leaves its `lock` file when killed, and a later build would wait on it for ever; under
    cpu.build's own lock that file is stale, so it is removed. (torch's compile is replaced: only the lock
    handling is under test here; tests/test_cpu_isa.py builds the real kernels.)"""
    import torch.utils.cpp_extension

    from pagedllm.engine.kernels import cpu
    from pagedllm.engine.kernels.cpu_isa import CpuIsa

    def compile_and_load(name, sources, build_directory, **_):
        if (tmp_path / "kernels" / "lock").exists():
            raise TimeoutError("torch would wait on its baton for ever here")
        (tmp_path / "kernels" / f"{name}.so").write_bytes(b"library")
        return name

    monkeypatch.setattr(torch.utils.cpp_extension, "load", compile_and_load)
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "lock").touch()
    assert cpu.build(tmp_path / "kernels", CpuIsa.PORTABLE) == "pagedllm_cpu_kernels_portable"
    assert is_as_built(tmp_path / "kernels" / "pagedllm_cpu_kernels_portable.so")


def test_the_kernels_build_with_this_environments_ninja(tmp_path, monkeypatch):
    """A system ninja first on PATH (where the environment is not active) hashes a build's command otherwise than
    the environment's (1.11 against 1.12 and later), and each took the other's build for a stale one: the
    build runs with the environment's ninja whatever PATH says, and PATH is as it was afterwards."""
    import shutil

    import ninja
    import torch.utils.cpp_extension

    from pagedllm.engine.kernels import cpu
    from pagedllm.engine.kernels.cpu_isa import CpuIsa

    system = tmp_path / "system-bin"
    system.mkdir()
    (system / "ninja").write_text("#!/bin/sh\nexit 1\n")
    (system / "ninja").chmod(0o755)
    monkeypatch.setenv("PATH", f"{system}{os.pathsep}{os.environ['PATH']}")
    found = []

    def compile_and_load(name, sources, build_directory, **_):
        found.append(shutil.which("ninja"))
        (tmp_path / "kernels" / f"{name}.so").write_bytes(b"library")
        return name

    monkeypatch.setattr(torch.utils.cpp_extension, "load", compile_and_load)
    cpu.build(tmp_path / "kernels", CpuIsa.PORTABLE)
    assert found == [os.path.join(ninja.BIN_DIR, "ninja")]
    assert shutil.which("ninja") == str(system / "ninja")


def test_each_checkout_builds_its_kernels_into_its_own_folder(tmp_path, monkeypatch):
    """torch's build file names the source's path, so a second checkout (same source, another place) loading the
    first one's folder rebuilt the library there, and each run of either found the other's build."""
    from pagedllm.engine.kernels import cpu

    here = cpu.source_tag()
    copy = tmp_path / cpu.SOURCE.name
    copy.write_bytes(cpu.SOURCE.read_bytes())
    monkeypatch.setattr(cpu, "SOURCE", copy)
    assert cpu.source_tag() != here
