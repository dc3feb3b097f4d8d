"""tritonserver's command line as pagedllm serve builds it: loopback, model control and the admin groups."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pagedllm.launcher import (
    ADMIN_GROUPS,
    KEY_PLACEHOLDER,
    LOOPBACK,
    ServerOptions,
    TritonInstall,
    server_command,
    with_admin_key,
)

INSTALL = TritonInstall(Path("/opt/tritonserver/bin/tritonserver"))


def flags(opts: ServerOptions) -> dict[str, str]:
    return dict((*arg[2:].split("=", 1), "")[:2] for arg in server_command(INSTALL, opts)[1:])


def test_models_load_from_their_own_complete_configs():
    """Each Python model's config.pbtxt is whole, so Triton does not start a stub per model first to ask for
    the rest (auto-complete): a warm `pagedllm serve` was ready in 10 s instead of 15 on 2 cores."""
    assert "disable-auto-complete-config" in flags(ServerOptions(Path("repo")))


def test_every_listener_is_on_loopback_unless_opened():
    shut = flags(ServerOptions(Path("repo")))
    assert shut["http-address"] == shut["grpc-address"] == shut["metrics-address"] == LOOPBACK
    opened = ServerOptions(Path("repo"), host="0.0.0.0")
    assert flags(opened)["grpc-address"] == "0.0.0.0" and opened.local_host == LOOPBACK


def test_without_a_key_models_load_at_start_and_the_api_cannot_load():
    opts = ServerOptions(Path("repo"), admin_key=None)
    assert flags(opts)["model-control-mode"] == "none" and "load-model" not in flags(opts)
    with pytest.raises(ValueError, match="model_control_mode: explicit .* PAGEDLLM_ADMIN_KEY"):
        server_command(INSTALL, ServerOptions(Path("repo"), model_control_mode="explicit", admin_key=None))
    assert flags(ServerOptions(Path("repo"), model_control_mode="poll", admin_key=None))["model-control-mode"] == "poll"


def test_with_a_key_control_is_explicit_and_every_admin_group_needs_it():
    f = flags(ServerOptions(Path("repo"), admin_key="s3cret"))
    assert f["model-control-mode"] == "explicit" and f["load-model"] == "*"
    for flag in ("http-restricted-api", "grpc-restricted-protocol"):
        groups, header = f[flag].split(":")
        assert set(groups.split(",")) == set(ADMIN_GROUPS) and header == f"admin-key={KEY_PLACEHOLDER}"


def test_the_key_reaches_tritonserver_through_the_shim_not_its_arguments(tmp_path, monkeypatch):
    """The shim, preloaded into a real process, gives main() the key where /proc/<pid>/cmdline, readable by
    every user, shows the placeholder; the key leaves the environment the models' processes inherit."""
    monkeypatch.setenv("PAGEDLLM_CACHE", str(tmp_path))
    code = ("import os, sys; print(sys.argv[1], os.environ.get('PAGEDLLM_ADMIN_KEY'), "
            "open('/proc/self/cmdline').read(), sep='\\n')")
    cmd, env = with_admin_key([sys.executable, "-c", code, f"admin-key={KEY_PLACEHOLDER}"], dict(os.environ), "s3cret")
    assert "s3cret" not in " ".join(cmd)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    argv, inherited, cmdline = done.stdout.splitlines()
    assert argv == "admin-key=s3cret" and inherited == "None" and "s3cret" not in cmdline


def test_without_a_key_the_admin_groups_are_closed_by_a_key_nobody_holds(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDLLM_CACHE", str(tmp_path))
    keys = {with_admin_key(["x"], {}, None)[1]["PAGEDLLM_ADMIN_KEY"] for _ in range(2)}
    assert len(keys) == 2 and all(len(k) >= 40 for k in keys)
