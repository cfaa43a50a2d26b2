"""Registries: names → pluggable parts (losses, distillation terms, teacher backends), as timm registers models.

Adding a part is one decorated function in one file; the CLI's choices, recipe validation and error
messages all read the registry, so nothing else has to learn the new name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .errors import ClipkdError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered part: its name, the object, a one-line help text and free-form metadata."""

    name: str
    obj: T
    help: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """An ordered name → part mapping with a ``register`` decorator and one-line lookup errors."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, help: str = "", **meta: Any) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name`` (re-registering a name replaces it)."""

        def wrap(obj: T) -> T:
            self._entries[name] = Entry(name, obj, help or (getattr(obj, "__doc__", "") or "").split("\n")[0], meta)
            return obj

        return wrap

    def remove(self, name: str) -> None:
        """Unregister ``name`` (e.g. a plugin's part, or a test's)."""
        self._entries.pop(name, None)

    def entry(self, name: str) -> Entry[T]:
        """The entry of ``name``; an unknown name is a :class:`ClipkdError` listing the choices."""
        try:
            return self._entries[name]
        except KeyError:
            raise ClipkdError(f"unknown {self.what} '{name}' (choose from {', '.join(self._entries)})") from None

    def get(self, name: str) -> T:
        """The object registered as ``name``."""
        return self.entry(name).obj

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what}: {', '.join(self._entries)})"
