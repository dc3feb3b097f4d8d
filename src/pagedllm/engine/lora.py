"""LoRA adapters over one set of base weights: PEFT's format read and checked, held in a bank of `max_loras`
slots (least recently used first out, pinned ones never), and applied per row inside each step.

A step's rows may each name a different adapter (or none). After each fused linear, every row with an adapter
gets `B (A x)` added: its slot's A shrinks x to the ranks of each slice (q, k, v; gate, up; or the whole
output), and B expands each slice's ranks back into that slice's outputs (B is kept transposed, [rank, out], so
the kernels expand a row's outputs a vector at a time). The bank is preallocated at start, in float32, every adapter
padded to `max_lora_rank` with zeros; PEFT's scaling (alpha / r, or alpha / sqrt(r) with
rsLoRA) is folded into B. The CPU kernels read the same bank (cpu_kernels.cpp apply_lora); `add_lora` below is
the torch path and the definition they are tested against.

The prefix cache keys each adapter's blocks apart: a sequence's first block hash is chained from its adapter's
`cache_root`, new at every registration, so an adapter never reuses another's KV (or its own earlier weights')."""
from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pagedllm.errors import RequestRejectedError

if TYPE_CHECKING:
    import torch

    from pagedllm.engine.config import ModelConfig

logger = logging.getLogger(__name__)
FIELD = "lora_request"
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
MULTI_LORA = "multi_lora.json"  # a Triton model version's adapters, as Triton's vLLM backend reads them
# PEFT's module name -> (our fused linear, its slice)
TARGETS = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2), "o_proj": ("o_proj", 0),
           "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", 0)}
MODULES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
NAME_RULE = "must be an adapter's name: 1-128 letters, digits or ._:/- characters"
# adapter_config.json settings that change what the weights mean: only their defaults are supported
_DEFAULTS = {"peft_type": "LORA", "bias": "none", "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None,
             "lora_bias": False, "layer_replication": None, "rank_pattern": {}, "alpha_pattern": {},
             "use_qalora": False, "alora_invocation_tokens": None, "trainable_token_indices": None}
_registrations = itertools.count(1)


def read_multi_lora(version_dir: Path) -> dict[str, str]:
    """The adapters of a Triton model version's multi_lora.json ({name: folder}, a relative folder taken from the
    version's), or {} without one; ValueError naming the file if it is not such an object."""
    file = version_dir / MULTI_LORA
    if not file.exists():
        return {}
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{file}: not readable JSON ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and NAME.match(k) and isinstance(v, str)
                                             for k, v in data.items()):
        raise ValueError(f"{file}: must map adapter names (letters, digits, ._:/-) to folders, such as "
                         "{\"sql\": \"adapters/sql\"}")
    return {name: str((version_dir / path).resolve()) for name, path in data.items()}


@dataclass(frozen=True)
class LoRARequest:
    """The adapter a request runs with, as vLLM names it: `name`, and the folder of its PEFT files (omitted for an
    adapter the engine already holds under that name)."""

    name: str
    path: str | None = None


@dataclass(frozen=True)
class ModuleShape:
    """A fused linear as the adapters see it: input features and its slices' output features."""

    in_features: int
    slices: tuple[int, ...]

    @property
    def out_features(self) -> int:
        return sum(self.slices)


def module_shapes(c: ModelConfig) -> dict[str, ModuleShape]:
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    return {"qkv_proj": ModuleShape(c.hidden_size, (q, kv, kv)), "o_proj": ModuleShape(q, (c.hidden_size,)),
            "gate_up_proj": ModuleShape(c.hidden_size, (c.intermediate_size, c.intermediate_size)),
            "down_proj": ModuleShape(c.intermediate_size, (c.hidden_size,))}


@dataclass
class Adapter:
    """One adapter read from disk: per (layer, PEFT module), A [r, in] and B [out, r] with the scaling folded in."""

    name: str
    path: Path
    rank: int
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    cache_root: int  # the prefix cache's chain starts here for this adapter's sequences (module docstring)
    pinned: bool = False


def read_adapter(request: LoRARequest, model: ModelConfig, max_rank: int) -> Adapter:
    """`request`'s adapter, checked against the model and `max_rank`; RequestRejectedError naming lora_request and
    saying what is wrong otherwise."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(request.path or "")
    config = _read_config(path / ADAPTER_CONFIG)
    shapes = module_shapes(model)
    weights_file = path / ADAPTER_WEIGHTS
    if not weights_file.is_file():
        raise RequestRejectedError(FIELD, f"{weights_file} is missing: an adapter folder holds PEFT's "
                                          f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    # bounded before reading: every module at max_rank in float32, plus the file's header
    limit = 4 * max_rank * model.num_hidden_layers * sum(
        len(s.slices) * s.in_features + s.out_features for s in shapes.values()) + (1 << 20)
    if weights_file.stat().st_size > limit:
        raise RequestRejectedError(FIELD, f"{weights_file} is {weights_file.stat().st_size} bytes, more than an "
                                          f"adapter of rank {max_rank} (max_lora_rank) for this model can be")
    try:
        tensors = load_file(weights_file)
    except (SafetensorError, OSError, ValueError) as e:
        raise RequestRejectedError(FIELD, f"{weights_file} is not a readable safetensors file ({e})") from None
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if not match or match[2] not in TARGETS or int(match[1]) >= model.num_hidden_layers:
            raise RequestRejectedError(FIELD, f"tensor {key!r} is not a LoRA weight of a decoder layer's "
                                              f"{', '.join(TARGETS)}; pagedllm applies adapters to those only")
        pairs.setdefault((int(match[1]), match[2]), {})[match[3]] = tensor
    if not pairs:
        raise RequestRejectedError(FIELD, f"{weights_file} holds no LoRA weights")
    weights, ranks = {}, set()
    for (layer, module), ab in sorted(pairs.items()):
        fused, part = TARGETS[module]
        shape = shapes[fused]
        a, b = ab.get("A"), ab.get("B")
        rank = a.shape[0] if a is not None and a.dim() == 2 else None
        where = f"layer {layer} {module}"
        if a is None or b is None or rank is None or b.dim() != 2 or b.shape[1] != rank:
            raise RequestRejectedError(FIELD, f"{where}: lora_A [r, in] and lora_B [out, r] must both be there")
        if a.shape[1] != shape.in_features or b.shape[0] != shape.slices[part]:
            raise RequestRejectedError(FIELD, f"{where}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not "
                                              f"fit this model (in {shape.in_features}, out {shape.slices[part]}): "
                                              "the adapter was trained for another base model")
        if rank > max_rank:
            raise RequestRejectedError(FIELD, f"rank {rank} ({where}) is over max_lora_rank {max_rank}; start the "
                                              "engine with a larger max_lora_rank")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise RequestRejectedError(FIELD, f"{where}: the weights hold inf or NaN")
        ranks.add(rank)
        scaling = config["lora_alpha"] / (math.sqrt(rank) if config["use_rslora"] else rank)
        weights[(layer, module)] = (a.float().contiguous(), (b.float() * scaling).contiguous())
    return Adapter(request.name, path, max(ranks), weights, next(_registrations))


def _read_config(file: Path) -> dict:
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise RequestRejectedError(FIELD, f"{file} is missing: give the folder PEFT's save_pretrained wrote") from None
    except (OSError, ValueError) as e:
        raise RequestRejectedError(FIELD, f"{file} is not readable JSON ({e})") from None
    if not isinstance(config, dict):
        raise RequestRejectedError(FIELD, f"{file} must hold an object")
    for key, default in _DEFAULTS.items():
        if config.get(key) is not None and config[key] != default:
            raise RequestRejectedError(FIELD, f"{file}: {key} {config[key]!r} is not supported (only {default!r})")
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise RequestRejectedError(FIELD, f"{file}: lora_alpha must be a number")
    return {"lora_alpha": float(alpha), "use_rslora": bool(config.get("use_rslora", False))}


@dataclass
class BankModule:
    """One fused linear's slots: A [slots, slices * R, in], B transposed [slots, R, out] (R = max_lora_rank)."""

    a: torch.Tensor
    bt: torch.Tensor
    slice_ends: list[int]  # cumulative output features of the slices


class LoRABank:
    """The adapters resident for the kernels and the torch path, `max_loras` slots of `max_lora_rank`, and which
    adapter holds which slot; `acquire`/`release` as sequences start and stop running with one."""

    def __init__(self, model: ModelConfig, max_loras: int, max_rank: int) -> None:
        import torch
        self.model, self.max_loras, self.max_rank = model, max_loras, max_rank
        self.shapes = module_shapes(model)
        self.layers: list[dict[str, BankModule]] = []
        for _ in range(model.num_hidden_layers):
            self.layers.append({
                name: BankModule(torch.zeros(max_loras, len(s.slices) * max_rank, s.in_features),
                                 torch.zeros(max_loras, max_rank, s.out_features),
                                 list(itertools.accumulate(s.slices)))
                for name, s in self.shapes.items()})
        self.adapters: dict[str, Adapter] = {}  # registered, by name
        self.slots: OrderedDict[str, int] = OrderedDict()  # resident, least recently used first
        self.users: dict[str, int] = {}  # running sequences per resident adapter

    # ---- registration -------------------------------------------------------------------------------
    def register(self, request: LoRARequest, pinned: bool = False) -> Adapter:
        """The adapter `request` names, read from its path the first time (RequestRejectedError naming
        lora_request if it cannot be used)."""
        if not isinstance(request, LoRARequest):
            raise RequestRejectedError(FIELD, "expected LoRARequest(name, path)")
        if not isinstance(request.name, str) or not NAME.match(request.name):
            raise RequestRejectedError(f"{FIELD}.name", NAME_RULE)
        adapter = self.adapters.get(request.name)
        if adapter is not None and request.path is not None and Path(request.path) != adapter.path:
            raise RequestRejectedError(f"{FIELD}.path", f"adapter {request.name!r} is loaded from {adapter.path}; "
                                                        "unload it first to load another under that name")
        if adapter is None and request.path is None:
            raise RequestRejectedError(FIELD, f"no adapter {request.name!r} is loaded; give its path")
        if pinned and not (adapter and adapter.pinned) and sum(a.pinned for a in self.adapters.values()) >= \
                self.max_loras:
            raise RequestRejectedError(FIELD, f"all {self.max_loras} slots (max_loras) are pinned already")
        if adapter is None:
            adapter = self.adapters[request.name] = read_adapter(request, self.model, self.max_rank)
            logger.info("LoRA adapter %s registered from %s: rank %d, %d modules", adapter.name, adapter.path,
                        adapter.rank, len(adapter.weights))
        adapter.pinned = adapter.pinned or pinned
        return adapter

    def unregister(self, name: str) -> None:
        """Forget adapter `name` (the engine refuses it while requests use it)."""
        if name not in self.adapters:
            raise RequestRejectedError(f"{FIELD}.name", f"no adapter {name!r} is loaded")
        del self.adapters[name]
        self.slots.pop(name, None)

    # ---- slots --------------------------------------------------------------------------------------
    def acquire(self, name: str) -> bool:
        """A slot for `name` (loaded into one if it holds none), counted as used by one more sequence; False where
        every slot serves running sequences or is pinned."""
        if name not in self.slots:
            slot = self._free_slot()
            if slot is None:
                return False
            self._load(self.adapters[name], slot)
            self.slots[name] = slot
        self.slots.move_to_end(name)
        self.users[name] = self.users.get(name, 0) + 1
        return True

    def release(self, name: str) -> None:
        self.users[name] -= 1
        if not self.users[name]:
            del self.users[name]

    def slot_of(self, name: str) -> int:
        return self.slots[name]

    def _free_slot(self) -> int | None:
        taken = set(self.slots.values())
        for slot in range(self.max_loras):
            if slot not in taken:
                return slot
        for name, slot in self.slots.items():  # least recently used first
            adapter = self.adapters.get(name)
            if not self.users.get(name) and not (adapter and adapter.pinned):
                del self.slots[name]
                return slot
        return None

    def _load(self, adapter: Adapter, slot: int) -> None:
        R = self.max_rank
        for modules in self.layers:
            for module in modules.values():
                module.a[slot].zero_()
                module.bt[slot].zero_()
        for (layer, name), (a, b) in adapter.weights.items():
            fused, part = TARGETS[name]
            module, r = self.layers[layer][fused], a.shape[0]
            lo = module.slice_ends[part - 1] if part else 0
            module.a[slot, part * R:part * R + r] = a
            module.bt[slot, :r, lo:module.slice_ends[part]] = b.T


@dataclass
class LoRARows:
    """A step's rows by adapter: `slots` per row (-1: the base model); `groups`, the rows of each slot in use, for
    the torch path (the kernels group the rows themselves: kernels.h LoRARowGroups)."""

    slots: torch.Tensor  # [rows] int32

    @functools.cached_property
    def groups(self) -> list[tuple[int, torch.Tensor]]:
        """(slot, its rows as int64) for each slot in use."""
        return [(s, (self.slots == s).nonzero().flatten()) for s in sorted(set(self.slots.tolist())) if s >= 0]


def add_lora(y: torch.Tensor, x: torch.Tensor, module: BankModule, rows: LoRARows) -> None:
    """y[r] += B (A x[r]) for each row r with an adapter, computed in float32 and rounded to y's dtype once."""
    import torch
    max_rank = module.bt.shape[1]
    starts = [0, *module.slice_ends[:-1]]
    for slot, index in rows.groups:
        t = x.index_select(0, index).float() @ module.a[slot].T
        delta = torch.cat([t[:, s * max_rank:(s + 1) * max_rank] @ module.bt[slot, :, lo:hi]
                           for s, (lo, hi) in enumerate(zip(starts, module.slice_ends))], dim=1)
        y.index_copy_(0, index, (y.index_select(0, index).float() + delta).to(y.dtype))
