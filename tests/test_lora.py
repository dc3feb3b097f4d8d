"""LoRA adapters (engine/lora.py): PEFT's files in, greedy output token-exact in float32 against transformers running
the PEFT model, alone and with several adapters and the base model in one batch, on the torch path and the CPU
kernels of every tier; the bank's slots; every bad adapter refused naming lora_request, the engine serving on."""
from __future__ import annotations

import json
import queue
import random
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from pagedllm import LLM, EngineConfig, LoRARequest, SamplingParams
from pagedllm.engine import wire
from pagedllm.engine.loop import EngineLoop
from pagedllm.engine.lora import read_multi_lora
from pagedllm.errors import RequestRejectedError
from tests.support.kernel_tiers import RUNNABLE, ops_for
from tests.support.lora import make_adapter, peft_greedy

GREEDY = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=12)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL = [*ATTENTION, "gate_proj", "up_proj", "down_proj"]


def _prompts(n: int, lengths: tuple[int, int], seed: int, vocab: int = 49152) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(*lengths))] for _ in range(n)]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """Four adapters on the tiny Qwen2 (biased qkv): ranks 2-8, attention only, MLP only, everything, rsLoRA."""
    model_dir = tiny_model_dir("qwen2")
    root = tmp_path_factory.mktemp("adapters")
    specs = {"attn-r8": (8, ATTENTION, {}), "mlp-r4": (4, ["gate_proj", "up_proj", "down_proj"], {}),
             "all-r2": (2, ALL, {}), "qv-r6-rs": (6, ["q_proj", "v_proj"], {"use_rslora": True, "lora_alpha": 3})}
    return model_dir, {name: make_adapter(model_dir, root / name, rank, targets, seed, **extra)
                       for seed, (name, (rank, targets, extra)) in enumerate(specs.items())}


def _engine(model_dir: Path, **args) -> LLM:
    return LLM(str(model_dir), dtype="float32", enable_lora=True, max_lora_rank=8, block_size=4, **args)


@pytest.mark.parametrize("backend", ["torch", *(f"cpu-{isa.value}" for isa in RUNNABLE)])
def test_a_mixed_batch_of_adapters_and_the_base_matches_peft(adapters, backend):
    """Four adapters and the base model in one continuous batch, with chunked prefill and preemption."""
    model_dir, paths = adapters
    engine_args = {"attention_backend": "torch"}
    if backend.startswith("cpu-"):
        isa = next(i for i in RUNNABLE if i.value == backend[4:])
        ops_for(isa)
        engine_args = {"attention_backend": "cpu", "cpu_isa": isa.value}
    prompts = _prompts(7, (6, 40), seed=1)
    names = [*paths, None]
    jobs = [(p, names[i % len(names)]) for i, p in enumerate(prompts)]
    llm = _engine(model_dir, max_num_batched_tokens=16, num_kv_blocks=40, **engine_args)
    requests = [LoRARequest(name, str(paths[name])) if name else None for _, name in jobs]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=requests)
    for (prompt, name), out in zip(jobs, outs):
        assert out.token_ids == peft_greedy(model_dir, paths.get(name), [prompt], GREEDY.max_tokens)[0], name
    assert llm.engine.num_preemptions > 0
    assert outs[0].token_ids != peft_greedy(model_dir, None, prompts[:1], GREEDY.max_tokens)[0]


def test_the_prefix_cache_is_kept_apart_per_adapter(adapters):
    """A prompt again under its adapter hits the cache; under another adapter, or the base model, it does not."""
    model_dir, paths = adapters
    llm = _engine(model_dir)
    prompt = _prompts(1, (30, 30), seed=6)
    a, b = (LoRARequest(name, str(paths[name])) for name in list(paths)[:2])
    first = llm.generate(prompt, GREEDY, use_tqdm=False, lora_request=a)
    again = [llm.generate(prompt, GREEDY, use_tqdm=False, lora_request=r)[0] for r in (a, b, None)]
    assert first[0].num_cached_tokens == 0
    assert [o.num_cached_tokens for o in again] == [28, 0, 0]
    assert again[0].token_ids == first[0].token_ids == peft_greedy(model_dir, paths[a.name], prompt, 12)[0]
    assert again[1].token_ids == peft_greedy(model_dir, paths[b.name], prompt, 12)[0]


@pytest.mark.parametrize("arch", ["llama3", "llama-tied"])
def test_the_merged_model_agrees(arch, tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir(arch)
    adapter = make_adapter(model_dir, tmp_path / "a", 4, ALL, seed=7)
    prompts = _prompts(2, (5, 30), seed=2)
    outs = _engine(model_dir).generate(prompts, GREEDY, use_tqdm=False, lora_request=LoRARequest("a", str(adapter)))
    assert [o.token_ids for o in outs] == peft_greedy(model_dir, adapter, prompts, 12, merged=True)


def test_more_adapters_than_slots_wait_their_turn(adapters):
    """Three adapters through two slots: each request runs once its adapter holds a slot; a pinned adapter keeps
    its slot."""
    model_dir, paths = adapters
    llm = _engine(model_dir, max_loras=2)
    names = list(paths)[:3]
    llm.engine.load_lora(LoRARequest(names[0], str(paths[names[0]])), pinned=True)
    prompts = _prompts(6, (5, 20), seed=3)
    requests = [LoRARequest(names[i % 3], str(paths[names[i % 3]])) for i in range(6)]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=requests)
    for prompt, request, out in zip(prompts, requests, outs):
        assert out.token_ids == peft_greedy(model_dir, paths[request.name], [prompt], 12)[0]
    assert names[0] in llm.engine.lora.slots


@pytest.mark.slow
def test_smollm2_with_an_adapter_matches_peft(smollm_dir, tokenizer, tmp_path):
    adapter = make_adapter(smollm_dir, tmp_path / "smol", 8, ["q_proj", "v_proj", "down_proj"], seed=11,
                           lora_alpha=4)
    prompts = [tokenizer.encode(t) for t in ("The capital of France is", "def fibonacci(n):")]
    llm = LLM(str(smollm_dir), dtype="float32", enable_lora=True, max_num_batched_tokens=16)
    request = LoRARequest("smol", str(adapter))
    outs = llm.generate(prompts * 2, GREEDY, use_tqdm=False, lora_request=[request, request, None, None])
    assert [o.token_ids for o in outs[:2]] == peft_greedy(smollm_dir, adapter, prompts, 12)
    assert [o.token_ids for o in outs[2:]] == peft_greedy(smollm_dir, None, prompts, 12)
    assert outs[0].token_ids != outs[2].token_ids or outs[1].token_ids != outs[3].token_ids


def _bad(root: Path, good: Path, name: str) -> Path:
    bad = root / name
    bad.mkdir()
    for f in good.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    return bad


def test_bad_adapters_are_refused_naming_the_field_and_the_engine_serves_on(adapters, tmp_path):
    model_dir, paths = adapters
    good = paths["attn-r8"]
    wide = make_adapter(model_dir, tmp_path / "r16", 16, ["q_proj"], seed=5)
    other = _bad(tmp_path, good, "other")  # as if trained on a model with half the hidden size
    weights_file = other / "adapter_model.safetensors"
    save_file({k: v[:, :32].contiguous() if "lora_A" in k else v for k, v in load_file(weights_file).items()},
              weights_file)
    dora = _bad(tmp_path, good, "dora")
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    corrupt = _bad(tmp_path, good, "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    no_config = _bad(tmp_path, good, "no-config")
    (no_config / "adapter_config.json").unlink()
    cases = {tmp_path / "missing": "is missing", wide: "over max_lora_rank 8", dora: "use_dora",
             corrupt: "not a readable safetensors", no_config: "adapter_config.json is missing"}
    llm = _engine(model_dir)
    prompt = _prompts(1, (5, 10), seed=4)
    for path, words in cases.items():
        with pytest.raises(RequestRejectedError, match=words) as e:
            llm.generate(prompt, GREEDY, use_tqdm=False, lora_request=LoRARequest(path.name, str(path)))
        assert e.value.field == "lora_request"
    with pytest.raises(RequestRejectedError, match="another base model"):
        llm.generate(prompt, GREEDY, use_tqdm=False, lora_request=LoRARequest("other", str(other)))
    with pytest.raises(RequestRejectedError, match="no adapter 'nameless' is loaded"):
        llm.generate(prompt, GREEDY, use_tqdm=False, lora_request=LoRARequest("nameless"))
    with pytest.raises(RequestRejectedError, match="lora_request.name"):
        llm.generate(prompt, GREEDY, use_tqdm=False, lora_request=LoRARequest("../../etc", str(good)))
    out = llm.generate(prompt, GREEDY, use_tqdm=False, lora_request=LoRARequest("good", str(good)))
    assert out[0].token_ids == peft_greedy(model_dir, good, prompt, 12)[0]
    with pytest.raises(RequestRejectedError, match="enable_lora"):
        LLM(str(model_dir), dtype="float32").generate(prompt, GREEDY, use_tqdm=False,
                                                        lora_request=LoRARequest("good", str(good)))


def test_unload_and_reload_never_reuse_the_old_weights_cache(adapters):
    """An adapter unloaded and loaded again under its name from another folder: its new weights answer, and the
    prefix cache of the old ones is not hit."""
    model_dir, paths = adapters
    llm = _engine(model_dir)
    prompt = _prompts(1, (30, 30), seed=5)
    first = llm.generate(prompt, GREEDY, use_tqdm=False, lora_request=LoRARequest("x", str(paths["attn-r8"])))
    with pytest.raises(RequestRejectedError, match="unload it first"):
        llm.engine.load_lora(LoRARequest("x", str(paths["mlp-r4"])))
    llm.engine.unload_lora("x")
    again = llm.generate(prompt, GREEDY, use_tqdm=False, lora_request=LoRARequest("x", str(paths["mlp-r4"])))
    assert again[0].num_cached_tokens == 0
    assert first[0].token_ids == peft_greedy(model_dir, paths["attn-r8"], prompt, 12)[0]
    assert again[0].token_ids == peft_greedy(model_dir, paths["mlp-r4"], prompt, 12)[0]


def test_the_bank_lends_a_free_slot_then_the_least_recently_used_idle_unpinned_one(adapters):
    model_dir, paths = adapters
    bank = _engine(model_dir, max_loras=2).engine.lora
    a, b, c = (LoRARequest(name, str(paths[name])) for name in list(paths)[:3])
    bank.register(a, pinned=True)
    bank.register(b)
    bank.register(c)
    assert bank.acquire(a.name) and bank.acquire(b.name)
    assert not bank.acquire(c.name)  # both slots serve running sequences
    bank.release(b.name)
    assert bank.acquire(c.name) and bank.slot_of(c.name) == 1 and b.name not in bank.slots
    bank.release(a.name)
    bank.release(c.name)
    assert bank.acquire(b.name) and bank.slot_of(b.name) == 1  # the pinned one stays, idle as it is
    assert bank.slot_of(a.name) == 0
    bank.register(c, pinned=True)
    for another in (b, LoRARequest("d", str(paths["qv-r6-rs"]))):
        with pytest.raises(RequestRejectedError, match="all 2 slots"):
            bank.register(another, pinned=True)


def test_multi_lora_json_names_folders_beside_it(tmp_path):
    (tmp_path / "multi_lora.json").write_text(json.dumps({"sql": "adapters/sql", "abs": "/srv/a"}))
    assert read_multi_lora(tmp_path) == {"sql": str(tmp_path / "adapters" / "sql"), "abs": "/srv/a"}
    assert read_multi_lora(tmp_path / "none") == {}
    for bad in ('["sql"]', '{"../x": "a"}', '{"sql": 3}', "{"):
        (tmp_path / "multi_lora.json").write_text(bad)
        with pytest.raises(ValueError, match="multi_lora.json"):
            read_multi_lora(tmp_path)


def test_lora_modules_load_at_start_and_a_bad_one_fails_it_naming_it(adapters, tmp_path):
    model_dir, paths = adapters
    with pytest.raises(ValueError, match="lora_modules: 1 adapters given with enable_lora false"):
        EngineConfig(model=str(model_dir), lora_modules={"a": str(paths["attn-r8"])})
    with pytest.raises(ValueError, match="lora_modules.broken: .*is missing"):
        _engine(model_dir, lora_modules={"broken": str(tmp_path)})
    llm = _engine(model_dir, lora_modules={"a": str(paths["attn-r8"])})
    prompt = _prompts(1, (5, 10), seed=8)
    out = llm.generate(prompt, GREEDY, use_tqdm=False, lora_request=LoRARequest("a"))
    assert out[0].token_ids == peft_greedy(model_dir, paths["attn-r8"], prompt, 12)[0]


def test_the_loop_changes_adapters_on_its_own_thread_and_answers_each_change_once(adapters):
    model_dir, paths = adapters
    seen: queue.Queue = queue.Queue()
    loop = EngineLoop(lambda: _engine(model_dir).engine, on_step=lambda e, deltas: [seen.put(d) for d in deltas])
    try:
        loop.change_adapters(wire.LoadAdapter("c1", "a", str(paths["attn-r8"]), pinned=True))
        loaded = seen.get(timeout=30)
        assert (loaded.request_id, loaded.finish_reason, loaded.error) == ("c1", "stop", None)
        assert loop.engine.lora.adapters["a"].pinned
        loop.change_adapters(wire.LoadAdapter("c2", "b", "/nowhere"))
        refused = seen.get(timeout=30)
        assert refused.request_id == "c2" and refused.error.field == "lora_request"
        loop.change_adapters(wire.UnloadAdapter("c3", "a"))
        assert seen.get(timeout=30).error is None and "a" not in loop.engine.lora.adapters
    finally:
        loop.shutdown()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_speculative_drafts_are_verified_with_their_adapter(tiny_model_dir, tmp_path, backend):
    """n-gram drafts run as extra rows of their sequence, with its adapter: the output is still PEFT's."""
    model_dir = tiny_model_dir("llama-tied", vocab_size=16)  # repetitive output: drafts hit and miss
    adapter = make_adapter(model_dir, tmp_path / "a", 4, ALL, seed=9, lora_alpha=1)
    prompts = _prompts(3, (8, 20), seed=9, vocab=16)
    llm = _engine(model_dir, attention_backend=backend, speculative_config={
        "method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 2})
    request = LoRARequest("a", str(adapter))
    outs = llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=[request, None, request])
    assert llm.engine.speculator.num_draft_tokens > 0
    for prompt, out, lora in zip(prompts, outs, [adapter, None, adapter]):
        assert out.token_ids == peft_greedy(model_dir, lora, [prompt], 12)[0]


def test_int8_weights_take_adapters_too(adapters):
    """The adapters' products follow the int8 kernels' linears as they follow the others (checked against the
    torch path on the same int8 model would need its codes: here, that an adapter changes the answer and the base
    rows in the same batch keep theirs)."""
    model_dir, paths = adapters
    llm = LLM(str(model_dir), dtype="bfloat16", quantization="int8", enable_lora=True, max_lora_rank=8)
    prompt = _prompts(1, (10, 20), seed=10)
    alone = llm.generate(prompt, GREEDY, use_tqdm=False)
    request = LoRARequest("a", str(paths["all-r2"]))
    mixed = llm.generate(prompt * 2, GREEDY, use_tqdm=False, lora_request=[None, request])
    assert mixed[0].token_ids == alone[0].token_ids and mixed[1].token_ids != alone[0].token_ids
