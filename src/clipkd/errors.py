"""The one exception type that the CLI turns into a one-line message, and the one check of settings' types."""

from __future__ import annotations

import types
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any


class ClipkdError(Exception):
    """A user-facing problem (bad path, mismatched store, unknown class...), reported in one line."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when the message is empty), for one-line errors."""
    return ((str(e).strip().splitlines() or [type(e).__name__])[0])[:limit]


class Interrupted(ClipkdError):
    """A job stopped before it finished (SIGTERM, Ctrl+C): reported in one line, exit code non-zero."""

    def __init__(self, message: str, exit_code: int = 143) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of type ``hint`` (the types recipes use: scalars, unions, Optional, dict, list, tuple,
    Literal, Path). A bool is not an int or a float; an int is a float."""
    if hint is Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is Path:
        return isinstance(value, str | Path)
    if origin is dict:
        return isinstance(value, dict) and all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args, strict=True))
        return all(_fits(v, args[0]) for v in value) if args else True
    return isinstance(value, origin or hint) if isinstance(origin or hint, type) else True


def _name(hint: Any) -> str:
    text = str(hint).replace("<class '", "").replace("'>", "").replace("typing.", "")
    return text.replace("NoneType", "None").replace("pathlib.Path", "path")


def check_fields(cfg: Any) -> None:
    """Every field of a settings dataclass (a recipe, a config) of its declared type: one line naming the first
    field that is not (``{"lr": "fast"}``, ``{"lr": true}``), before any work."""
    if not is_dataclass(cfg):
        return
    hints = typing.get_type_hints(type(cfg))
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in hints and not _fits(value, hints[f.name]):
            raise ClipkdError(f"`{f.name}` must be {_name(hints[f.name])}, got {value!r} "
                              f"({type(value).__name__})")
