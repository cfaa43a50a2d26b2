"""Run folders: one recipe per folder, one writer at a time.

A training command writes ``recipe.json`` (its settings and the identity of its inputs) into ``--out`` before
it trains. Re-running into the same folder resumes only when the recipe matches; another recipe is refused
with the differences named (or, with ``overwrite``, the old run's files are removed first), so a sweep that
reuses ``--out`` cannot relabel an old model with new settings. Settings that do not change the model being
trained (devices, precision, logger, loader workers) may change between a run and its resumption.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from ..distributed import barrier, ranks
from ..errors import ClipkdError
from ..fileio import check_out_dir, exclusive, read_json, write_json

log = logging.getLogger(__name__)
RECIPE = "recipe.json"
# settings a run may change when it resumes: where and how it runs, not what it trains
RUNTIME_KEYS = frozenset({"devices", "num_nodes", "strategy", "precision", "logger", "workers"})
# what a training command writes into its folder (removed by --overwrite); nothing else is touched
RUN_OUTPUTS = ("checkpoints", "logs", RECIPE, "run.json", "student.pt", "training_curves.png",
               "open_clip_model.pt", "cn_clip_model.pt", "views")


HASHED_BYTES = 64 << 20  # input files up to this size are identified by their content too (image lists, texts)


def input_identity(path: str | Path | None) -> Any:
    """What identifies an input: its absolute path, plus its size for a file and, up to :data:`HASHED_BYTES`, the
    SHA-256 of its content (a list re-selected to the same byte count is another input); a store: its teacher and
    rows."""
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        return str(path)  # a teacher spec, not a file
    ident: dict[str, Any] = {"path": str(p.resolve())}
    if p.is_file():
        ident["bytes"] = p.stat().st_size
        if ident["bytes"] <= HASHED_BYTES:
            ident["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
    elif (p / "manifest.json").is_file():
        m = read_json(p / "manifest.json", "store manifest")
        ident |= {"teacher": m.get("teacher"), "rows": m.get("count")}
    return ident


def run_recipe(command: str, cfg: Any, **inputs: Any) -> dict[str, Any]:
    """The identity of a run: the command, its settings (runtime-only ones left out) and its inputs."""
    settings = asdict(cfg) if is_dataclass(cfg) else dict(cfg)
    settings = {k: v for k, v in settings.items() if k not in RUNTIME_KEYS}
    recipe = {"command": command, "settings": settings,
              "inputs": {k: input_identity(v) for k, v in inputs.items() if v is not None}}
    return json.loads(json.dumps(recipe, default=str))


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} → {b!r}")
    return out


def check_run(out: str | Path, recipe: dict[str, Any], overwrite: bool | str = False) -> bool:
    """Before any work: may a run with ``recipe`` write into ``out``? Returns whether it would resume.

    Raises a one-line error when ``out`` is a file or not writable, or holds a run with another recipe (unless
    ``overwrite``), or a run of an older clipkd that recorded none. ``overwrite="changed"`` resumes a run of the
    same recipe and replaces any other (for folders a tool owns, e.g. the demo's and the benchmarks').
    """
    out = Path(out)
    if out.exists():
        check_out_dir(out, "run folder")
        if ranks().zero:  # ranks of one job share the folder; rank 0 holds it
            with exclusive(out, "run folder"):  # in use by another process: say so now, not after loading a teacher
                pass
    if overwrite is True or not out.is_dir():
        return False
    try:
        return _matches(out, recipe)
    except ClipkdError:
        if overwrite == "changed":
            return False
        raise


def recipe_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """How ``new`` differs from a recorded recipe. A setting the older recipe does not have (added by a newer
    clipkd) is no difference while it is off (false, 0, empty or None), nor is a part of an input's identity it did
    not record (a content hash): upgrading clipkd keeps runs resumable."""
    settings = {k: v for k, v in new.get("settings", {}).items() if k in old.get("settings", {}) or v}
    was = old.get("inputs", {})
    inputs = {k: {f: x for f, x in v.items() if f in was[k]} if isinstance(v, dict) and isinstance(was.get(k), dict)
              else v for k, v in new.get("inputs", {}).items()}
    return _differences(old, {**new, "settings": settings, "inputs": inputs})


def _matches(out: Path, recipe: dict[str, Any]) -> bool:
    old_file = out / RECIPE
    if old_file.is_file():
        old = read_json(old_file, "run recipe")
        diff = [] if old == recipe else recipe_differences(old, recipe)
        if not diff:
            return (out / "checkpoints" / "last.ckpt").is_file()
        raise ClipkdError(f"{out} holds a run with other settings ({'; '.join(diff[:4])}"
                          f"{'; …' if len(diff) > 4 else ''}); use another `out`, or `overwrite` to replace it")
    legacy = out / "run.json"
    if legacy.is_file():  # a run of clipkd before recipe.json: its run.json has the settings, not the inputs
        train = read_json(legacy, "run record").get("train")
        settings = {k: v for k, v in (train or {}).items() if k not in RUNTIME_KEYS}
        if train is not None and json.loads(json.dumps(settings, default=str)) == recipe["settings"]:
            log.warning("%s was made by an older clipkd that did not record its inputs; resuming it on its "
                        "settings alone", out)
            return (out / "checkpoints" / "last.ckpt").is_file()
    if any((out / name).exists() for name in ("checkpoints", "run.json", "student.pt")):
        raise ClipkdError(f"{out} holds a run with other settings, or one that recorded none; use another `out`, "
                          "or `overwrite` to replace it")
    return False


@contextmanager
def claim_run(out: str | Path, recipe: dict[str, Any], overwrite: bool | str = False) -> Iterator[bool]:
    """Hold ``out`` for this run (a lock; a second process gets a one-line error), check the recipe again under
    the lock, clear an old run when ``overwrite`` (or, with ``"changed"``, when its recipe differs), write
    ``recipe.json``; yields whether the run resumes. In a job of several ranks rank 0 does this and holds the
    folder; the other ranks wait for it, then train beside it (Lightning's DDP) and write nothing."""
    out = Path(out)
    if not ranks().zero:
        barrier()  # rank 0 has claimed the folder
        yield _matches(out, recipe)
        return
    with exclusive(out, "run folder"):
        if overwrite == "changed":
            try:
                _matches(out, recipe)
            except ClipkdError as e:
                log.info("replacing the run in %s: %s", out, e)
                _clear(out)
        elif overwrite:
            _clear(out)
        resuming = _matches(out, recipe)
        write_json(out / RECIPE, recipe)
        barrier()
        yield resuming


def _clear(out: Path) -> None:
    """Remove what a training command wrote into ``out`` (nothing else)."""
    for name in RUN_OUTPUTS:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
