"""One registry per family of variants (routers, router noise, drop priorities, activations, expert
backends): a name -> implementation mapping whose ``get`` names the valid choices when a name is wrong.
``MoEConfig`` validates its fields against these registries, so adding a variant is one entry."""

from __future__ import annotations

from typing import Dict, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Args:
        field: the ``MoEConfig`` field that names an entry (used in error messages).
        entries: name -> implementation.
    """

    def __init__(self, field: str, entries: Dict[str, T]):
        self.field = field
        self._entries = dict(entries)

    def get(self, name: str) -> T:
        """The entry called ``name``; ValueError listing the valid names otherwise."""
        if name not in self._entries:
            raise ValueError(f"MoEConfig.{self.field}={name!r} is unknown; use one of "
                             f"{', '.join(map(repr, self._entries))}")
        return self._entries[name]

    def register(self, name: str, entry: T) -> T:
        self._entries[name] = entry
        return entry

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)
