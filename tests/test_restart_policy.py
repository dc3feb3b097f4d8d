"""The restart rule the engine process and `pagedllm serve` share: 1, 2, 4... s, and down after too many
deaths within the window; deaths that leave the window no longer count."""
from __future__ import annotations

import pytest

from pagedllm.engine.config import SupervisionConfig, read_engine_json
from pagedllm.restart_policy import RestartPolicy


def test_backoff_doubles_and_too_many_deaths_in_the_window_give_up():
    policy = RestartPolicy(max_restarts=3, restart_window=100.0)
    assert [policy.on_death(t) for t in (0.0, 1.0, 2.0)] == [1.0, 2.0, 4.0]
    assert policy.on_death(3.0) is None


def test_deaths_older_than_the_window_are_forgotten():
    policy = RestartPolicy(max_restarts=1, restart_window=10.0)
    assert policy.on_death(0.0) == 1.0
    assert policy.on_death(10.5) == 1.0  # the first left the window
    assert policy.on_death(11.0) is None


@pytest.mark.parametrize("kw, field", [({"max_restarts": -1}, "max_restarts"), ({"heartbeat_timeout": 0}, "heartbeat"),
                                       ({"restart_window": -5.0}, "restart_window"),
                                       ({"max_restarts": 1.5}, "max_restarts")])
def test_bad_supervision_settings_are_refused_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        SupervisionConfig(**kw)


def test_engine_json_splits_into_the_engine_and_its_watch(tmp_path):
    path = tmp_path / "engine.json"
    path.write_text('{"model": "default", "max_num_seqs": 8, "heartbeat_timeout": 2.5, "max_restarts": 1}')
    engine, watch = read_engine_json(path)
    assert engine.max_num_seqs == 8 and not hasattr(engine, "heartbeat_timeout")
    assert watch == SupervisionConfig(heartbeat_timeout=2.5, max_restarts=1)
    assert watch.restart_policy() == RestartPolicy(max_restarts=1, restart_window=300.0)
    path.write_text('{"model": "default", "heartbeat": 3}')
    with pytest.raises(ValueError, match=r"unknown engine settings \['heartbeat'\]"):
        read_engine_json(path)
