"""The model repository, generated from one spec: `python -m pagedllm.serving.repository [DIR]` writes
preprocessing/, llm/, postprocessing/ and ensemble/. The committed model_repository/ is its output
(a test checks they agree), and tests use it to build repositories with more models or versions."""
from __future__ import annotations

import json
import py_compile
import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path

from pagedllm.engine.config import engine_settings
from pagedllm.serving.request import CACHE_STATE, LORA_CONTROL, NORMALISED_REQUEST
from pagedllm.serving.response import RESPONSE_OPTIONS

# (name, Triton type, dims) for every client-facing input; all optional but one of the prompt fields.
CLIENT_INPUTS = [
    ("text_input", "TYPE_STRING", [1]), ("messages", "TYPE_STRING", [1]), ("stream", "TYPE_BOOL", [1]),
    ("sampling_parameters", "TYPE_STRING", [1]), ("exclude_input_in_output", "TYPE_BOOL", [1]),
    ("return_finish_reason", "TYPE_BOOL", [1]), ("return_num_input_tokens", "TYPE_BOOL", [1]),
    ("return_num_output_tokens", "TYPE_BOOL", [1]), ("return_logprobs", "TYPE_BOOL", [1]),
    ("max_tokens", "TYPE_INT32", [1]), ("min_tokens", "TYPE_INT32", [1]), ("temperature", "TYPE_FP32", [1]),
    ("top_p", "TYPE_FP32", [1]), ("top_k", "TYPE_INT32", [1]), ("repetition_penalty", "TYPE_FP32", [1]),
    ("presence_penalty", "TYPE_FP32", [1]), ("frequency_penalty", "TYPE_FP32", [1]),
    ("random_seed", "TYPE_UINT64", [1]), ("stop_words", "TYPE_STRING", [-1]),
    ("guided_decoding_guide_type", "TYPE_STRING", [1]), ("guided_decoding_guide", "TYPE_STRING", [1]),
    ("tools", "TYPE_STRING", [1]), ("tool_choice", "TYPE_STRING", [1]), ("parallel_tool_calls", "TYPE_BOOL", [1]),
]
INTERNAL_INPUTS = [("input_ids", "TYPE_INT32", [-1]), (NORMALISED_REQUEST, "TYPE_STRING", [1])]
# the llm model's alone: load or unload a LoRA adapter while it runs (request.py LoRAControl; engine.json lora_dir)
# and: which prefix blocks its engine holds, for the gateway's cache-aware routing (kv_events.py)
CONTROL_INPUTS = [(LORA_CONTROL, "TYPE_STRING", [1]), (CACHE_STATE, "TYPE_STRING", [1])]
OUTPUTS = [("text_output", "TYPE_STRING", [-1]), ("finish_reason", "TYPE_STRING", [-1]),
           ("num_input_tokens", "TYPE_UINT32", [1]), ("num_output_tokens", "TYPE_UINT32", [1]),
           ("logprobs", "TYPE_STRING", [-1])]
RESPONSE_OPTIONS_OUTPUT = [(RESPONSE_OPTIONS, "TYPE_STRING", [1])]

MODEL_PY = '"""Thin on purpose: the logic lives in pagedllm.serving, unit-tested without a server."""\n' \
           "from pagedllm.serving.{module} import {cls} as TritonPythonModel  # noqa: F401\n"
# The served engine: EngineConfig's defaults, overridden for a CPU server (a smaller batch and step keep
# every stream's inter-token latency bounded; responses every 4 tokens cost the server less per token).
SERVED_ENGINE = {"model": "default", "max_num_seqs": 64, "max_num_batched_tokens": 1024, "stream_interval": 4}
# The settings engine.json shows an operator, whatever their value (the rest only where overridden).
SHOWN_ENGINE_SETTINGS = ("model", "dtype", "kv_cache_memory", "kv_cache_dtype", "max_num_seqs",
                         "max_num_batched_tokens", "stream_interval")


def engine_json(overrides: dict) -> dict:
    """engine.json for `overrides` of EngineConfig and SupervisionConfig, the engine's defaults filled in for
    the shown settings."""
    config, supervision = engine_settings(overrides)
    names = list(SHOWN_ENGINE_SETTINGS) + [k for k in overrides if k not in SHOWN_ENGINE_SETTINGS]
    values = {name: getattr(supervision if hasattr(supervision, name) else config, name) for name in names}
    return {name: asdict(v) if is_dataclass(v) else v for name, v in values.items()}


def _tensors(kind: str, spec: list[tuple[str, str, list[int]]], optional: bool | set[str]) -> str:
    """`optional`: all of them (True), none (False), or the named ones."""
    items = []
    for name, dtype, dims in spec:
        opt = "\n    optional: true" if optional is True or (isinstance(optional, set) and name in optional) else ""
        items.append(f'  {{\n    name: "{name}"\n    data_type: {dtype}\n    dims: {json.dumps(dims)}{opt}\n  }}')
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def _python_config(name: str, inputs: str, outputs: str, decoupled: bool = False, params: dict | None = None,
                   instances: int = 1, max_batch_size: int = 0) -> str:
    text = f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch_size}\n'
    if decoupled:
        text += "model_transaction_policy {\n  decoupled: true\n}\n"
    text += inputs + outputs + f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_CPU\n  }}\n]\n"
    for key, value in (params or {}).items():
        text += f'parameters {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}\n'
    return text


def llm_config(name: str) -> str:
    # Two versions stay loaded: new traffic goes to the newest, clients pinned to the previous one keep it.
    return (_python_config(name, _tensors("input", CLIENT_INPUTS + INTERNAL_INPUTS + CONTROL_INPUTS, True),
                           _tensors("output", OUTPUTS + RESPONSE_OPTIONS_OUTPUT, False), decoupled=True)
            + "version_policy: { latest: { num_versions: 2 } }\n")


def ensemble_config(name: str, llm: str, pre: str = "preprocessing", post: str = "postprocessing") -> str:
    def maps(kind: str, pairs: list[tuple[str, str]]) -> str:
        return "".join(f'      {kind} {{ key: "{k}" value: "{v}" }}\n' for k, v in pairs)
    client = [n for n, _, _ in CLIENT_INPUTS]
    raw = [n for n, _, _ in OUTPUTS]
    steps = [
        (pre, maps("input_map", [(n, n) for n in client])
         + maps("output_map", [("input_ids", "_input_ids"), (NORMALISED_REQUEST, "_request")])),
        (llm, maps("input_map", [("input_ids", "_input_ids"), (NORMALISED_REQUEST, "_request")])
         + maps("output_map", [(n, f"_{n}") for n in raw] + [(RESPONSE_OPTIONS, "_response_options")])),
        (post, maps("input_map", [(n, f"_{n}") for n in raw] + [(RESPONSE_OPTIONS, "_response_options")])
         + maps("output_map", [(n, n) for n in raw])),
    ]
    body = ",\n".join(f'    {{\n      model_name: "{m}"\n      model_version: -1\n{b}    }}' for m, b in steps)
    return (f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: 0\n'
            + _tensors("input", CLIENT_INPUTS, True) + _tensors("output", OUTPUTS, False)
            + "ensemble_scheduling {\n  step [\n" + body + "\n  ]\n}\n")


def write_model_py(version_dir: Path, module: str, cls: str) -> None:
    """A version's model.py, compiled beside it. The Python stub would otherwise write its __pycache__/ at
    the first load, and with --model-control-mode=poll Triton takes that change of the model's folder for a
    new model and loads it a second time (seen: 21 s after a tiny model's start)."""
    path = version_dir / "model.py"
    path.write_text(MODEL_PY.format(module=module, cls=cls))
    py_compile.compile(str(path), doraise=True)


def write_llm(root: Path, name: str, engine: dict, versions: tuple[int, ...] = (1,)) -> None:
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "config.pbtxt").write_text(llm_config(name))
    for version in versions:
        write_llm_version(root / name, version, engine)


def write_llm_version(model_dir: Path, version: int, engine: dict) -> None:
    vdir = model_dir / str(version)
    vdir.mkdir(parents=True, exist_ok=True)
    write_model_py(vdir, "llm", "LLMModel")
    (vdir / "engine.json").write_text(json.dumps(engine_json(engine), indent=2) + "\n")


def write_repository(root: Path, engine: dict | None = None, llm: str = "llm", ensemble: str = "ensemble",
                     tokenizer_model: str = "default") -> None:
    root.mkdir(parents=True, exist_ok=True)
    pre = root / "preprocessing"
    (pre / "1").mkdir(parents=True, exist_ok=True)
    pre_in = _tensors("input", CLIENT_INPUTS, True)
    pre_out = _tensors("output", INTERNAL_INPUTS, False)
    (pre / "config.pbtxt").write_text(_python_config("preprocessing", pre_in, pre_out,
                                                     params={"model": tokenizer_model}))
    write_model_py(pre / "1", "preprocessing", "PreprocessingModel")
    post = root / "postprocessing"
    (post / "1").mkdir(parents=True, exist_ok=True)
    # The llm sends only the fields the client asked for, and the response options only with an answer
    # that gets the prompt prepended, so all but text are optional here.
    optional = {name for name, _, _ in OUTPUTS[1:] + RESPONSE_OPTIONS_OUTPUT}
    post_in = _tensors("input", OUTPUTS + RESPONSE_OPTIONS_OUTPUT, optional)
    (post / "config.pbtxt").write_text(_python_config(
        "postprocessing", post_in, _tensors("output", OUTPUTS, False)))
    write_model_py(post / "1", "postprocessing", "PostprocessingModel")
    write_llm(root, llm, engine or SERVED_ENGINE)
    (root / ensemble / "1").mkdir(parents=True, exist_ok=True)
    (root / ensemble / "1" / ".gitkeep").write_text("")
    (root / ensemble / "config.pbtxt").write_text(ensemble_config(ensemble, llm))
    write_unary(root, "generate", ensemble)


def write_unary(root: Path, name: str, target: str, instances: int = 4) -> None:
    """`name` answers gRPC unary calls (and any non-streaming client) by forwarding to `target`."""
    (root / name / "1").mkdir(parents=True, exist_ok=True)
    (root / name / "config.pbtxt").write_text(_python_config(
        name, _tensors("input", CLIENT_INPUTS, True), _tensors("output", OUTPUTS, False),
        params={"target": target}, instances=instances))
    write_model_py(root / name / "1", "generate", "GenerateModel")


def write_baselines(root: Path, model: str = "default", max_batch_size: int = 32, dtype: str = "bfloat16") -> None:
    """perf/compare.py's baselines: `hf_naive` (one request at a time) and `hf_batched` (dynamic batcher)."""
    for name, batch in (("hf_naive", 0), ("hf_batched", max_batch_size)):
        (root / name / "1").mkdir(parents=True, exist_ok=True)
        config = _python_config(name, _tensors("input", CLIENT_INPUTS, True), _tensors("output", OUTPUTS, False),
                                params={"model": model, "dtype": dtype}, max_batch_size=batch)
        if batch:
            config += "dynamic_batching {\n  max_queue_delay_microseconds: 50000\n}\n"
        (root / name / "config.pbtxt").write_text(config)
        write_model_py(root / name / "1", "baselines", "HFBaselineModel")


if __name__ == "__main__":
    write_repository(Path(sys.argv[1] if len(sys.argv) > 1 else "model_repository"))
