"""Command-line overrides shared by every config: ``--set a.b=c`` -> nested dict, values parsed as YAML."""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional

import yaml


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
