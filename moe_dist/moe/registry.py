"""One registry per family of variants: a name -> implementation mapping whose ``get`` names the valid
choices when a name is wrong.

The registries are declared here, below everything else in ``moe/``, and filled by the module that
defines each family (router.py, soft.py, dispatch.py, experts.py, losses.py, balance.py) when the package
is imported. ``MoEConfig`` validates its fields against them without importing those modules, and those
modules import ``MoEConfig``: the dependency runs one way. Adding a variant is one ``register`` call.
"""

from __future__ import annotations

from typing import Any, Dict, Generic, Iterator, Optional, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Args:
        field: the ``MoEConfig`` field that names an entry (used in error messages).
        entries: name -> implementation.
    """

    def __init__(self, field: str, entries: Optional[Dict[str, T]] = None):
        self.field = field
        self._entries: Dict[str, T] = dict(entries or {})

    def get(self, name: str) -> T:
        """The entry called ``name``; ValueError listing the valid names otherwise."""
        if name not in self._entries:
            raise ValueError(f"MoEConfig.{self.field}={name!r} is unknown; use one of "
                             f"{', '.join(map(repr, self._entries))}")
        return self._entries[name]

    def register(self, name: str, entry: Any = None):
        """Add ``entry`` under ``name`` and return it; without ``entry``, a decorator that does so."""
        if entry is None:
            return lambda obj: self.register(name, obj)
        self._entries[name] = entry
        return entry

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)


# MoEConfig field -> registry (filled by the modules named in each comment)
ROUTERS: Registry = Registry("router")  # router.py (top-k, threshold, top-p, Expert-Choice), soft.py (Soft MoE)
ROUTER_NOISE: Registry = Registry("router_noise")  # router.py
SCORE_FUNCS: Registry = Registry("score_func")  # router.py: softmax or sigmoid gate scores
DROP_PRIORITIES: Registry = Registry("drop_priority")  # dispatch.py
BALANCE_LOSSES: Registry = Registry("load_balance")  # losses.py: which tokens the balance loss averages over
ACTIVATIONS: Registry = Registry("activation")  # experts.py
EXPERT_BACKENDS: Registry = Registry("expert_backend")  # experts.py
VARIANT_FIELDS = {"router": ROUTERS, "router_noise": ROUTER_NOISE, "score_func": SCORE_FUNCS,
                  "drop_priority": DROP_PRIORITIES, "load_balance": BALANCE_LOSSES, "activation": ACTIVATIONS,
                  "expert_backend": EXPERT_BACKENDS}
