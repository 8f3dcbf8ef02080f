"""The one config system: typed dataclasses built from nested dicts (JSON/YAML), merged with
``--set a.b=c`` overrides (values parsed as YAML). Model configs and run configs both use it.

Every value is checked against its field's type annotation when the dataclass is built (``from_dict``),
and YAML files with a key given twice are refused, so a typo never silently becomes a default.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, Dict, Iterable, Optional

import yaml


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (PyYAML keeps the last one)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ValueError(f"key {key!r} appears twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); "
                             "remove one of them")
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_yaml(path: str) -> Any:
    """Parse a YAML file safely; ValueError naming the file for a missing file, bad YAML or a repeated key."""
    try:
        with open(path) as f:
            return yaml.load(f, Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise ValueError(f"config file {path!r} does not exist") from None
    except ValueError as err:
        raise ValueError(f"config file {path!r}: {err}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path!r} is not valid YAML ({str(err).splitlines()[0]})") from None


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def check_type(value: Any, hint: Any, where: str) -> Any:
    """``value`` if it fits the annotation ``hint`` (an int is a valid float); ValueError otherwise.

    Handles the annotations config dataclasses use: int, float, bool, str, Any, Optional[X], List[X],
    Tuple[X, ...], Dict[K, V]."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return check_type(value, option, where)
            except ValueError as err:
                errors.append(err)
        raise errors[0]
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}={value!r} must be a list")
        item = args[0] if args else Any
        return type(value)(check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}={value!r} must be a mapping")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string; it is the number a user meant
    if hint in _TYPE_NAMES:
        if not isinstance(value, hint) or (hint is not bool and isinstance(value, bool)):
            raise ValueError(f"{where}={value!r} must be {_TYPE_NAMES[hint]}")
    return value


def merge(base: Dict[str, Any], changes: Dict[str, Any]) -> Dict[str, Any]:
    """Nested dict update that returns a new dict."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def from_dict(cls, data: Dict[str, Any], where: str):
    """Build dataclass ``cls`` from ``data``, recursing into dataclass-typed fields.

    Keys starting with "_" are comments. Raises ValueError naming ``where`` for unknown fields, a value
    of the wrong type, or a non-mapping where a section is expected; the dataclasses' own
    ``__post_init__`` check ranges.
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
        else:
            value = check_type(value, hints[key], f"{where}.{key}")
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
