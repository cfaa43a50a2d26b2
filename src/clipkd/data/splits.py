"""Seen/unseen class split files (JSON: ``{"seen": [...], "unseen": [...]}``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ClipkdError
from ..fileio import read_json, write_json


@dataclass(frozen=True)
class Split:
    """Class names marked seen (trained on) and unseen (only met at test time)."""

    seen: list[str]
    unseen: list[str]

    def seen_mask(self, classnames: Sequence[str]) -> list[bool]:
        """For each of ``classnames``, whether it is seen."""
        seen = set(self.seen)
        return [c in seen for c in classnames]


def write_split(path: str | Path, split: Split) -> Path:
    """Atomically write a split file."""
    return write_json(path, {"seen": list(split.seen), "unseen": list(split.unseen)})


def load_split(path: str | Path, classnames: Sequence[str] | None = None) -> Split:
    """Read a split file; with ``classnames``, check it names exactly known classes.

    Classes of ``classnames`` that the file does not mention are an error too, because a
    generalized zero-shot score is meaningless when some test classes are neither seen nor unseen.
    """
    data = read_json(path, "split file")
    if not isinstance(data, dict) or not isinstance(data.get("seen"), list) or not isinstance(
        data.get("unseen"), list
    ):
        raise ClipkdError(f"split file {path} must be a JSON object with lists 'seen' and 'unseen'")
    split = Split(seen=[str(c) for c in data["seen"]], unseen=[str(c) for c in data["unseen"]])
    both = set(split.seen) & set(split.unseen)
    if both:
        raise ClipkdError(f"split file {path} marks classes both seen and unseen: {sorted(both)[:5]}")
    if not split.seen:
        raise ClipkdError(f"split file {path} marks no class seen")
    if classnames is not None:
        known = set(classnames)
        unknown = [c for c in split.seen + split.unseen if c not in known]
        if unknown:
            raise ClipkdError(
                f"split file {path} names {len(unknown)} unknown class(es), e.g. {unknown[:5]}; "
                f"known classes include {sorted(known)[:5]}"
            )
        missing = [c for c in classnames if c not in set(split.seen) | set(split.unseen)]
        if missing:
            raise ClipkdError(f"split file {path} does not place {len(missing)} class(es), e.g. {missing[:5]}")
    return split
