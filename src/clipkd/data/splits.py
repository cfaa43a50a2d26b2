"""Seen/unseen class split files (JSON: ``{"seen": [...], "unseen": [...]}``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


def _known(classnames: Sequence[str], aliases: Mapping[str, str]) -> str:
    """A few known classes for an error message, as ``folder → name`` where they differ."""
    back = {v: k for k, v in aliases.items()}
    return ", ".join(f"'{back[c]}' → '{c}'" if back.get(c, c) != c else f"'{c}'" for c in list(classnames)[:6])


def load_split(path: str | Path, classnames: Sequence[str] | None = None,
               aliases: Mapping[str, str] | None = None, seen_only: bool = False) -> Split:
    """Read a split file; with ``classnames``, check it names exactly known classes.

    Classes of ``classnames`` that the file does not mention are an error too (unless ``seen_only``: a
    training run needs only its seen classes), because a generalized zero-shot score is meaningless when
    some test classes are neither seen nor unseen. ``aliases`` (class folder name → class name) lets a split
    file name classes by their folders (``t_shirt``) as well as by their names (``t shirt``).
    """
    data = read_json(path, "split file")
    if not isinstance(data, dict) or not isinstance(data.get("seen"), list) or not isinstance(
        data.get("unseen"), list
    ):
        raise ClipkdError(f"split file {path} must be a JSON object with lists 'seen' and 'unseen'")
    aliases = dict(aliases or {})
    known = set(classnames) if classnames is not None else set()

    def name(c: object) -> str:
        c = str(c)
        return aliases[c] if c not in known and c in aliases else c

    split = Split(seen=[name(c) for c in data["seen"]], unseen=[name(c) for c in data["unseen"]])
    both = set(split.seen) & set(split.unseen)
    if both:
        raise ClipkdError(f"split file {path} marks classes both seen and unseen: {sorted(both)[:5]}")
    if not split.seen:
        raise ClipkdError(f"split file {path} marks no class seen")
    if classnames is not None:
        unknown = [c for c in (split.seen if seen_only else split.seen + split.unseen) if c not in known]
        if unknown:
            raise ClipkdError(
                f"split file {path} names {len(unknown)} unknown class(es), e.g. {unknown[:5]}; "
                f"known classes (folder → name) include {_known(classnames, aliases)}"
            )
        if seen_only:
            return split
        missing = [c for c in classnames if c not in set(split.seen) | set(split.unseen)]
        if missing:
            raise ClipkdError(f"split file {path} does not place {len(missing)} class(es), e.g. {missing[:5]}")
    return split
