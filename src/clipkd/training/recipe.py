"""Recipes are data: a dataclass of training settings, readable from JSON, overridable by flags."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from ..errors import ClipkdError
from ..fileio import read_json

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def recipe_path(name: str) -> Path:
    """The JSON file of a recipe shipped with clipkd (``clipkd/recipes/NAME.json``)."""
    path = RECIPES / f"{name}.json"
    if not path.is_file():
        shipped = sorted(p.stem for p in RECIPES.glob("*.json"))
        raise ClipkdError(f"clipkd ships no recipe '{name}' (shipped: {', '.join(shipped)})")
    return path


class Recipe:
    """Mixin for recipe dataclasses: ``from_file`` reads a JSON recipe and applies overrides."""

    @classmethod
    def from_file(cls, path: str | Path | None, **overrides: Any):
        """Read a recipe JSON; unknown keys are an error naming them; ``None`` overrides are ignored."""
        data = read_json(path, "recipe") if path else {}
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ClipkdError(f"recipe {path}: unknown key(s) {unknown}; known: {sorted(names)}")
        data.update({k: v for k, v in overrides.items() if v is not None and k in names})
        return cls(**data)

    @classmethod
    def shipped(cls, name: str, **overrides: Any):
        """A recipe shipped with clipkd (see :func:`recipe_path`), with ``overrides`` applied."""
        return cls.from_file(recipe_path(name), **overrides)

