"""API keys: the `--api-keys` file (names, sha256 digests, allowed models, limits), and authentication.
Plain keys are never stored; a presented key is hashed and compared in constant time."""
from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path

from pagedllm.gateway.errors import AuthenticationError, PermissionDeniedError

OPEN = "open"  # the key name of every request to a gateway started without --api-keys


@dataclass(frozen=True)
class Limits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    # a key the file gives no concurrency limit still has this one: one key cannot hold every stream of a
    # served engine (its max_num_seqs is 64) and then some
    max_concurrent_requests: int | None = 64


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str
    models: frozenset[str] | None = None  # None: every model
    limits: Limits = Limits()
    metrics: bool = False  # may read /metrics (key names, usage and replica addresses): a scrape key
    admin: bool = False  # may load and unload LoRA adapters (POST /v1/load_lora_adapter, /v1/unload_lora_adapter)

    def check_admin(self) -> None:
        if not self.admin:
            how = ("start the gateway with --api-keys" if self.name == OPEN else f"key {self.name!r} may not")
            raise PermissionDeniedError(f"loading and unloading adapters needs an admin key: {how}; give a key "
                                        'whose entry has "admin": true', None, "admin_only")

    def check_metrics(self) -> None:
        if not self.metrics:
            raise PermissionDeniedError(f"key {self.name!r} may not read the gateway's metrics; give a key whose "
                                        'entry has "metrics": true', None, "metrics_not_allowed")

    def check_model(self, model: str) -> None:
        if self.models is not None and model not in self.models:
            raise PermissionDeniedError(f"model: key {self.name!r} may not use model {model!r}", "model",
                                        "model_not_allowed")


class KeyFileError(ValueError):
    """The --api-keys file is malformed; the message names the entry and field."""


def load_keys(path: Path) -> list[ApiKey]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise KeyFileError(f"--api-keys: cannot read {path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise KeyFileError('--api-keys: expected {"keys": [{"name": ..., "sha256": ...}, ...]}')
    keys = [_key(i, entry) for i, entry in enumerate(data["keys"])]
    for field in ("name", "sha256"):  # a repeated digest would make which entry a key gets a matter of order
        seen: dict[str, int] = {}
        for i, key in enumerate(keys):
            value = getattr(key, field)
            if value in seen:
                raise KeyFileError(f"--api-keys: keys[{i}].{field}: the same as keys[{seen[value]}]'s; each key "
                                   f"needs its own {field}")
            seen[value] = i
    return keys


def _key(i: int, entry: object) -> ApiKey:
    where = f"--api-keys: keys[{i}]"
    if not isinstance(entry, dict):
        raise KeyFileError(f"{where}: expected an object")
    unknown = set(entry) - {"name", "sha256", "models", "metrics", "admin", *Limits.__dataclass_fields__}
    if unknown:
        raise KeyFileError(f"{where}: unknown fields {sorted(unknown)}")
    name, digest = entry.get("name"), entry.get("sha256")
    if not isinstance(name, str) or not name:
        raise KeyFileError(f"{where}.name: expected a non-empty string")
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
        raise KeyFileError(f"{where}.sha256: expected the 64 hex digits of the key's SHA-256")
    models = entry.get("models")
    if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) for m in models)):
        raise KeyFileError(f"{where}.models: expected a list of model names")
    for limit in Limits.__dataclass_fields__:
        value = entry.get(limit)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise KeyFileError(f"{where}.{limit}: expected a positive integer")
    for flag in ("metrics", "admin"):
        if not isinstance(entry.get(flag, False), bool):
            raise KeyFileError(f"{where}.{flag}: expected true or false")
    limits = Limits(**{k: entry[k] for k in Limits.__dataclass_fields__ if entry.get(k) is not None})
    return ApiKey(name, digest.lower(), frozenset(models) if models is not None else None, limits,
                  entry.get("metrics", False), entry.get("admin", False))


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyRing:
    """`keys` None: an open gateway, where every request is the key named `open`, with no limits."""

    def __init__(self, keys: list[ApiKey] | None) -> None:
        self.keys = keys
        self.open = ApiKey(OPEN, "", metrics=True)

    def authenticate(self, authorization: str | None) -> ApiKey:
        if self.keys is None:
            return self.open
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise AuthenticationError("no API key: send the header 'Authorization: Bearer <key>'", None,
                                      "missing_api_key")
        wanted = digest(presented.strip())
        found = None
        for key in self.keys:  # every key compared, in constant time: no timing says which nearly matched
            if hmac.compare_digest(key.sha256, wanted):
                found = key
        if found is None:
            raise AuthenticationError("incorrect API key", None, "invalid_api_key")
        return found
