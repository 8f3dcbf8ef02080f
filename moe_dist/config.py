"""The one config system: typed dataclasses built from nested dicts (JSON/YAML), merged with
``--set a.b=c`` overrides (values parsed as YAML). Model configs and run configs both use it.

Every value is checked against its field's type annotation when the dataclass is built (``from_dict``):
numbers must be finite and integers fit in 64 bits. YAML files with a key given twice are refused, so a
typo never silently becomes a default. YAML aliases and merge keys (``<<: *base``) work, but what a file
or a ``--set`` value expands to is bounded (``MAX_CONFIG_NODES``), so an alias bomb is refused instead of
being written, expanded, into every run config and checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from typing import Any, Dict, Iterable, Optional

import yaml

from .files import read_small


MAX_CONFIG_BYTES = 1 << 20  # a config file larger than this is refused (ours are a few KB)
MAX_CONFIG_NODES = 100_000  # values (mappings, lists, scalars) a config may expand to, aliases counted each use
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (PyYAML keeps the last one)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    seen = {}
    for key_node, _ in node.value:
        if key_node.tag == _MERGE_TAG:  # "<<: *base": the keys given here override the merged ones (YAML 1.1)
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ValueError(f"key {key!r} appears twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); "
                             "remove one of them")
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def check_expansion(value: Any, where: str, limit: int = MAX_CONFIG_NODES) -> Any:
    """``value`` if it holds at most ``limit`` values once every alias is expanded (each use counted);
    ValueError otherwise. Stops counting at the limit, so a billion-laughs structure costs ``limit`` steps."""
    stack, seen = [value], 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > limit:
            raise ValueError(f"{where} expands to more than {limit:,} values (YAML aliases repeating a structure?); "
                             "a run config is a few hundred values: write it out without the repeated aliases")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return value


def load_yaml(path: str) -> Any:
    """Parse a YAML file safely; ValueError naming the file for a missing, oversized or non-regular file,
    bad YAML, a repeated key, or more than ``MAX_CONFIG_NODES`` values after alias expansion."""
    try:
        text = read_small(path, MAX_CONFIG_BYTES, "config file", follow_symlinks=True)  # never a FIFO
    except FileNotFoundError:
        raise ValueError(f"config file {path!r} does not exist") from None
    except OSError as err:
        raise ValueError(f"config file {path!r} cannot be read ({err.strerror})") from None
    try:
        return check_expansion(yaml.load(text, Loader=_UniqueKeyLoader), "it")
    except TypeError as err:  # a mapping key YAML builds as a list or mapping ("? [1, 2]")
        raise ValueError(f"config file {path!r}: a key is not a name ({err})") from None
    except ValueError as err:
        raise ValueError(f"config file {path!r}: {err}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path!r} is not valid YAML ({str(err).splitlines()[0]})") from None


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
INT_BOUND = 2 ** 63  # integers must fit in int64 (torch, numpy and DeepSpeed take no more)
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
    if hint is float and isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string; it is the number a user meant
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return _finite(value, where)
    if hint in _TYPE_NAMES:
        if not isinstance(value, hint) or (hint is not bool and isinstance(value, bool)):
            raise ValueError(f"{where}={value!r} must be {_TYPE_NAMES[hint]}")
    return _finite(value, where) if hint in (int, float) else value


def _finite(value: Any, where: str) -> Any:
    """``value`` (an int or a float) if it is finite and, for an int, fits in int64; ValueError otherwise
    (NaN passes every ``<``/``>`` range check, and ``1e999`` reads as inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}={value!r} must be a finite number")
    if isinstance(value, int) and not -INT_BOUND <= value < INT_BOUND:
        raise ValueError(f"{where}={value} is out of range: integers must lie in [-2**63, 2**63)")
    return value


def finite_float(text: str) -> float:
    """argparse ``type=`` for a float flag: refuses nan, inf and overflowing values like 1e999."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
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
            value = check_expansion(yaml.load(raw, Loader=_UniqueKeyLoader), "the value")
        except yaml.YAMLError as err:
            raise ValueError(f"--set {item!r}: the value is not valid YAML ({str(err).splitlines()[0]})") from None
        except (TypeError, ValueError) as err:  # TypeError: a key YAML builds as a list or mapping
            raise ValueError(f"--set {key}: {err}") from None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r} conflicts with an earlier --set of {part!r}")
        node[parts[-1]] = value
    return out
