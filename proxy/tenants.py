"""Tenants (issue 11): which key belongs to whom, what it may use, and how fast.

A key file (`--api-keys-file`, YAML or JSON, re-read on SIGHUP) maps each key to a tenant:

    keys:
      sk-acme-1: {tenant: acme, models: ["llama-*"], rpm: 600, tpm: 200000, concurrency: 16,
                  priority: default, max_priority: interactive}
      sk-batch:  {tenant: nightly, rpm: 60, priority: batch, max_priority: batch}

(or a list of `{key: ..., tenant: ..., ...}` objects). Keys from `--api-keys` belong to the tenant `default`
with no limits. Every field but the key is optional; a limit of 0 or none means unlimited.

Limits: requests/min and tokens/min are token buckets (bursts up to one minute's worth), counted fleet-wide
in Redis when the registry is Redis (one bucket per key, one atomic Lua script per decision) and per replica
otherwise; tokens are charged from the answer's `usage` (prompt + completion) after it, so a request is
admitted while the key's token bucket is not in debt. The concurrency cap counts the fleet's requests with the
Redis registry (each replica shares its count per key, `proxy/limits.py`) and this replica's on the memory
registry; with Redis down, each replica falls back to its own count.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .auth import check_secret, digest, key_id
from .identity import DEFAULT_PRIORITY, PRIORITIES, Identity

log = logging.getLogger("turbofleet.tenants")


@dataclass(frozen=True, slots=True)
class Tenant:
    """One key's owner and its limits (0: unlimited)."""

    name: str
    key_id: str
    #: a longer digest of the key, naming its rate buckets (keys.py `bucket`)
    ref: str = ""
    models: tuple[str, ...] = ()
    rpm: float = 0.0
    tpm: float = 0.0
    concurrency: int = 0
    priority: str = DEFAULT_PRIORITY
    max_priority: str = PRIORITIES[0]

    def identity(self) -> Identity:
        return Identity(tenant=self.name, key_id=self.key_id, priority=self.priority, max_priority=self.max_priority)

    def allows_model(self, model: str) -> bool:
        return not self.models or any(fnmatch.fnmatchcase(model, pat) for pat in self.models)

    @property
    def limited(self) -> bool:
        return bool(self.rpm or self.tpm)


class KeyFileError(ValueError):
    """A key file that cannot be used; the message names the entry by position, never by its key."""


_FIELDS = {"tenant", "models", "rpm", "tpm", "concurrency", "priority", "max_priority", "key"}


def _tenant(key: str, spec: Mapping[str, Any], where: str) -> Tenant:
    check_secret(key, where)
    unknown = set(spec) - _FIELDS
    if unknown:
        raise KeyFileError(f"{where}: unknown fields {sorted(unknown)}")
    models = spec.get("models") or ()
    if isinstance(models, str):
        models = (models,)
    if not isinstance(models, list | tuple) or not all(isinstance(m, str) for m in models):
        raise KeyFileError(f"{where}: `models` must be a glob or a list of globs")
    priority = str(spec.get("priority") or DEFAULT_PRIORITY)
    max_priority = str(spec.get("max_priority") or PRIORITIES[0])
    for name, value in (("priority", priority), ("max_priority", max_priority)):
        if value not in PRIORITIES:
            raise KeyFileError(f"{where}: `{name}` must be one of {', '.join(PRIORITIES)}")
    try:
        rpm, tpm = float(spec.get("rpm") or 0), float(spec.get("tpm") or 0)
        concurrency = int(spec.get("concurrency") or 0)
    except (TypeError, ValueError):
        raise KeyFileError(f"{where}: rpm, tpm and concurrency must be numbers") from None
    if min(rpm, tpm, concurrency) < 0 or not (rpm < 1e12 and tpm < 1e15):
        raise KeyFileError(f"{where}: limits must be finite and at least 0")
    tenant = str(spec.get("tenant") or "default")
    if not tenant.isprintable() or len(tenant) > 64:
        raise KeyFileError(f"{where}: `tenant` must be a printable name of at most 64 characters")
    return Tenant(name=tenant, key_id=key_id(key), ref=digest(key).hex()[:32], models=tuple(models), rpm=rpm, tpm=tpm,
                  concurrency=concurrency, priority=priority, max_priority=max_priority)


def parse_key_file(text: str, name: str = "key file") -> dict[bytes, Tenant]:
    """Key digest -> tenant, from a YAML or JSON key file."""
    try:
        data: Any = json.loads(text)
    except ValueError:
        try:
            import yaml
        except ImportError as e:  # pragma: no cover - pyyaml is a dependency
            raise KeyFileError(f"{name} is not JSON and PyYAML is not installed") from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise KeyFileError(f"{name} is neither JSON nor YAML (line {mark.line + 1 if mark else '?'})") from None
    if isinstance(data, dict) and "keys" in data:
        data = data["keys"]
    entries: list[tuple[str, Mapping[str, Any]]] = []
    if isinstance(data, dict):
        for i, (k, spec) in enumerate(data.items()):
            entries.append((str(k), spec if isinstance(spec, dict) else {"tenant": spec} if spec else {}))
            if not isinstance(k, str):
                raise KeyFileError(f"{name} entry {i + 1}: the key must be a string")
    elif isinstance(data, list):
        for i, spec in enumerate(data):
            if not isinstance(spec, dict) or not isinstance(spec.get("key"), str):
                raise KeyFileError(f"{name} entry {i + 1}: expected an object with a string `key`")
            entries.append((spec["key"], spec))
    else:
        raise KeyFileError(f"{name}: expected `keys:` as a mapping or a list")
    out: dict[bytes, Tenant] = {}
    for i, (key, spec) in enumerate(entries):
        try:
            out[digest(key)] = _tenant(key, spec, f"{name} entry {i + 1}")
        except ValueError as e:
            raise KeyFileError(str(e)) from None
    return out


@dataclass
class KeyTable:
    """The keys the proxy accepts, re-readable from its file. `lookup` is a dict lookup on the key's digest."""

    flag_keys: tuple[str, ...] = ()
    path: str | None = None
    table: dict[bytes, Tenant] = field(default_factory=dict)

    @classmethod
    def load(cls, flag_keys: Iterable[str], path: str | None) -> KeyTable:
        t = cls(tuple(flag_keys), path)
        t.table = t._read()
        return t

    def _read(self) -> dict[bytes, Tenant]:
        table: dict[bytes, Tenant] = {}
        for i, key in enumerate(self.flag_keys):
            check_secret(key, f"--api-keys entry {i + 1}")
            table[digest(key)] = Tenant(name="default", key_id=key_id(key), ref=digest(key).hex()[:32])
        if self.path:
            table.update(parse_key_file(Path(self.path).read_text(encoding="utf-8"), self.path))
        return table

    def reload(self) -> bool:
        """Re-read the key file; on any error keep the keys in use (and say so). True when reloaded."""
        try:
            self.table = self._read()
        except (OSError, ValueError) as e:
            log.warning("key file not reloaded, keeping the %d keys in use: %s", len(self.table), e)
            return False
        log.info("key file reloaded: %d keys", len(self.table))
        return True

    @property
    def enabled(self) -> bool:
        return bool(self.table) or bool(self.path)

    def lookup(self, token: str) -> Tenant | None:
        return self.table.get(digest(token))
