"""The grammar worker: constraints compile in a child process within a time budget; one over it, or one the
compiler fails on, costs only that request, and the next constraint compiles in a fresh worker."""
from __future__ import annotations

import pytest
import xgrammar as xgr

from pagedllm.engine.grammar_worker import GrammarWorker
from pagedllm.errors import RequestRejectedError

# about 3 s of compiling: a chain of 300 rules
SLOW = "root ::= r0\n" + "".join(f'r{i} ::= "t{i}" r{i + 1} | "u{i}"\n' for i in range(300)) + 'r300 ::= "end"\n'


@pytest.fixture(scope="module")
def worker(tokenizer):
    w = GrammarWorker(tokenizer, len(tokenizer), [tokenizer.eos_token_id], timeout=10.0)
    yield w
    w.close()


def test_a_compiled_grammar_comes_back_whole(worker, tokenizer):
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer),
                                              stop_token_ids=[tokenizer.eos_token_id])
    grammar = xgr.CompiledGrammar.deserialize_json(worker.compile("regex", "(yes|no)"), info)
    matcher = xgr.GrammarMatcher(grammar)
    assert all(matcher.accept_token(t) for t in tokenizer.encode("yes", add_special_tokens=False))
    assert matcher.accept_token(tokenizer.eos_token_id) and matcher.is_terminated()


def test_a_constraint_that_does_not_compile_is_refused_naming_the_field(worker):
    with pytest.raises(RequestRejectedError, match=r"structured_outputs.grammar: does not compile \(.+\)"):
        worker.compile("grammar", "root ::= ")
    assert worker.compile("regex", "a+")  # the same worker goes on


def test_a_compile_over_its_budget_is_refused_and_the_next_runs_in_a_fresh_worker(worker):
    first = worker._process.pid if worker._process else None
    budget, worker.timeout = worker.timeout, 0.05
    try:
        with pytest.raises(RequestRejectedError, match=r"structured_outputs.grammar: did not compile within 0.05 s"):
            worker.compile("grammar", SLOW)
    finally:
        worker.timeout = budget
    assert worker._process is None  # killed, not left compiling
    assert worker.compile("regex", "b+") and worker._process.pid != first
