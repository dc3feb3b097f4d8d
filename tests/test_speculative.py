"""N-gram prompt lookup and verification (engine/speculative.py), no model."""
from __future__ import annotations

import pytest

from pagedllm.engine.speculative import NgramSpeculator, SpeculativeConfig, propose_ngram

CONFIG = SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_min=1, prompt_lookup_max=3)


def test_the_longest_recurring_suffix_proposes_what_followed_it_last_time():
    #          0  1  2  3  4  5  6  7  8  9
    tokens = [5, 6, 7, 8, 9, 1, 6, 7, 2, 6, 7]
    assert propose_ngram(tokens, CONFIG, 10) == [2, 6, 7]  # "6 7" last seen at 6-7, followed by 2 6 7
    assert propose_ngram([1, 2, 3, 1, 2, 3, 4, 1, 2, 3], CONFIG, 10) == [4, 1, 2]  # 3-gram beats shorter ones
    assert propose_ngram([1, 2, 3, 4], CONFIG, 10) == []  # nothing recurs
    assert propose_ngram(tokens, CONFIG, 1) == [2]  # bounded by the room left
    assert propose_ngram([4, 4], SpeculativeConfig(prompt_lookup_min=2), 5) == []


def test_verification_keeps_samples_up_to_the_first_that_differs_from_its_draft():
    spec = NgramSpeculator(CONFIG, 100)
    assert spec.verify([1, 2, 3], [1, 2, 9, 4]) == [1, 2, 9]
    assert spec.verify([1, 2, 3], [1, 2, 3, 4]) == [1, 2, 3, 4]  # all kept: the bonus token too
    assert spec.verify([1, 2, 3], [7, 2, 3, 4]) == [7]
    assert (spec.num_draft_tokens, spec.num_accepted_tokens) == (9, 5)


@pytest.mark.parametrize("settings, field", [
    ({"method": "eagle"}, "speculative_config.method"),
    ({"num_speculative_tokens": 0}, "speculative_config.num_speculative_tokens"),
    ({"prompt_lookup_min": 5, "prompt_lookup_max": 2}, "speculative_config.prompt_lookup_min"),
    ({"disable_by_batch_size": -1}, "speculative_config.disable_by_batch_size"),
    ({"num_draft": 3}, "speculative_config.num_draft"),
])
def test_bad_settings_name_the_field(settings, field):
    with pytest.raises(ValueError, match=field):
        SpeculativeConfig.from_dict(settings)
