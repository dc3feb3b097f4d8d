"""Engine configuration: plain dataclasses that flow from one place (EngineConfig).

No torch at import (nor in the modules imported here): the llm model's Triton stub reads engine.json and starts
the engine process first, and imports the rest while the engine builds."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagedllm.cache import cache_dir
from pagedllm.engine import backends
from pagedllm.engine.kernels import cpu_isa
from pagedllm.engine.sampling_params import check_int
from pagedllm.errors import ModelNotFoundError, UnsupportedModelError
from pagedllm.restart_policy import RestartPolicy

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
BACKENDS = ("auto", *backends.BACKENDS)
_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}  # per value of each dtype
DTYPES = ("auto", *_BYTES)
KV_CACHE_DTYPES = ("auto", "int8")
CPU_ISAS = ("auto", *(isa.value for isa in cpu_isa.CpuIsa))


@dataclass
class ModelConfig:
    """The subset of a Hugging Face config the Llama-family models need."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    sliding_window: int | None
    eos_token_ids: list[int]

    @classmethod
    def from_hf(cls, hf: Any) -> ModelConfig:
        arch = (getattr(hf, "architectures", None) or ["?"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        heads = hf.num_attention_heads
        rope_scaling = _rope_scaling(hf)
        eos = hf.eos_token_id if hf.eos_token_id is not None else []
        return cls(
            architecture=arch, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size, num_hidden_layers=hf.num_hidden_layers,
            num_attention_heads=heads, num_key_value_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
            rms_norm_eps=hf.rms_norm_eps, rope_theta=_rope_theta(hf), rope_scaling=rope_scaling,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            attention_bias=arch == "Qwen2ForCausalLM" or bool(getattr(hf, "attention_bias", False)),
            sliding_window=getattr(hf, "sliding_window", None) if getattr(hf, "use_sliding_window", True) else None,
            eos_token_ids=list(eos) if isinstance(eos, (list, tuple)) else [eos],
        )


def load_model_config(model_path: Path) -> ModelConfig:
    """The model's config.json as a ModelConfig, kept in the cache folder under a digest of that file, of
    transformers' version and of this file's code: transformers' AutoConfig, which fills in each architecture's
    defaults, costs 0.8 s of imports (transformers 5.25) in every process that starts, the engine's and the
    tokenizing stub's. A cache that cannot be read or written is skipped."""
    config_json = Path(model_path) / "config.json"
    key = hashlib.sha256()
    for part in (config_json.read_bytes(), importlib.metadata.version("transformers").encode(),
                 Path(__file__).read_bytes()):
        key.update(hashlib.sha256(part).digest())
    try:
        kept = cache_dir() / "model_configs" / f"{key.hexdigest()[:32]}.json"
    except OSError as e:  # CacheDirError among them: no cache, not a failed start
        logger.warning("model config cache not used (%s); reading %s", e, config_json)
        return _model_config_from_hf(model_path)
    try:
        return ModelConfig(**json.loads(kept.read_text()))
    except FileNotFoundError:
        pass
    except (OSError, ValueError, TypeError) as e:  # unreadable or damaged: written again
        logger.warning("model config cache entry %s not used (%s)", kept, e)
    config = _model_config_from_hf(model_path)
    try:
        kept.parent.mkdir(mode=0o700, exist_ok=True)
        partial = kept.with_name(f"{kept.name}.{os.getpid()}")
        partial.write_text(json.dumps(asdict(config)))
        partial.replace(kept)
    except OSError as e:
        logger.warning("model config not kept in the cache: %s", e)
    return config


def _model_config_from_hf(model_path: Path) -> ModelConfig:
    from transformers import AutoConfig
    return ModelConfig.from_hf(AutoConfig.from_pretrained(model_path))


def _rope_parameters(hf: Any) -> dict[str, Any]:
    # transformers >= 5 keeps rope settings in `rope_parameters`; older versions in rope_theta/rope_scaling.
    params = getattr(hf, "rope_parameters", None)
    return dict(params) if isinstance(params, dict) else {}


def _rope_theta(hf: Any) -> float:
    return float(_rope_parameters(hf).get("rope_theta") or getattr(hf, "rope_theta", None) or 10000.0)


def _rope_scaling(hf: Any) -> dict[str, Any] | None:
    scaling = _rope_parameters(hf) or dict(getattr(hf, "rope_scaling", None) or {})
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return None
    if kind not in ("llama3", "linear"):
        raise UnsupportedModelError(f"rope_scaling type {kind!r} is not supported; supported: llama3, linear")
    return {**scaling, "rope_type": kind}


SPECULATIVE_METHODS = ("ngram",)


@dataclass
class SpeculativeConfig:
    """vLLM's `speculative_config` for the n-gram method."""

    method: str = "ngram"
    num_speculative_tokens: int = 5
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4
    # No drafts in a step with more running sequences than this: a full batch is bound by compute, where
    # every rejected draft costs as much as a kept token.
    disable_by_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_config.method: {self.method!r} is not one of "
                             f"{', '.join(SPECULATIVE_METHODS)}")
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"):
            check_int(f"speculative_config.{name}", getattr(self, name), low=1, high=64)
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative_config.prompt_lookup_min: {self.prompt_lookup_min} is more than "
                             f"prompt_lookup_max {self.prompt_lookup_max}")
        if self.disable_by_batch_size is not None:
            check_int("speculative_config.disable_by_batch_size", self.disable_by_batch_size, low=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpeculativeConfig:
        if not isinstance(data, dict):
            raise ValueError("speculative_config: must be an object such as {\"method\": \"ngram\"}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"speculative_config.{unknown[0]}: unknown setting; known: {', '.join(sorted(known))}")
        return cls(**data)


@dataclass
class EngineConfig:
    """Everything the engine is built from; `from_json` reads a model repository's engine.json."""

    model: str | None = None
    # "auto": bfloat16 on CUDA and wherever the CPU kernels run (every tier keeps bf16 weights); float32 on a
    # CPU with neither the kernels nor oneDNN's bf16 (cpu_isa.py).
    dtype: str = "bfloat16"
    device: str = "auto"
    # auto: the Triton kernels on CUDA (when triton is installed); on a CPU, "cpu": pagedllm's C++ kernels
    # (packed linears, each step in one call) when they build; else plain torch.
    attention_backend: str = "auto"
    # The CPU kernels' tier: "auto" (PAGEDLLM_CPU_ISA if set, else the best this CPU runs), or one of
    # amx, avx512_bf16, avx512, avx2, neon_bf16, neon, portable that this CPU can execute (cpu_isa.py).
    cpu_isa: str = "auto"
    quantization: str | None = None  # "int8": weight-only, per output channel, converted at load (needs "cpu")
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: int = 1 << 30
    # The KV cache's storage (vLLM's name): "auto", the model's dtype; "int8", codes with a scale per position and KV
    # head, quantized as written and read inside attention (kv_quant.py): about twice the tokens in kv_cache_memory
    kv_cache_dtype: str = "auto"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    max_waiting_requests: int = 1024
    max_queued_tokens: int = 1 << 20
    seed: int = 0
    # A streamed request's tokens go out every `stream_interval` tokens (its first and last at once), as in
    # vLLM: fewer, larger responses cost the server less per token under load, at the price of smoothness.
    stream_interval: int = 1
    # The longest a structured-output constraint may compile (in the grammar worker's process) before its
    # request is refused; a large JSON schema compiles in well under a second on a small CPU.
    constraint_compile_timeout: float = 10.0
    # vLLM's {"method": "ngram", "num_speculative_tokens": 5, ...}: drafts by prompt lookup (speculative.py)
    speculative_config: SpeculativeConfig | None = None
    # LoRA adapters (lora.py): off unless asked for; `max_loras` resident at once (a step's rows may use them all),
    # each of rank up to `max_lora_rank` (vLLM's names and defaults, but 4 slots: an adapter of rank 16 costs this
    # model 20 MB in float32)
    enable_lora: bool = False
    max_loras: int = 4
    max_lora_rank: int = 16
    # adapters registered at start, name -> folder of PEFT's files (vLLM's --lora-modules; a Triton model's
    # multi_lora.json, as Triton's vLLM backend reads it); each loads into a slot when a request first names it
    lora_modules: dict[str, str] = field(default_factory=dict)
    # the folder whose adapters the server may load and unload while it runs (the llm model's lora_control,
    # the gateway's POST /v1/load_lora_adapter); None: runtime loading off, as vLLM has it by default
    lora_dir: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.speculative_config, dict):
            self.speculative_config = SpeculativeConfig.from_dict(self.speculative_config)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype: {self.kv_cache_dtype!r} is not one of {', '.join(KV_CACHE_DTYPES)}")
        if self.cpu_isa not in CPU_ISAS:
            raise ValueError(f"cpu_isa: {self.cpu_isa!r} is not one of {', '.join(CPU_ISAS)}")
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend: {self.attention_backend!r} is not one of {', '.join(BACKENDS)}")
        check_int("max_loras", self.max_loras, low=1, high=64)
        check_int("max_lora_rank", self.max_lora_rank, low=1, high=512)
        if not isinstance(self.enable_lora, bool):
            raise ValueError(f"enable_lora: must be true or false, got {self.enable_lora!r}")
        if not isinstance(self.lora_modules, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.lora_modules.items()):
            raise ValueError("lora_modules: must map adapter names to folders, such as {\"sql\": \"/adapters/sql\"}")
        if self.lora_dir is not None and not (self.enable_lora and isinstance(self.lora_dir, str)):
            raise ValueError("lora_dir: a folder, with enable_lora true")
        if self.lora_modules and not self.enable_lora:
            raise ValueError(f"lora_modules: {len(self.lora_modules)} adapters given with enable_lora false; "
                             "set enable_lora to true to serve them")
        if self.quantization not in (None, "int8"):
            raise ValueError(f"quantization: {self.quantization!r} is not supported; supported: int8")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "kv_cache_memory", "stream_interval",
                     "constraint_compile_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch
        return getattr(torch, self.resolved_dtype())

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        if self.resolved_device().type == "cuda":
            return "bfloat16"
        return self.cpu_plan().auto_dtype(kernels=self.resolved_attention_backend() == "cpu")

    def resolved_kv_cache_dtype(self) -> str:
        """What the KV cache holds: "int8", or the model's dtype."""
        return "int8" if self.kv_cache_dtype == "int8" else self.resolved_dtype()

    def cpu_plan(self) -> cpu_isa.CpuPlan:
        """The CPU tier this engine runs: the one asked for (ValueError naming cpu_isa or PAGEDLLM_CPU_ISA if this
        CPU cannot execute it), else the best this CPU runs whose kernels build here."""
        from pagedllm.engine.kernels import cpu as cpu_kernels
        return cpu_kernels.buildable(cpu_isa.plan_for(self.cpu_isa))

    def resolved_attention_backend(self) -> str:
        return backends.resolve(self).name

    def resolved_device(self) -> torch.device:
        import torch
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @classmethod
    def from_json(cls, path: str | Path, **overrides: Any) -> EngineConfig:
        """The engine's settings in an engine.json (its supervision settings are read by read_engine_json)."""
        return read_engine_json(path, **overrides)[0]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SupervisionConfig:
    """How the serving side watches the engine process (engine_process.py), from the same engine.json: work
    waiting and no step finished for `heartbeat_timeout` s, and it is killed; a dead one is restarted after
    1, 2, 4... s, and after `max_restarts` deaths within `restart_window` s it stays down."""
    heartbeat_timeout: float = 30.0
    max_restarts: int = RestartPolicy.max_restarts
    restart_window: float = RestartPolicy.restart_window

    def __post_init__(self) -> None:
        if not self.heartbeat_timeout > 0:
            raise ValueError(f"heartbeat_timeout: must be positive, got {self.heartbeat_timeout}")
        self.restart_policy()  # checks the rest, naming the field

    def restart_policy(self) -> RestartPolicy:
        return RestartPolicy(self.max_restarts, self.restart_window)


def engine_settings(settings: dict[str, Any],
                    source: str = "engine.json") -> tuple[EngineConfig, SupervisionConfig]:
    """engine.json's settings as its two parts: the engine's and the serving side's watch over it. A key
    neither part knows is refused, naming it and `source`."""
    unknown = set(settings) - set(EngineConfig.__dataclass_fields__) - set(SupervisionConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"{source}: unknown engine settings {sorted(unknown)}")
    watch = {k: v for k, v in settings.items() if k in SupervisionConfig.__dataclass_fields__}
    return EngineConfig(**{k: v for k, v in settings.items() if k not in watch}), SupervisionConfig(**watch)


def read_engine_json(path: str | Path, **overrides: Any) -> tuple[EngineConfig, SupervisionConfig]:
    """An engine.json's two parts (engine_settings); a relative `model` (where it exists there), `lora_dir` and
    `lora_modules` folder are taken from the file's folder."""
    data = {**json.loads(Path(path).read_text()), **overrides}
    here = Path(path).parent
    model = data.get("model")
    if model and not Path(model).is_absolute() and (here / model).exists():
        data["model"] = str((here / model).resolve())
    if isinstance(data.get("lora_dir"), str):
        data["lora_dir"] = str((here / data["lora_dir"]).resolve())
    if isinstance(data.get("lora_modules"), dict):
        data["lora_modules"] = {k: str((here / v).resolve()) if isinstance(v, str) else v
                                for k, v in data["lora_modules"].items()}
    return engine_settings(data, str(path))


def num_blocks_for(config: EngineConfig, model: ModelConfig) -> int:
    """KV blocks that fit in `kv_cache_memory` unless `num_kv_blocks` is given."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    per_block = 2 * model.num_hidden_layers * config.block_size * model.num_key_value_heads
    if config.kv_cache_dtype == "int8":
        from pagedllm.engine import kv_quant  # torch: not at import (the module's docstring says why)
        per_block *= model.head_dim + kv_quant.SCALE_BYTES
    else:
        per_block *= model.head_dim * _BYTES[config.resolved_dtype()]
    return max(1, config.kv_cache_memory // per_block)


def newest_engine_json(model_dir: Path) -> Path | None:
    """The engine.json of a Triton model's newest version, None where it has none."""
    versions = sorted((int(p.parent.name), p) for p in model_dir.glob("*/engine.json") if p.parent.name.isdigit())
    return versions[-1][1] if versions else None


def declared_model_path(model_dir: Path) -> Path | None:
    """The model folder (weights, tokenizer) a Triton model's newest version serves, per its engine.json; None
    where it cannot be read or found."""
    from pagedllm.weights import resolve_model_path
    engine_json = newest_engine_json(model_dir)
    try:
        return resolve_model_path(EngineConfig.from_json(engine_json).model) if engine_json else None
    except (OSError, ValueError, ModelNotFoundError):
        return None


def declared_max_model_len(model_dir: Path) -> int | None:
    """The max_model_len a Triton model's newest version asks for in its engine.json, or else its model's
    positions; None where neither can be read. The engine may lower it further (a sliding window, a small KV
    pool)."""
    engine_json = newest_engine_json(model_dir)
    if engine_json is None:
        return None
    try:
        config = EngineConfig.from_json(engine_json)
        if config.max_model_len:
            return config.max_model_len
        path = declared_model_path(model_dir)
        return int(json.loads((path / "config.json").read_text())["max_position_embeddings"]) if path else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def declared_adapters(model_dir: Path) -> list[str]:
    """The LoRA adapters a Triton model's newest version serves (its engine.json's lora_modules and its
    multi_lora.json), for the gateway to route by name; [] where none can be read."""
    from pagedllm.engine.lora import read_multi_lora
    engine_json = newest_engine_json(model_dir)
    if engine_json is None:
        return []
    try:
        config = EngineConfig.from_json(engine_json)
        return sorted({*config.lora_modules, *read_multi_lora(engine_json.parent)}) if config.enable_lora else []
    except (OSError, ValueError):
        return []


def resolve_max_model_len(config: EngineConfig, model: ModelConfig, num_blocks: int) -> int:
    """The longest sequence the engine accepts: no longer than the model, its window, or the whole KV pool."""
    limit = config.max_model_len or model.max_position_embeddings
    if model.sliding_window:
        limit = min(limit, model.sliding_window)
    pool = num_blocks * config.block_size
    if pool < limit:
        logger.warning("max_model_len lowered from %d to %d: the KV pool holds only %d blocks", limit, pool, num_blocks)
    return min(limit, pool)
