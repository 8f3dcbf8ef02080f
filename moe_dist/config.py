"""The one config system: typed dataclasses built from nested dicts (JSON/YAML), merged with
``--set a.b=c`` overrides (values parsed as YAML). Model configs and run configs both use it."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Dict, Iterable, Optional

import yaml


def merge(base: Dict[str, Any], changes: Dict[str, Any]) -> Dict[str, Any]:
    """Nested dict update that returns a new dict."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def from_dict(cls, data: Dict[str, Any], where: str):
    """Build dataclass ``cls`` from ``data``, recursing into dataclass-typed fields.

    Keys starting with "_" are comments. Raises ValueError naming ``where`` for unknown fields or a
    non-mapping where a section is expected; the dataclasses' own ``__post_init__`` validate values.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    data = {k: v for k, v in data.items() if not str(k).startswith("_")}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where} has unknown fields {unknown}; valid fields: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise ValueError(f"{where}.{key} must be a mapping, got {value!r}")
            value = from_dict(hints[key], value, f"{where}.{key}")
        kwargs[key] = value
    return cls(**kwargs)


def parse_overrides(items: Iterable[str], prefix: Optional[str] = None) -> Dict[str, Any]:
    """["moe.top_k=2", "embed_dim=256"] -> {"moe": {"top_k": 2}, "embed_dim": 256}.

    Args:
        items: KEY=VALUE strings; KEY is dotted, VALUE is parsed as YAML (so 2 is an int, [1,2] a list).
        prefix: an optional leading section to drop (``"model."`` lets ``model.moe.top_k`` work too).
    Raises:
        ValueError: an item has no "=" or an empty key.
    """
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ValueError(f"--set {item!r} is not KEY=VALUE with a dotted KEY (e.g. --set moe.top_k=2)")
        if prefix and key.startswith(prefix):
            key = key[len(prefix):]
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ValueError(f"--set {item!r}: the value is not valid YAML ({err})") from None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r} conflicts with an earlier --set of {part!r}")
        node[parts[-1]] = value
    return out
