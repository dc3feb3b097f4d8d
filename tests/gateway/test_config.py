"""The gateway's settings."""
from __future__ import annotations

import pytest

from pagedllm.engine.config import declared_adapters, declared_max_model_len
from pagedllm.gateway.config import GatewayConfig, parse_lengths
from tests.gateway.bodies import REPOSITORY


def test_max_model_len_flags_and_the_repository_value(tmp_path):
    assert parse_lengths(["llm=4096", "b=8"]) == {"llm": 4096, "b": 8}
    for bad in (["llm"], ["llm=0"], ["llm=long"]):
        with pytest.raises(ValueError, match="--max-model-len"):
            parse_lengths(bad)
    config = GatewayConfig(["h:1"], max_model_len={"llm": 4096})
    assert config.context_length("llm") == 4096 and config.context_length("other") == config.default_max_model_len
    assert declared_max_model_len(REPOSITORY / "llm") == 8192  # SmolLM2's positions: engine.json sets none
    (tmp_path / "m" / "3").mkdir(parents=True)
    (tmp_path / "m" / "3" / "engine.json").write_text('{"model": "default", "max_model_len": 2048}')
    assert declared_max_model_len(tmp_path / "m") == 2048 and declared_max_model_len(tmp_path) is None


def test_lora_adapters_route_to_their_base_and_never_shadow_a_model(tmp_path):
    config = GatewayConfig(["h:1"], served_model_names={"chat": "llm"}, lora_adapters={"sql": "llm_tiny"})
    assert config.route("sql") == ("llm_tiny", "sql") and config.route("chat") == ("llm", None)
    assert config.route("llm") == ("llm", None) and "llm_tiny" in config.models
    for clash in ({"chat": "llm"}, {"llm": "llm"}):
        with pytest.raises(ValueError, match="--lora-adapter"):
            GatewayConfig(["h:1"], served_model_names={"chat": "llm"}, lora_adapters=clash)
    version = tmp_path / "m" / "2"
    version.mkdir(parents=True)
    (version / "engine.json").write_text('{"model": "default", "enable_lora": true, "lora_modules": {"a": "/x"}}')
    (version / "multi_lora.json").write_text('{"b": "adapters/b"}')
    assert declared_adapters(tmp_path / "m") == ["a", "b"] and declared_adapters(REPOSITORY / "llm") == []
