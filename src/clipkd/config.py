"""Settings objects for the entry points with long keyword lists (:class:`~clipkd.search.planning.IndexConfig`,
:class:`~clipkd.export.common.ExportConfig`, :class:`~clipkd.search.source.SourceConfig`), passed the way
:class:`~clipkd.training.distill.TrainConfig` is; the old keyword arguments keep working on top of them."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any, TypeVar

T = TypeVar("T")


def settle(cls: type[T], cfg: Any, given: dict[str, Any], what: str, first: str | None = None) -> T:
    """``cfg`` (a ``cls``, or None for its defaults) with the settings ``given`` as keywords on top. A ``cfg`` that
    is not a ``cls`` is the value of field ``first`` passed by position, as the calls before ``cls`` existed did.
    An unknown keyword is a TypeError naming it and the fields there are."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise TypeError(f"{what}() got unexpected keyword argument(s) {', '.join(unknown)} "
                        f"({cls.__name__} holds {', '.join(sorted(names))})")
    if cfg is not None and not isinstance(cfg, cls):
        if first is None:
            raise TypeError(f"{what}(): `cfg` must be a {cls.__name__}, got {type(cfg).__name__}")
        if first in given:
            raise TypeError(f"{what}() got `{first}` twice (by position and by keyword)")
        cfg, given = None, {first: cfg, **given}
    return replace(cfg if cfg is not None else cls(), **given)
