"""The CLI: every command but `gateway` needs the engine, and says how to get it where the install lacks it."""
from __future__ import annotations

import pytest

from pagedllm import cli


def test_engine_commands_name_what_a_gateway_install_lacks(monkeypatch):
    monkeypatch.setattr(cli, "ENGINE_MODULES", ("torch", "pagedllm_engine_not_installed"))
    with pytest.raises(SystemExit, match=r"needs pagedllm_engine_not_installed: pip install 'pagedllm\[serve\]'"):
        cli.main(["generate", "hi"])
    with pytest.raises(SystemExit) as gateway_help:  # the gateway needs none of it
        cli.main(["gateway", "--help"])
    assert gateway_help.value.code == 0
