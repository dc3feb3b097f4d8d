"""The engine's settings: each bad one refused naming it, speculative decoding's own block, the KV pool sized
from its memory, and max_model_len bounded by the model, its window and the pool."""
from __future__ import annotations

import json
import shutil

import pytest
from transformers import LlamaConfig, MistralConfig

from pagedllm.engine.config import (
    EngineConfig,
    ModelConfig,
    SpeculativeConfig,
    declared_max_model_len,
    num_blocks_for,
    resolve_max_model_len,
)

SMALL = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)


@pytest.mark.parametrize("settings, field", [
    ({"dtype": "float8"}, "dtype"), ({"cpu_isa": "sse9"}, "cpu_isa"), ({"attention_backend": "fast"},
                                                                        "attention_backend"),
    ({"quantization": "int4"}, "quantization"), ({"block_size": 0}, "block_size"),
    ({"max_num_seqs": -1}, "max_num_seqs"), ({"stream_interval": 0}, "stream_interval"),
    ({"speculative_config": {"method": "eagle"}}, "speculative_config.method"),
    ({"speculative_config": {"prompt_lookup_min": 5, "prompt_lookup_max": 4}}, "speculative_config.prompt_lookup_min"),
    ({"speculative_config": {"lookahead": 3}}, "speculative_config.lookahead"),
])
def test_bad_settings_are_refused_naming_them(settings, field):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        EngineConfig(**settings)


def test_speculative_config_from_engine_json_is_typed():
    config = EngineConfig(speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    assert config.speculative_config == SpeculativeConfig(num_speculative_tokens=3)


def test_the_kv_pool_follows_its_memory_and_max_model_len_its_bounds():
    model = ModelConfig.from_hf(LlamaConfig(**SMALL, architectures=["LlamaForCausalLM"]))
    per_block = 2 * 2 * 16 * 2 * 16 * 2  # K and V, 2 layers, 16 tokens, 2 KV heads of 16, bf16
    assert num_blocks_for(EngineConfig(dtype="bfloat16", block_size=16, kv_cache_memory=10 * per_block), model) == 10
    assert num_blocks_for(EngineConfig(num_kv_blocks=7), model) == 7
    assert resolve_max_model_len(EngineConfig(block_size=16), model, 1000) == 512  # the model's positions
    assert resolve_max_model_len(EngineConfig(block_size=16), model, 8) == 128  # the pool
    assert resolve_max_model_len(EngineConfig(block_size=16, max_model_len=100), model, 1000) == 100
    windowed = ModelConfig.from_hf(MistralConfig(**SMALL, sliding_window=64, architectures=["MistralForCausalLM"]))
    assert resolve_max_model_len(EngineConfig(block_size=16), windowed, 1000) == 64


def test_a_model_folder_declares_its_newest_versions_length(tmp_path):
    for version, length in ((1, 1024), (3, 2048)):
        (tmp_path / str(version)).mkdir()
        (tmp_path / str(version) / "engine.json").write_text(json.dumps({"model": "x", "max_model_len": length}))
    assert declared_max_model_len(tmp_path) == 2048
    assert declared_max_model_len(tmp_path / "3") is None  # no versions below it


def test_the_llm_stub_starts_its_engine_before_importing_torch():
    """The llm model's Triton stub reads engine.json and starts the engine process first, loading transformers
    and torch (with the tokenizer) while the engine builds: its code and the config import neither."""
    import subprocess
    import sys
    from pathlib import Path

    engine_json = Path(__file__).resolve().parents[1] / "model_repository" / "llm" / "1" / "engine.json"
    code = ("import sys; from pathlib import Path; import pagedllm.serving.llm; "
            "from pagedllm.engine.config import read_engine_json; read_engine_json(Path(sys.argv[1])); "
            "print(*[m for m in ('torch', 'transformers', 'xgrammar') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code, str(engine_json)], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""


@pytest.mark.parametrize("architecture", ["llama3", "mistral", "qwen2"])
def test_a_models_config_is_read_once_then_kept_in_the_cache(architecture, tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoConfig

    from pagedllm.engine import config as config_module
    monkeypatch.setenv("PAGEDLLM_CACHE", str(tmp_path / "cache"))
    model_dir = tiny_model_dir(architecture)
    read = config_module.load_model_config(model_dir)
    assert read == ModelConfig.from_hf(AutoConfig.from_pretrained(model_dir))

    def unread(path):
        raise AssertionError("config.json read again")

    with monkeypatch.context() as patched:
        patched.setattr(config_module, "_model_config_from_hf", unread)
        assert config_module.load_model_config(model_dir) == read
    changed = tmp_path / "changed"
    shutil.copytree(model_dir, changed)
    settings = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps({**settings, "rms_norm_eps": 0.125}))
    assert config_module.load_model_config(changed).rms_norm_eps == 0.125


def test_a_cache_that_cannot_be_used_only_costs_the_reading(tiny_model_dir, tmp_path, monkeypatch, caplog):
    from pagedllm.engine.config import load_model_config
    model_dir = tiny_model_dir("llama-tied")
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)  # others may write there: refused as a cache
    monkeypatch.setenv("PAGEDLLM_CACHE", str(shared))
    assert load_model_config(model_dir).tie_word_embeddings
    assert "model config cache not used" in caplog.text
    monkeypatch.setenv("PAGEDLLM_CACHE", str(tmp_path / "cache"))
    expected = load_model_config(model_dir)
    for kept in (tmp_path / "cache" / "model_configs").iterdir():
        kept.write_text('{"architecture": "LlamaForCausalLM"}')  # a config of another version's fields
    assert load_model_config(model_dir) == expected
