"""The API keys file and authentication."""
from __future__ import annotations

import hashlib
import json

import pytest

from pagedllm.gateway.errors import GatewayError
from pagedllm.gateway.keys import KeyFileError, KeyRing, Limits, load_keys


def test_keys_file_and_authentication(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"name": "a", "sha256": hashlib.sha256(b"sk-a").hexdigest(),
                                          "models": ["llm"], "requests_per_minute": 3}]}))
    ring = KeyRing(load_keys(path))
    key = ring.authenticate("Bearer sk-a")
    assert key.name == "a" and key.limits == Limits(requests_per_minute=3)
    for header in (None, "Bearer", "Bearer sk-b", "Basic sk-a"):
        with pytest.raises(Exception) as e:
            ring.authenticate(header)
        assert e.value.status == 401
    with pytest.raises(Exception) as e:
        key.check_model("other")
    assert e.value.status == 403 and e.value.param == "model"
    assert KeyRing(None).authenticate(None).name == "open"
    with pytest.raises(Exception) as e:  # metrics are for scrape keys ("metrics": true) on a keyed gateway
        key.check_metrics()
    assert e.value.status == 403
    KeyRing(None).authenticate(None).check_metrics()
    for bad in ({"keys": [{"name": "a"}]}, {"keys": [{"name": "a", "sha256": "0" * 64, "rpm": 1}]},
                {"keys": [{"name": "a", "sha256": "0" * 64, "tokens_per_minute": 0}]}, [],
                {"keys": [{"name": "a", "sha256": "0" * 64, "metrics": "yes"}]},
                {"keys": [{"name": "a", "sha256": "0" * 64}, {"name": "b", "sha256": "0" * 64}]},
                {"keys": [{"name": "a", "sha256": "0" * 64}, {"name": "a", "sha256": "1" * 64}]}):
        path.write_text(json.dumps(bad))
        with pytest.raises(KeyFileError, match="--api-keys"):
            load_keys(path)


def test_only_an_admin_key_may_change_adapters(tmp_path):
    entries = [{"name": "ops", "sha256": hashlib.sha256(b"sk-ops").hexdigest(), "admin": True},
               {"name": "app", "sha256": hashlib.sha256(b"sk-app").hexdigest()}]
    (tmp_path / "keys.json").write_text(json.dumps({"keys": entries}))
    ring = KeyRing(load_keys(tmp_path / "keys.json"))
    ring.authenticate("Bearer sk-ops").check_admin()
    for who, words in ((ring.authenticate("Bearer sk-app"), "key 'app' may not"),
                       (KeyRing(None).authenticate(None), "start the gateway with --api-keys")):
        with pytest.raises(GatewayError, match=words) as e:
            who.check_admin()
        assert e.value.status == 403
    (tmp_path / "keys.json").write_text(json.dumps({"keys": [{**entries[0], "admin": "yes"}]}))
    with pytest.raises(KeyFileError, match=r"keys\[0\].admin"):
        load_keys(tmp_path / "keys.json")
