"""``clipkd`` command line: a thin layer over the package's functions."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from .errors import ClipkdError, Interrupted

COMMANDS: dict[str, Callable[[argparse.Namespace], int | None]] = {}
ARGUMENTS: dict[str, Callable[[Any], None]] = {}
# the order of ``clipkd --help``: the pipeline's
COMMAND_ORDER = ("synth", "clip-train", "eval-retrieval", "prompts", "embed-text", "embed-images", "download",
                 "distill", "train-supervised", "eval", "predict", "dataset", "store-import", "store-export",
                 "import-text", "index", "search", "serve", "convert-weights", "export", "select", "source",
                 "procedural-pool", "demo")


def command(name: str, arguments: Callable[[Any], None]) -> Callable:
    """Register sub-command ``name``: ``arguments(subparsers)`` declares its flags, the decorated ``fn(args)`` is its
    handler (a thin mapping onto one API call); the two sit side by side in this file."""

    def wrap(fn: Callable[[argparse.Namespace], int | None]) -> Callable:
        COMMANDS[name], ARGUMENTS[name] = fn, arguments
        return fn

    return wrap


def _default(fn: Callable, name: str) -> Any:
    """The API's default of parameter (or dataclass field) ``name`` of ``fn``: help texts show it, flags never restate
    it (a flag the user did not give is not passed at all)."""
    import inspect

    return inspect.signature(fn).parameters[name].default


def _kwargs(fn: Callable, a: argparse.Namespace, **fixed: Any) -> dict[str, Any]:
    """The flags the user gave that are parameters of ``fn``, as keywords (plus ``fixed``): what was not given is
    left to ``fn``'s own default."""
    import inspect

    names = inspect.signature(fn).parameters
    return {k: v for k, v in vars(a).items() if k in names} | fixed


def _given_fields(cls: Any, a: argparse.Namespace) -> dict[str, Any]:
    """The flags the user gave that are fields of dataclass ``cls``."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in vars(a).items() if k in names}


def _settings(cls: Any, a: argparse.Namespace) -> Any:
    """A settings dataclass (``IndexConfig``, ``ExportConfig``, ``SourceConfig``) of the flags given: the fields
    not given keep the dataclass's defaults."""
    return cls(**_given_fields(cls, a))


def _given_only(parser: argparse.ArgumentParser) -> None:
    """Every optional flag of ``parser`` and its sub-parsers is absent from the namespace unless given
    (``argparse.SUPPRESS``), so that the API's defaults hold, stated once."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _given_only(child)
        elif action.option_strings and not action.required and action.dest not in ("help", "version"):
            action.default = argparse.SUPPRESS


def _device_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="auto (GPU if present), cpu, cuda, cuda:N (default: auto)")
    from .distributed import PRECISIONS

    p.add_argument("--precision", choices=PRECISIONS,
                   help="auto = fp16 autocast on GPU, fp32 on CPU (half precision is refused on CPU)")


def _int_at_least(low: int, what: str) -> Callable[[str], int]:
    """argparse type: a whole number ≥ ``low`` (a one-line usage error otherwise, before any work)."""

    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got '{value}'") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"must be {what}, got {n}")
        return n

    return parse


_count = _int_at_least(1, "at least 1")  # batch sizes, epochs, shard sizes
_workers = _int_at_least(0, "0 or more")  # loader processes; 0 = decode in the main process


def _trainer_flags(p: argparse.ArgumentParser) -> None:
    from .training.recipe import LOGGERS

    _device_flags(p)
    g = p.add_argument_group("trainer (Lightning)")
    g.add_argument("--devices", type=lambda v: int(v) if v.isdigit() else v,
                   help="devices to train on: a number or 'auto' (default 1; --device cuda:N picks GPU N)")
    g.add_argument("--num-nodes", type=_count, help="machines (default 1)")
    g.add_argument("--strategy", help="Lightning strategy, e.g. ddp (default auto)")
    g.add_argument("--logger", choices=LOGGERS, help="also log to TensorBoard or W&B; the CSV log is always "
                   "written (default csv)")
    g.add_argument("--overwrite", action="store_true", help="replace a run of other settings in --out (without it, "
                   "--out resumes a run of the same settings and refuses any other)")


def _train_flags(p: argparse.ArgumentParser) -> None:
    from .training.distill import AUGMENTS, TrainConfig

    d = TrainConfig()
    p.add_argument("--config", help="recipe JSON with any TrainConfig fields, or the name of a shipped recipe "
                   "(e.g. demo-student); flags given here override it")
    p.add_argument("--student", help=f"any timm model name (default {d.student})")
    p.add_argument("--epochs", type=_count, help=f"default {d.epochs}")
    p.add_argument("--batch-size", type=_count, help=f"default {d.batch_size}")
    p.add_argument("--lr", type=float, help=f"peak AdamW learning rate, warmup then cosine (default {d.lr})")
    p.add_argument("--weight-decay", type=float, help=f"default {d.weight_decay}")
    p.add_argument("--image-size", type=int, help="student input size (default: the teacher's)")
    p.add_argument("--augment", choices=AUGMENTS, help=f"default {d.augment}")
    p.add_argument("--pretrained", nargs="?", const=True, metavar="FILE",
                   help="start from ImageNet weights: timm's hub weights, or a local weights file for the "
                   "architecture (.pth/.safetensors; works offline)")
    p.add_argument("--init", help="a trained clipkd student (run folder or student.pt) to start from (fine-tuning, "
                   "e.g. with --sparsity)")
    p.add_argument("--sparsity", choices=["2:4"], help="prune to NVIDIA's 2:4 structured pattern when training "
                   "starts and keep it (fine-tune a dense student with --init)")
    p.add_argument("--qat", action="store_true", help="quantization-aware fine-tuning of --init for "
                   "INT8; writes student.int8.onnx (for when `export --int8` loses too much)")
    p.add_argument("--workers", type=_workers, help="data-loader processes (default: one per core, max 8)")
    p.add_argument("--seed", type=int, help=f"default {d.seed}")
    p.add_argument("--split", help="split file; train only on the classes it marks seen")
    p.add_argument("--out", required=True, help="run folder (checkpoints, logs, student.pt); re-running resumes")
    _trainer_flags(p)


def _recipe(cls, a: argparse.Namespace, **extra):
    """``cls`` from ``--config`` (a JSON file or a shipped recipe's name) with the flags given as overrides."""
    from .training.recipe import RECIPES

    overrides = _given_fields(cls, a) | extra
    config = getattr(a, "config", None)
    if config and not Path(config).exists() and (RECIPES / f"{config}.json").is_file():
        return cls.shipped(config, **overrides)
    return cls.from_file(config, **overrides)


def _or_auto(convert: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    """An argparse type: ``auto``, or ``convert(text)`` (an error naming ``what`` otherwise)."""

    def parse(text: str) -> Any:
        if text == "auto":
            return text
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} or auto, got '{text}'") from None

    return parse


_views = _or_auto(int, "an integer ≥ 0")
_share_or_auto = _or_auto(float, "a number in [0, 1]")


def _train_config(a: argparse.Namespace):
    from .students.losses import DISTILL_TERMS
    from .training.distill import TrainConfig

    cfg = _recipe(TrainConfig, a)
    terms = dict(cfg.terms)
    for name in DISTILL_TERMS:
        weight = getattr(a, f"{name}_weight", None)
        if weight is not None:
            terms[name] = weight
    cfg.terms = terms
    return cfg


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``clipkd`` parser: the global flags, then each registered command's own declaration (``@command``); with
    ``only``, that command's alone (a declaration imports its API module: ``clipkd serve`` of a deployed model must
    not import the training stack)."""
    missing = set(COMMANDS) ^ set(COMMAND_ORDER)
    if missing:  # a command registered but not ordered, or ordered but not registered
        raise RuntimeError(f"COMMAND_ORDER and the registered commands differ: {sorted(missing)}")
    parser = argparse.ArgumentParser(prog="clipkd", description="Distill CLIP teachers into small, fast students.")
    parser.add_argument("--version", action="version", version=f"clipkd {__import__('clipkd').__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors (no progress notes)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug messages too")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name in COMMAND_ORDER:
        if only is None or name == only:
            ARGUMENTS[name](sub)
    for child in sub.choices.values():
        _given_only(child)
    return parser


def _args_index(sub: Any) -> None:
    from .search.planning import BACKENDS, KINDS, IndexConfig

    batch = f"images per forward pass (default {_default(IndexConfig, 'batch_size')})"
    p = sub.add_parser("index", help="a FAISS search index over an image collection (build, add, remove, "
                       "compact)")
    isub = p.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    q = isub.add_parser("build", help="embed images with a model into a new (or resumed) index")
    q.add_argument("--model", required=True, help="clip-train run folder, distilled student (run folder or "
                   "student.pt), or teacher spec")
    q.add_argument("--images", required=True, help="image folder (class sub-folders become labels), path,label list, "
                   "or Chinese-CLIP *_imgs.tsv")
    q.add_argument("--out", required=True, help="index folder; re-running resumes an interrupted build")
    q.add_argument("--kind", choices=KINDS,
                   help="auto (default): exact up to 30k images, HNSW while it fits --max-memory, IVF-PQ (re-ranked "
                   "from the store) beyond; its recall@10 is measured and shown")
    q.add_argument("--max-memory", metavar="SIZE", help="memory the index may take while built (4G, 512M; default "
                   "half this machine's): the store is streamed, the kind chosen to fit")
    q.add_argument("--backend", choices=BACKENDS, help="where the vectors live: faiss (default: a file in "
                   "the index folder) or milvus (a collection at --uri)")
    q.add_argument("--uri", help="with --backend milvus: a Milvus Lite file (index.db) or a server (http://host:19530)")
    q.add_argument("--collection", help="with --backend milvus: the collection (default: the index folder's name)")
    q.add_argument("--text-model", help="for a student: its teacher (spec or clip-train run), for text queries")
    q.add_argument("--batch-size", type=_count, help=batch)
    q.add_argument("--workers", type=_workers, help="decode processes (default: one per core, max 8)")
    _device_flags(q)
    q = isub.add_parser("add", help="embed more images into an index (with the model that built it; appended, and a "
                        "running serve picks them up)")
    q.add_argument("--index", required=True)
    q.add_argument("--images", required=True, help="image folder, path,label list or Chinese-CLIP *_imgs.tsv")
    q.add_argument("--images-root", help="where the index's collection root is on this machine (default: where "
                   "index.json records it, relative to the index)")
    q.add_argument("--batch-size", type=_count, help=batch)
    q.add_argument("--workers", type=_workers, help="decode processes (default: one per core, max 8)")
    _device_flags(q)
    q = isub.add_parser("remove", help="drop images from an index (marked: queries skip them at once)")
    q.add_argument("--index", required=True)
    q.add_argument("--images-root", help="where the index's collection root is on this machine")
    q.add_argument("paths", nargs="+", help="keys as the index lists them (relative to its collection root), or "
                   "image paths (absolute, or relative to here)")
    q = isub.add_parser("compact", help="rewrite an index without its removed images (after many removals)")
    q.add_argument("--index", required=True)
    q.add_argument("--max-memory", metavar="SIZE", help="memory budget (default: the one it was built with)")


@command("index", _args_index)
def _index(a: argparse.Namespace) -> None:
    from .search.planning import IndexConfig
    from .search.writers import add_to_index, build_index, compact_index, remove_from_index

    if a.index_command == "remove":
        n = remove_from_index(index_dir=a.index, paths=a.paths, images_root=getattr(a, "images_root", None))
        print(f"removed {n} image(s) from {a.index}")
        return
    if a.index_command == "build":
        idx = build_index(**_kwargs(build_index, a, cfg=_settings(IndexConfig, a)))
    elif a.index_command == "compact":
        idx = compact_index(a.index, getattr(a, "max_memory", None))
    else:
        idx = add_to_index(**_kwargs(add_to_index, a, index_dir=a.index))
    i = idx.info
    print(f"index {idx.root}: {i['rows']} images ({i['skipped']} skipped), {i['kind']}, recall@10 vs exact "
          f"{i['recall@10']:.3f}, model {i['identity']}, generation {i['generation']}")


def _args_search(sub: Any) -> None:
    from .search.index import SearchIndex

    p = sub.add_parser("search", help="top-k images of an index for an image or a text query (+ a PNG grid)")
    p.add_argument("--index", required=True)
    qq = p.add_mutually_exclusive_group(required=True)
    qq.add_argument("--image", help="query image file")
    qq.add_argument("--text", help="query text (the model's text tower, or a student's teacher's)")
    p.add_argument("--k", type=_count, help=f"results (default {_default(SearchIndex.search, 'k')})")
    p.add_argument("--out", help="write a PNG grid (query, then its results) here")
    p.add_argument("--label", help="only images of this label (class folder or the list's label column)")
    p.add_argument("--where", action="append", type=_column_value, metavar="COLUMN=VALUE",
                   help="only images whose image-list column has this value (repeat for more: all must match)")
    p.add_argument("--text-model", help="for a student index built without one: its teacher, for --text")
    _device_flags(p)


@command("search", _args_search)
def _search(a: argparse.Namespace) -> None:
    from .search.index import SearchIndex

    idx = SearchIndex(a.index)
    where = dict(a.where) if getattr(a, "where", None) else None
    idx.allowed(getattr(a, "label", None), where)  # an unknown column: one line before the model loads
    idx.load_encoder(**_kwargs(idx.load_encoder, a))
    hits = idx.search(**_kwargs(idx.search, a, where=where))
    if not hits:
        print("no image matches the filter" if getattr(a, "label", None) or where else "no results")
    for rank, h in enumerate(hits, 1):
        print(f"{rank:3d}  {h['score']:.4f}  {h['path']}" + (f"  [{h['label']}]" if h["label"] else ""))
    if getattr(a, "out", None):
        print(f"grid -> {idx.save_grid(hits, **_kwargs(idx.save_grid, a))}")


def _column_value(text: str) -> tuple[str, str]:
    column, sep, value = text.partition("=")
    if not sep or not column:
        raise argparse.ArgumentTypeError(f"expected COLUMN=VALUE, got '{text}'")
    return column, value


def _args_serve(sub: Any) -> None:
    from .search.service import serve

    p = sub.add_parser("serve", help="an HTTP search service and web page over an index (FastAPI + uvicorn)")
    p.add_argument("--index", required=True)
    p.add_argument("--host", help=f"address to listen on (default {_default(serve, 'host')}: this machine only)")
    p.add_argument("--port", type=_count, help=f"default {_default(serve, 'port')}")
    p.add_argument("--no-batch", action="store_true", help="one forward pass per query (no dynamic batching)")
    p.add_argument("--public-url", help="where clients reach this server (e.g. https://search.example.org behind a "
                   "proxy): the base of every result URL, never the request's Host header (default: the listening "
                   "address)")
    p.add_argument("--show-paths", action="store_true", help="add each result's path relative to the collection's "
                   "root (by default answers carry ids and URLs, never the server's file paths)")
    p.add_argument("--images", help="where the collection's images are on this machine (default: where the index "
                   "records them, relative to the index folder)")
    p.add_argument("--workers", type=_count, help="server processes (default 1); each swaps to a new generation of "
                   "the index on its own")
    p.add_argument("--threads", type=_count, help="threads of each server process for the model and FAISS "
                   "(default: every core with one worker; with --workers, the cores shared out among them)")
    p.add_argument("--token-file", help="a file whose first line is the bearer token that POST /index/add and "
                   "/index/remove require (default: $CLIPKD_TOKEN; neither: those routes are off)")
    p.add_argument("--reload-s", type=float, help=f"how often to look for a newer generation of the index, written "
                   f"by `clipkd index add/remove/compact` (default {_default(serve, 'reload_s')} s; 0: never)")


@command("serve", _args_serve)
def _serve(a: argparse.Namespace) -> None:
    from .search.service import serve

    serve(**_kwargs(serve, a, index_dir=a.index, batch=not getattr(a, "no_batch", False)))


def _selection_flags(p: argparse.ArgumentParser, d: Callable[[str], Any]) -> None:
    """The flags ``select`` and ``source`` share: how many images per class and which ones."""
    from .search.select import EXPAND

    p.add_argument("--per-class", type=_count,
                   help=f"images per class, its most typical first (default {d('per_class')})")
    p.add_argument("--min-similarity", type=float, help="cosine a chosen image must reach (default: none; look at "
                   "`clipkd search --text` scores of your model to pick one)")
    p.add_argument("--min-per-class", type=int, help="a class that gets fewer is listed with how many it got "
                   f"(default {d('min_per_class')})")
    p.add_argument("--duplicate", type=float, help="cosine above which an image is a near-copy of one already chosen "
                   f"(default {d('duplicate')})")
    p.add_argument("--background", help="file of background phrases, one per line, an image must score below its "
                   "class against ('none': no background rejection; default: clipkd's generic bank)")
    p.add_argument("--margin", type=float, help="best-minus-second-best class cosine an image must clear (default: a "
                   "cut per class chosen from the pool's margins)")
    p.add_argument("--examples", help="labelled images of some classes (your training folder): their picks must "
                   "resemble them; with --examples-store")
    p.add_argument("--examples-store", help="the store of --examples' teacher embeddings (embed-images)")
    p.add_argument("--split", help="with --examples: split.json; only its seen classes' images are examples")
    p.add_argument("--example-quantile", type=float, help="with --examples: the share of a class's own examples "
                   f"that may lie farther from their mean than a kept image (default {d('example_quantile')})")
    p.add_argument("--expand", choices=EXPAND, help="find the rest of a class through the teacher's image space: "
                   "seeds (a cut per class from its own picks and examples), vote (neighbours' labels); none: the "
                   f"text's picks only (default {d('expand')})")


def _args_select(sub: Any) -> None:
    from .search.select import select_images

    d = lambda name: _default(select_images, name)  # noqa: E731
    p = sub.add_parser("select", help="a CLIP-filtered training list: top images per class prompt from an "
                       "indexed pool")
    p.add_argument("--index", required=True, help="index of the unlabelled pool")
    p.add_argument("--prompts", required=True, help="prompts.json (from `clipkd prompts`)")
    _selection_flags(p, d)
    p.add_argument("--text-model", help="for a student index built without one: its teacher")
    p.add_argument("--out", required=True, help="path,label,similarity CSV (distill and embed-images read it)")
    _device_flags(p)


@command("select", _args_select)
def _select(a: argparse.Namespace) -> None:
    from .search.select import select_images

    sel = select_images(**_kwargs(select_images, a, index_dir=a.index))
    total = sum(len(v) for v in sel.chosen.values())
    print(f"{total} images for {len(sel.chosen)} classes -> {sel.out}")


def _args_source(sub: Any) -> None:
    from .search.source import SourceConfig

    d = lambda name: _default(SourceConfig, name)  # noqa: E731
    p = sub.add_parser("source", help="the first seed's step 1: the teacher selects training images for every class "
                       "prompt (seen and unseen) from an unlabelled pool, for distill --extra-images")
    p.add_argument("--teacher", required=True, help="teacher spec or clip-train run (it embeds the pool once)")
    p.add_argument("--pool", required=True, help="the unlabelled collection: folder, image list or WebDataset shards")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="prompts.json (from `clipkd prompts`)")
    src.add_argument("--classes", help="ImageFolder or class-name file (prompts built with --templates)")
    p.add_argument("--templates", help=f"with --classes: openai, simple, none or a file (default {d('templates')})")
    p.add_argument("--out", required=True, help="folder: index/ (the pool's index and store), selected.csv, "
                   "selected.png; re-running resumes the pool's embedding")
    _selection_flags(p, d)
    p.add_argument("--batch-size", type=_count, help=f"images per forward pass (default {d('batch_size')})")
    p.add_argument("--workers", type=_workers, help="decode processes (default: one per core, max 8)")
    p.add_argument("--device", help="auto (GPU if present), cpu, cuda, cuda:N (default: auto)")


@command("source", _args_source)
def _source(a: argparse.Namespace) -> None:
    from .search.source import SourceConfig, source_pool

    r = source_pool(**_kwargs(source_pool, a, cfg=_settings(SourceConfig, a)))
    total = sum(len(v) for v in r.selection.chosen.values())
    print(f"{total} images for {len(r.selection.chosen)} classes -> {r.selected} (what each class got: {r.png}; "
          f"per class kept and turned down: {r.selected.parent / 'summary.json'})")
    if r.selection.short:
        print(f"{len(r.selection.short)} class(es) got fewer than --min-per-class: " +
              "; ".join(f"{c} {n} ({r.selection.why_short[c]})" for c, n in r.selection.short.items()))
    print(f"train on them: clipkd distill ... --extra-images {r.selected} --extra-store {r.store}")


def _args_synth(sub: Any) -> None:
    from .data.synth import WorldConfig, synthesize

    d = lambda name: f"default {_default(WorldConfig, name)}"  # noqa: E731
    p = sub.add_parser("synth", help="generate the demo world (coloured shapes, captions, seen/unseen split)")
    p.add_argument("--out", required=True, help="folder to write (reused when already complete)")
    p.add_argument("--seed", type=int, help=d("seed"))
    p.add_argument("--shapes", type=int, dest="n_shapes", metavar="N",
                   help=f"number of shapes (max 10, {d('n_shapes')})")
    p.add_argument("--colours", type=int, dest="n_colours", metavar="N",
                   help=f"number of colours (max 10, {d('n_colours')})")
    p.add_argument("--image-size", type=int, help=f"pixels ({d('image_size')})")
    p.add_argument("--train-per-class", type=int, help=d("train_per_class"))
    p.add_argument("--val-per-class", type=int, help=d("val_per_class"))
    p.add_argument("--test-per-class", type=int, help=d("test_per_class"))
    p.add_argument("--unseen-per-shape", type=int, help=f"unseen colours per shape ({d('unseen_per_shape')})")
    p.add_argument("--workers", type=_workers, help=f"default {_default(synthesize, 'workers')}")


@command("synth", _args_synth)
def _synth(a: argparse.Namespace) -> None:
    from .data.synth import WorldConfig, synthesize

    print(f"demo world in {synthesize(**_kwargs(synthesize, a, cfg=WorldConfig(**_kwargs(WorldConfig, a))))}")


def _args_procedural_pool(sub: Any) -> None:
    from .data.procedural import KINDS, make_pool

    d = lambda name: _default(make_pool, name)  # noqa: E731
    p = sub.add_parser("procedural-pool", help="a pool made from nothing for GZSL without unlabelled images: random "
                       "strokes, dead leaves, mosaics of the seen images (for distill --extra-images)")
    p.add_argument("--out", required=True, help="folder to write (re-running resumes)")
    p.add_argument("--images", type=_count, required=True, help="how many (e.g. as many as the training images)")
    p.add_argument("--size", type=_count, required=True, help="pixels (the teacher's input side)")
    p.add_argument("--seed", type=int, help=f"default {d('seed')}")
    p.add_argument("--kinds", nargs="+", choices=KINDS, help=f"default: {' '.join(KINDS)} (mosaic only with "
                   "--mix-from)")
    p.add_argument("--mix-from", help="the labelled training images the mosaics crop")
    p.add_argument("--split", help="split.json: mosaics crop only the seen classes' images")


@command("procedural-pool", _args_procedural_pool)
def _procedural_pool(a: argparse.Namespace) -> None:
    from .data.procedural import make_pool

    out = make_pool(**_kwargs(make_pool, a))
    print(f"{a.images} images in {out}; train on them: clipkd distill ... --teacher T --extra-images {out}")


def _args_clip_train(sub: Any) -> None:
    from .students.losses import KD_LOSSES

    p = sub.add_parser("clip-train", help="train / fine-tune a CLIP (ClipLoss), optionally distilling a teacher CLIP")
    p.add_argument("--images", required=True, help="image root the caption paths are relative to, a "
                   "Chinese-CLIP {split}_imgs.tsv, or WebDataset shards ('shards/{00000..00099}.tar')")
    p.add_argument("--captions", help="CSV with columns path,caption, or a Chinese-CLIP {split}_texts.jsonl "
                   "(not needed for WebDataset shards: their .txt members)")
    p.add_argument("--out", required=True, help="run folder; writes the weights and run.json; re-running resumes")
    p.add_argument("--config", help="recipe JSON with any ClipTrainConfig fields; flags given here override it")
    p.add_argument("--model", help="student spec: open_clip:ARCH[@TAG|@FILE] or cn_clip:ARCH[@FILE|@random]; a "
                   "bare name means open_clip (default open_clip:clipkd-tiny)")
    p.add_argument("--pretrained", help="open_clip tag or checkpoint file to start from (same as MODEL@...)")
    p.add_argument("--inherit", help="a larger CLIP of the same family (spec or clip-train run) whose weights start "
                   "the student where tensor names match: leading slices, first layers (TinyCLIP's inheritance)")
    kd = p.add_argument_group("distillation (on when --teacher or --store is given)")
    kd.add_argument("--teacher", help="teacher spec, run online each batch (and embeds captions for affinity)")
    kd.add_argument("--store", help="teacher image embeddings of --images from embed-images (computed once); a store "
                    "of views (embed-images --views K) adds each image's stored views to the distillation term")
    kd.add_argument("--extra-images", help="images without captions (e.g. the gallery you will search) trained with "
                    "the distillation term alone; targets from --store or --extra-store")
    kd.add_argument("--extra-store", help="the teacher's store of --extra-images (default: --store)")
    kd.add_argument("--kd-loss", choices=KD_LOSSES.names(), help="; ".join(
        f"{n}: {KD_LOSSES.entry(n).help}" for n in KD_LOSSES) + " (default cosine)")
    kd.add_argument("--kd-weight", type=float, help="weight of the distillation loss (default 0.5)")
    kd.add_argument("--kd-text-weight", type=float, help="weight of text-tower KD: the student's caption embeddings "
                    "onto the teacher's (needs --teacher for its text tower; default 0: off)")
    p.add_argument("--val-images", help="validation images (retrieval metrics each epoch, best epoch kept)")
    p.add_argument("--val-captions", help="validation captions (CSV or JSONL)")
    p.add_argument("--epochs", type=_count)
    p.add_argument("--batch-size", type=_count)
    p.add_argument("--lr", type=float, help="peak AdamW learning rate, warmup then cosine decay")
    p.add_argument("--warmup", type=float, help="warmup: fraction of all steps (<1) or a number of steps")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--accumulate", type=_count, help="gradient accumulation: batches per optimizer step")
    p.add_argument("--freeze-image", action="store_true", help="train the text tower only")
    p.add_argument("--freeze-text", action="store_true", help="train the image tower only")
    p.add_argument("--workers", type=_workers)
    p.add_argument("--seed", type=int)
    _trainer_flags(p)


@command("clip-train", _args_clip_train)
def _clip_train(a: argparse.Namespace) -> None:
    from .training.clip_train import ClipTrainConfig, clip_train, model_spec

    model, pretrained = getattr(a, "model", None), getattr(a, "pretrained", None)
    extra = {"model": model_spec(model or ClipTrainConfig.model, pretrained)} if model or pretrained else {}
    r = clip_train(**_kwargs(clip_train, a, captions=getattr(a, "captions", None), cfg=_recipe(ClipTrainConfig, a,
                                                                                            **extra)))
    print(f"model: {r.spec}")


def _args_eval_retrieval(sub: Any) -> None:
    from .evaluation.retrieval import evaluate_retrieval

    p = sub.add_parser("eval-retrieval", help="text<->image recall and image->image R@K / mAP@K / P@10")
    p.add_argument("--model", required=True, help="CLIP spec or clip-train run folder; or an image model (student, "
                   "exported .onnx) for image->image metrics")
    p.add_argument("--images", required=True, help="image folder (first folder of a path = its label for "
                   "image->image), or a Chinese-CLIP {split}_imgs.tsv")
    p.add_argument("--captions", help="CSV path,caption or Chinese-CLIP JSONL: adds text<->image recall")
    p.add_argument("--text-model", help="for a distilled student: its teacher (spec, clip-train run or exported text "
                   "tower), whose text tower queries the student's images")
    p.add_argument("--max-queries", type=_count, help="image->image queries sampled (default "
                   f"{_default(evaluate_retrieval, 'max_queries')})")
    p.add_argument("--batch-size", type=_count, help=f"default {_default(evaluate_retrieval, 'batch_size')}")
    p.add_argument("--workers", type=_workers)
    p.add_argument("--out", help="results JSON; a PNG grid of queries and top-10 results is written beside it")
    p.add_argument("--device")


@command("eval-retrieval", _args_eval_retrieval)
def _eval_retrieval(a: argparse.Namespace) -> None:
    from .evaluation.retrieval import evaluate_retrieval

    r = evaluate_retrieval(**_kwargs(evaluate_retrieval, a))
    print(json.dumps(r.to_dict(), indent=2))


def _args_prompts(sub: Any) -> None:
    from .prompts import embed_text

    p = sub.add_parser("prompts", help="class names + templates -> prompts file")
    p.add_argument("--classes", required=True, help="ImageFolder (class = sub-folder) or text file, one class per line")
    p.add_argument("--templates", help="openai (open_clip's 80), simple (7), none, or a file of '{}' templates "
                   f"(default {_default(embed_text, 'templates')})")
    p.add_argument("--out", required=True, help=".json ({class: [prompts]}) or .txt (seed style, one per class)")


@command("prompts", _args_prompts)
def _prompts(a: argparse.Namespace) -> None:
    from .prompts import build_prompts, embed_text, load_classnames, load_templates, write_prompts

    prompts = build_prompts(load_classnames(a.classes), load_templates(getattr(a, "templates",
                                                                             _default(embed_text, "templates"))))
    print(f"{sum(map(len, prompts.values()))} prompts for {len(prompts)} classes -> {write_prompts(a.out, prompts)}")


def _args_embed_text(sub: Any) -> None:
    from .prompts import embed_text

    p = sub.add_parser("embed-text", help="prompts -> one normalised, template-averaged text embedding per class")
    p.add_argument("--teacher", required=True, help="teacher spec, e.g. open_clip:ViT-B-32@laion2b_s34b_b79k")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="prompts .json or a seed-style text_prompts.txt")
    src.add_argument("--classes", help="ImageFolder or class-name file (prompts built with --templates)")
    p.add_argument("--templates", help="with --classes: openai, simple, none or a file (default "
                   f"{_default(embed_text, 'templates')})")
    p.add_argument("--out", required=True, help="output .npz")
    _device_flags(p)


@command("embed-text", _args_embed_text)
def _embed_text(a: argparse.Namespace) -> None:
    from .prompts import embed_text

    emb = embed_text(**_kwargs(embed_text, a))
    print(f"{len(emb.classnames)} class embeddings ({emb.embeddings.shape[1]}-d) -> {a.out}")


def _args_embed_images(sub: Any) -> None:
    from .data.views import AUTO_HUE, VIEW_MIXES
    from .store import embed_images

    d = lambda name: f"default {_default(embed_images, name)}"  # noqa: E731
    p = sub.add_parser("embed-images", help="teacher image embeddings of a folder -> resumable sharded store")
    p.add_argument("--teacher", required=True, help="teacher spec")
    p.add_argument("--images", required=True, help="folder of images (searched recursively), image list, or "
                   "WebDataset shards ('shards/{00000..00099}.tar')")
    p.add_argument("--out", required=True, help="store folder; re-running resumes and adds new images")
    p.add_argument("--batch-size", type=_count, help=d("batch_size"))
    p.add_argument("--workers", type=_workers, help="decode processes (default: one per core, max 8)")
    p.add_argument("--shard-size", type=_count, help=f"images per shard ({d('shard_size')})")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the image tower (checked against eager on the first batch)")
    p.add_argument("--views", type=_count, help="K ≥ 2: a multi-view store (clipkd's GZSL method for every "
                   "student trained from it): each image and K-1 flipped / CutMix views of it, each embedded once; "
                   "1 (default): the images alone")
    p.add_argument("--view-hue", type=_share_or_auto, help="share of the views after the first whose hues are rotated "
                   f"({d('view_hue')}: {AUTO_HUE} with --views)")
    p.add_argument("--view-mix", choices=VIEW_MIXES,
                   help=f"how a view mixes in its partner image ({d('view_mix')})")
    p.add_argument("--split", help="split file: only the seen classes' images get views (a view and its partner are "
                   "both seen)")
    p.add_argument("--seed", type=int, help=f"seed of the views' draw ({d('seed')})")
    _device_flags(p)


@command("embed-images", _args_embed_images)
def _embed_images(a: argparse.Namespace) -> None:
    from .store import embed_images

    store = embed_images(**_kwargs(embed_images, a))
    m = store.manifest
    views = getattr(a, "views", 1)
    what = f" ({views} views of each image)" if views > 1 else ""
    print(f"store {a.out}: {m['count']} embeddings{what} in {len(m['shards'])} shard(s), {m['skipped_count']} file(s) "
          "skipped")


def _args_download(sub: Any) -> None:
    from .data.download import download

    d = lambda name: f"default {_default(download, name)}"  # noqa: E731
    p = sub.add_parser("download", help="images from a URL list into WebDataset shards (img2dataset), for --images")
    p.add_argument("--urls", required=True, help="URL list: .txt (one per line), .csv/.tsv/.parquet/.json with a url "
                   "column")
    p.add_argument("--out", required=True, help="shard folder; re-running resumes (finished shards are kept)")
    p.add_argument("--image-size", type=_count, help=f"resize to this size ({d('image_size')})")
    p.add_argument("--resize-mode", help="border (pad to a square), keep_ratio, keep_ratio_largest, center_crop, no "
                   f"(as is); {d('resize_mode')}")
    p.add_argument("--url-col", help=f"column of the URLs in csv/tsv/parquet/json lists ({d('url_col')})")
    p.add_argument("--caption-col", help="column saved as each sample's .txt caption")
    p.add_argument("--per-shard", type=_count, help=f"samples per tar shard ({d('per_shard')})")
    p.add_argument("--processes", type=_count, help=f"download processes ({d('processes')})")
    p.add_argument("--threads", type=_count, help=f"download threads per process ({d('threads')})")
    p.add_argument("--timeout", type=_count, help=f"seconds per request ({d('timeout')})")
    p.add_argument("--retries", type=int, help=f"retries per failed URL ({d('retries')})")


@command("download", _args_download)
def _download(a: argparse.Namespace) -> None:
    from .data.download import download

    r = download(**_kwargs(download, a))
    failed = ", ".join(f"{n} {m}" for m, n in sorted(r.errors.items(), key=lambda kv: -kv[1])[:5])
    print(f"downloaded {r.successes} of {r.urls} image(s) into {len(r.shards)} shard(s)"
          + (f"; failed: {failed}" if failed else ""))
    print(f"--images '{r.pattern}'")


def _args_distill(sub: Any) -> None:
    from .students.losses import DISTILL_TERMS, EMBEDDING_LOSSES
    from .training.distill import MIX_MODES, MIXES

    p = sub.add_parser("distill", help="train a timm student to mimic the teacher's image embeddings")
    p.add_argument("--images", required=True, help="ImageFolder of training images")
    tgt = p.add_argument_group("teacher targets (at least one)")
    tgt.add_argument("--store", help="embedding store of these images (from embed-images)")
    tgt.add_argument("--teacher", help="run this teacher online on the student's augmented views; with --store too, "
                     "only on the mixed images (the store serves the plain ones)")
    p.add_argument("--text", help="class text embeddings (embed-text); needed for --label-weight")
    p.add_argument("--loss", choices=EMBEDDING_LOSSES.names(), help="distance of the embed term (default mse)")
    terms = p.add_argument_group("distillation terms (weights; the recipe's terms keep theirs unless set here)")
    for name in DISTILL_TERMS:
        terms.add_argument(f"--{name.replace('_', '-')}-weight", type=float, dest=f"{name}_weight",
                           help=f"{DISTILL_TERMS.entry(name).help}")
    p.add_argument("--logit-scale", type=float, help="temperature of text-based terms (default: the teacher's)")
    p.add_argument("--vocab", help="more text embeddings (embed-text of e.g. a generic noun list) widening the "
                   "vocab term's vocabulary beyond the class names of --text")
    p.add_argument("--vocab-scale", type=float, help="temperature of the vocab term (default: --logit-scale)")
    p.add_argument("--mix", choices=MIXES,
                   help="mix training images; the online --teacher embeds each mixed image (clipkd's GZSL method). "
                   "auto (default): cutmix with --teacher, none with --store")
    p.add_argument("--mix-alpha", type=float, help="Beta(alpha, alpha) of the mixing ratio (default 1)")
    p.add_argument("--mix-prob", type=float, help="fraction of images (or batches) mixed (default 1)")
    p.add_argument("--mix-mode", choices=MIX_MODES, help="elem (default): a CutMix box and ratio per image; "
                   "batch: one per batch")
    p.add_argument("--views", type=_views, help="K ≥ 2: draw K views per image (the image, then K-1 flipped and mixed "
                   "ones), embed each once with --teacher into OUT/views, train on one view per image per epoch "
                   "(clipkd's GZSL method at store cost); 0 or 1: the image alone, no views (a mix, if any, online "
                   "every epoch); auto (default): 4 with --teacher alone")
    p.add_argument("--view-hue", type=_share_or_auto, help="share of the views after the first whose hues are rotated "
                   "by a random fraction of a turn (the teacher embeds the recoloured picture); auto (default): "
                   "clipkd's default with --views, 0 without")
    p.add_argument("--extra-images", help="an unlabelled image pool (folder or list) trained on with teacher "
                   "targets only")
    p.add_argument("--extra-store", help="the pool's embed-images store (with --store)")
    _train_flags(p)


@command("distill", _args_distill)
def _distill(a: argparse.Namespace) -> None:
    from .training.distill import distill

    r = distill(**_kwargs(distill, a, cfg=_train_config(a)))
    print(f"student -> {r.path}")


def _args_train_supervised(sub: Any) -> None:
    p = sub.add_parser("train-supervised", help="the normal-training baseline: class head on seen classes")
    p.add_argument("--images", required=True, help="ImageFolder of training images")
    _train_flags(p)


@command("train-supervised", _args_train_supervised)
def _train_supervised(a: argparse.Namespace) -> None:
    from .training.distill import train_supervised

    r = train_supervised(**_kwargs(train_supervised, a, cfg=_train_config(a)))
    print(f"baseline -> {r.path}")


def _args_eval(sub: Any) -> None:
    from .evaluation.zeroshot import evaluate

    p = sub.add_parser("eval", help="zero-shot / generalized zero-shot accuracy of a teacher or student")
    p.add_argument("--model", required=True, help="teacher spec or student run folder / student.pt")
    p.add_argument("--images", required=True, help="labelled ImageFolder (test split)")
    p.add_argument("--text", help="class text embeddings (required for embedding students)")
    p.add_argument("--split", help="split file -> GZSL S, U, H, calibrated stacking, AUSUC")
    p.add_argument("--val", help="labelled folder to choose the calibration gamma on")
    p.add_argument("--templates", help="templates when a teacher embeds class names itself (default "
                   f"{_default(evaluate, 'templates')})")
    p.add_argument("--batch-size", type=_count, help=f"default {_default(evaluate, 'batch_size')}")
    p.add_argument("--workers", type=_workers)
    p.add_argument("--out", help="write the results JSON here (and the seen-unseen curve PNG beside it)")
    p.add_argument("--device")


@command("eval", _args_eval)
def _eval(a: argparse.Namespace) -> None:
    from .evaluation.zeroshot import evaluate

    r = evaluate(**_kwargs(evaluate, a))
    print(json.dumps(r.to_dict(curve=False), indent=2))


def _args_predict(sub: Any) -> None:
    from .evaluation.zeroshot import predict, predict_video

    p = sub.add_parser("predict", help="top-k classes with probabilities for image files")
    p.add_argument("--model", required=True, help="teacher spec or student run folder / student.pt")
    p.add_argument("--text", help="class text embeddings (embedding models)")
    p.add_argument("--classes", help="class-name file or folder (teachers without --text)")
    p.add_argument("--topk", type=_count, help=f"default {_default(predict, 'topk')}")
    p.add_argument("--device")
    p.add_argument("--video", help="a video file, or a camera index (0, 1, ...): top-k per frame with frames/s")
    p.add_argument("--every", type=_count, help="with --video: every N-th frame (default "
                   f"{_default(predict_video, 'every')})")
    p.add_argument("--max-frames", type=_count, help="with --video: stop after this many predicted frames")
    p.add_argument("files", nargs="*", help="image files")


@command("predict", _args_predict)
def _predict(a: argparse.Namespace) -> None:
    from .evaluation.zeroshot import predict
    from .prompts import load_classnames

    classes = load_classnames(a.classes) if getattr(a, "classes", None) else None
    if getattr(a, "video", None) is not None:
        if a.files:
            raise ClipkdError("give image files or --video, not both")
        from .evaluation.zeroshot import predict_video

        n, fps = 0, 0.0
        for f in predict_video(**_kwargs(predict_video, a, source=a.video, classnames=classes)):
            n, fps = n + 1, f.fps
            print(f"frame {f.frame}: " + ", ".join(f"{c} {p:.3f}" for c, p in f.top) + f"  ({f.fps:.1f} frames/s)")
        if n == 0:
            raise ClipkdError(f"no frame could be read from {a.video}")
        print(f"{n} frames, {fps:.1f} frames/s")
        return
    if not a.files:
        raise ClipkdError("give image files to predict, or --video FILE|CAMERA_INDEX")
    failed = 0
    for r in predict(**_kwargs(predict, a, classnames=classes)):
        if r.error:
            failed += 1
            print(f"{r.file}: skipped ({r.error})")
        else:
            print(f"{r.file}: " + ", ".join(f"{c} {p:.3f}" for c, p in r.top))
    if failed == len(a.files):  # nothing predicted is not a success
        raise ClipkdError(f"none of the {failed} file(s) could be read as an image")


def _args_convert_weights(sub: Any) -> None:
    p = sub.add_parser("convert-weights", help="ImageNet weights laid out by another codebase -> timm's names (for "
                       "--pretrained FILE)")
    p.add_argument("--arch", required=True, help="the timm architecture the weights are for (e.g. efficientnet_lite0)")
    p.add_argument("--weights", required=True, help="the weights file (.pth state dict)")
    p.add_argument("--out", required=True, help="output .pth under timm's parameter names")


@command("convert-weights", _args_convert_weights)
def _convert_weights(a: argparse.Namespace) -> None:
    from .students.model import convert_weights

    r = convert_weights(a.arch, a.weights, a.out)
    print(f"{r['out']}: {r['tensors']} tensors of {r['source']} under timm '{r['arch']}' names; use --pretrained "
          f"{r['out']}")


def _args_export(sub: Any) -> None:
    from .export import ExportConfig
    from .export.common import TOWERS

    d = lambda name: f"default {_default(ExportConfig, name)}"  # noqa: E731
    p = sub.add_parser("export", help="a model as a self-describing ONNX file (fp32 or INT8) or TensorRT engine")
    p.add_argument("--model", required=True, help="student run folder / student.pt, clip-train run, or teacher spec "
                   "(its image tower)")
    p.add_argument("--format", help=f"onnx, tensorrt (needs a CUDA GPU and tensorrt), or a folder that loads without "
                   f"clipkd: timm (a student: timm.create_model('local-dir:DIR', pretrained=True)) or open_clip (a "
                   f"clip-train run: open_clip.create_model_and_transforms('local-dir:DIR')); {d('format')}")
    p.add_argument("--out", required=True, help="output file (.onnx; .engine for tensorrt), a folder for timm and "
                   "open_clip")
    p.add_argument("--images", help="sample images for the parity check against PyTorch (default: the student run's "
                   "training images)")
    p.add_argument("--samples", type=_count, help=f"parity samples ({d('samples')})")
    p.add_argument("--int8", action="store_true", help="INT8 post-training static quantization (QDQ, per-channel)")
    p.add_argument("--calib", help="calibration images for --int8 (folder or list; at least 16)")
    p.add_argument("--calib-count", type=_count, help=f"calibration images used ({d('calib_count')})")
    p.add_argument("--tower", choices=TOWERS,
                   help=f"{d('tower')}; text: a CLIP's text tower (open_clip models; embed-text and --text-model "
                   "take the file)")
    p.add_argument("--text", help="timm/open_clip folders: the zero-shot head (class text embeddings from embed-text "
                   "with the teacher), written as classifier.safetensors + classifier.json")
    p.add_argument("--results", help="timm/open_clip folders: a `clipkd eval --out` JSON whose S/U/H the model card "
                   "quotes")
    p.add_argument("--license", help=f"the model card's license (the teacher's terms apply too); {d('license')}")
    p.add_argument("--push-to-hub", metavar="OWNER/NAME", help="upload the folder to this Hugging Face Hub model "
                   "repository (needs HF_TOKEN and the network)")


@command("export", _args_export)
def _export(a: argparse.Namespace) -> None:
    from .export import ExportConfig, export_model

    r = export_model(**_kwargs(export_model, a, cfg=_settings(ExportConfig, a)))
    texts = getattr(a, "tower", "image") == "text"
    if r.format in ("timm", "open_clip"):
        print(f"{r.path}/ ({r.format} folder, {r.size_bytes / 1e6:.1f} MB): reloaded by {r.format} alone, cosine to "
              f"clipkd on {r.samples} sample images min {r.min_cosine:.6f}"
              + (f"; pushed: {r.extra['hub']}" if r.extra.get("hub") else ""))
        return
    print(f"{r.path} ({r.format}, {r.metadata.get('precision', '')}, {r.size_bytes / 1e6:.1f} MB): cosine to "
          f"PyTorch on {r.samples} sample {'texts' if texts else 'images'} min {r.min_cosine:.6f}, "
          f"mean {r.mean_cosine:.6f}")


def _args_dataset(sub: Any) -> None:
    from .data.digits import WORLDS, DigitsConfig

    d = lambda name: f"default {_default(DigitsConfig, name)}"  # noqa: E731
    p = sub.add_parser("dataset", help="real datasets -> clipkd inputs (image lists, split files)")
    dsub = p.add_subparsers(dest="dataset", required=True, metavar="KIND")
    q = dsub.add_parser("xlsa17", help="AwA2/CUB/SUN/aPY proposed splits (att_splits.mat + res101.mat)")
    q.add_argument("--splits", required=True, help="folder with att_splits.mat and res101.mat (e.g. xlsa17/data/CUB)")
    q.add_argument("--images", required=True, help="your copy of the dataset's images (the authors' absolute "
                   "paths are re-rooted onto it)")
    q.add_argument("--out", required=True, help="folder for trainval/test_seen/test_unseen/test .csv, split.json")
    q = dsub.add_parser("digits", help="real-image GZSL worlds from scikit-learn's handwritten digits (offline)")
    q.add_argument("--kind", choices=WORLDS,
                   help="digits: 10 classes, --unseen held out; digits-colour: 40 ink×digit classes, one ink per "
                   f"digit held out ({d('kind')})")
    q.add_argument("--unseen", type=int, help=f"unseen digits (kind digits; {d('unseen')})")
    q.add_argument("--image-size", type=int, help=d("image_size"))
    q.add_argument("--seed", type=int, help=d("seed"))
    q.add_argument("--out", required=True, help="world folder: train/ val/ test/ with captions_en.csv, split.json")
    q = dsub.add_parser("coop", help="CoOp base-to-new split: sorted classes, first ceil(n/2) are base (seen)")
    q.add_argument("--images", required=True, help="ImageFolder, image list, or class-name file")
    q.add_argument("--out", required=True, help="split .json")


@command("dataset", _args_dataset)
def _dataset(a: argparse.Namespace) -> None:
    from .data.datasets import write_coop_split, write_xlsa17

    if a.dataset == "digits":
        from .data.digits import DigitsConfig, make_digits_world

        cfg = DigitsConfig(**_kwargs(DigitsConfig, a))
        print(f"{cfg.kind} world in {make_digits_world(a.out, cfg)}")
    elif a.dataset == "xlsa17":
        counts = write_xlsa17(a.splits, a.images, a.out)
        print(f"{a.out}: " + ", ".join(f"{k}.csv {v} images" for k, v in counts.items()) + ", split.json")
    else:
        split = write_coop_split(a.images, a.out)
        print(f"{len(split.seen)} base (seen) and {len(split.unseen)} new (unseen) classes -> {a.out}")


def _args_store_import(sub: Any) -> None:
    p = sub.add_parser("store-import", help="a seed-style folder of one .npy per image -> embedding store")
    p.add_argument("--npy", required=True, help="folder of <image name>.npy (or <relative path>.npy) files")
    p.add_argument("--images", required=True, help="the images they belong to (folder)")
    p.add_argument("--teacher", required=True, help="the teacher that made them (spec or clip-train run): "
                   "recorded as the identity it reports when loaded")
    p.add_argument("--out", required=True, help="store folder")


@command("store-import", _args_store_import)
def _store_import(a: argparse.Namespace) -> None:
    from .store import import_npy_folder

    st = import_npy_folder(a.npy, a.images, a.out, a.teacher)
    print(f"store {a.out}: {len(st)} embeddings ({st.embed_dim}-d), {st.manifest['skipped_count']} skipped")


def _args_store_export(sub: Any) -> None:
    p = sub.add_parser("store-export", help="embedding store -> seed-style folder of one .npy per image")
    p.add_argument("--store", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mirror", action="store_true", help="<relative path>.npy instead of <image name>.npy")


@command("store-export", _args_store_export)
def _store_export(a: argparse.Namespace) -> None:
    from .store import export_npy_folder

    print(f"{export_npy_folder(a.store, a.out, flat=not getattr(a, 'mirror', False))} .npy files -> {a.out}")


def _args_import_text(sub: Any) -> None:
    from .prompts import import_seed_text

    p = sub.add_parser("import-text", help="seed-style text_prompts.txt + (C, D) .npy -> text embeddings .npz")
    p.add_argument("--prompts", required=True, help="text_prompts.txt, one prompt per class per line")
    p.add_argument("--embeddings", required=True, help=".npy with one row per line of --prompts")
    p.add_argument("--teacher", required=True, help="the teacher that made them (spec or clip-train run): "
                   "recorded as the identity it reports when loaded")
    p.add_argument("--logit-scale", type=float, help=f"default {_default(import_seed_text, 'logit_scale')}")
    p.add_argument("--out", required=True, help="output .npz")


@command("import-text", _args_import_text)
def _import_text(a: argparse.Namespace) -> None:
    from .prompts import import_seed_text

    emb = import_seed_text(**_kwargs(import_seed_text, a, prompts_txt=a.prompts, embeddings_npy=a.embeddings))
    print(f"{len(emb.classnames)} class embeddings -> {emb.save(a.out)}")


def _args_demo(sub: Any) -> None:
    from .demo import run_demo

    p = sub.add_parser("demo", help="the whole pipeline in the demo world, with a results table")
    p.add_argument("--out", help=f"output folder (default {_default(run_demo, 'out')})")
    p.add_argument("--quick", action="store_true", help="a small world and short training (about a minute)")
    p.add_argument("--task", choices=["zeroshot", "retrieval"], help="zeroshot: the first workflow (GZSL); "
                   f"retrieval: CLIP fine-tuning with distillation (default {_default(run_demo, 'task')})")
    p.add_argument("--shared", help="reuse the world, teacher and store of this folder (e.g. runs/demo)")
    p.add_argument("--device")


@command("demo", _args_demo)
def _demo(a: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(**_kwargs(run_demo, a))


def run(a: argparse.Namespace) -> int:
    """Dispatch one parsed command to its handler."""
    return COMMANDS[a.command](a) or 0


def configure_logging(quiet: bool = False, verbose: bool = False) -> None:
    """Send clipkd's log records to stderr: notes at INFO (default), only warnings with ``quiet``, debug with
    ``verbose``. Library code only logs; this is the one place that decides where the records go."""
    logger = logging.getLogger("clipkd")
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    if not any(getattr(h, "_clipkd_cli", False) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(_Format())
        handler._clipkd_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    root = logging.getLogger()
    if not root.handlers:  # other libraries' warnings, once; without it their first logging.info() call would install
        other = _Stderr()  # a root handler that prints clipkd's records a second time
        other.setLevel(logging.WARNING)
        other.addFilter(lambda r: not r.name.startswith("clipkd"))
        root.addHandler(other)


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (not the one at creation, which a caller
    such as a test harness may have replaced and closed since)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


# the flags of the command being run, by field name (set by main): library messages name fields, the CLI shows flags
_FLAGS: dict[str, str] = {}


def flags_of(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Field name → long flag of ``parser`` and its sub-parsers (``batch_size`` → ``--batch-size``)."""
    out: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                out |= flags_of(child)
        elif action.option_strings and action.dest not in ("help", "version"):
            out.setdefault(action.dest, max(action.option_strings, key=len))
    return out


def as_flags(message: str, flags: dict[str, str]) -> str:
    """A library message as the command line says it: each field named `` `name` `` becomes its flag and
    `` `name`=value `` becomes ``--flag value``; a field with no flag (a recipe key) keeps its name."""
    import re

    def sub(m: re.Match) -> str:
        flag = flags.get(m.group(1))
        if flag is None:
            return m.group(0)
        return flag + (f" {m.group(2)}" if m.group(2) is not None else "")

    return re.sub(r"`(\w+)`(?:=(\S+))?", sub, message)


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = as_flags(record.getMessage(), _FLAGS)
        return msg if record.levelno < logging.WARNING else f"clipkd: {record.levelname.lower()}: {msg}"


def cli_reference(width: int = 100) -> str:
    """``docs/cli.md``: every command's ``--help`` (sub-commands included), at a fixed width, generated from the
    parser so that it cannot drift from it (a test compares the file with this)."""
    import argparse as ap

    def walk(parser: ap.ArgumentParser, path: list[str]) -> list[tuple[list[str], ap.ArgumentParser]]:
        out = [(path, parser)]
        for action in parser._actions:
            if isinstance(action, ap._SubParsersAction):
                for name, child in action.choices.items():
                    out += walk(child, [*path, name])
        return out

    parts = ["# CLI reference\n", "Generated from the parser: `python -c 'from clipkd.cli import cli_reference; "
             "print(cli_reference(), end=\"\")' > docs/cli.md` (a test fails when this page is stale).\n"]
    for path, parser in walk(build_parser(), []):
        parser.formatter_class = lambda prog: ap.HelpFormatter(prog, width=width)
        parser.prog = " ".join(["clipkd", *path])
        parts.append(f"## `{parser.prog}`\n\n```text\n{parser.format_help().rstrip()}\n```\n")
    return "\n".join(parts)


# commands whose work is not a Lightning fit (which turns SIGTERM into a resumable stop itself): a SIGTERM there
# stops the work with one line and exit 143, finished shards kept
NOT_TRAINING = frozenset(COMMAND_ORDER) - {"clip-train", "distill", "train-supervised", "demo", "serve"}


class _Terminated(BaseException):
    """SIGTERM in a non-training command: a BaseException, so that no ``except Exception`` on the way (an image
    decoder counting undecodable files, say) can take it for an ordinary error and carry on."""


# which extra installs a module a command found missing (the base package is torch-free: pyproject.toml)
EXTRAS = {"torch": "train", "torchvision": "train", "lightning": "train", "open_clip": "train", "timm": "train",
          "sklearn": "train", "matplotlib": "train", "faiss": "serve", "fastapi": "serve", "uvicorn": "serve",
          "multipart": "serve", "python_multipart": "serve", "onnxruntime": "serve", "tokenizers": "serve",
          "regex": "serve", "ftfy": "serve", "onnx": "deploy", "onnxscript": "deploy", "cv2": "deploy",
          "cn_clip": "cnclip", "transformers": "hf", "modelscope": "modelscope", "img2dataset": "download",
          "tensorboardX": "tensorboard", "wandb": "wandb"}


def missing_extra(module: str) -> str | None:
    """The extra of ``pip install 'clipkd[EXTRA]'`` that installs ``module`` (None: not one of clipkd's)."""
    return EXTRAS.get(module.split(".")[0])


def _sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``clipkd`` console script; user errors print one line and exit 2; what the machine refuses
    (a full disk, a read-only folder) one line and exit 1 (``-v`` shows the traceback)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    given = sys.argv[1:] if argv is None else argv
    name = next((a for a in given if not a.startswith("-")), None)  # the global flags take no value
    try:
        parser = build_parser(name if name in COMMANDS else None)
    except ModuleNotFoundError as e:  # a command's flags read its API's defaults: its stack must be there
        if missing_extra(e.name or "") is None:
            raise
        print(f"clipkd {name}: error: this needs {e.name}, which is not installed: "
              f"pip install 'clipkd[{missing_extra(e.name or '')}]'", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    _FLAGS.clear()
    _FLAGS.update(flags_of(next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
                           .choices[args.command]))
    configure_logging(args.quiet, args.verbose)
    from .distributed import ranks

    if args.command in NOT_TRAINING:
        import signal

        signal.signal(signal.SIGTERM, _sigterm)

    try:
        if not ranks().zero:  # in a job of several ranks, rank 0 reports; the others' errors still reach stderr
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                return run(args)
        return run(args)
    except Interrupted as e:
        print(f"clipkd {args.command}: {as_flags(str(e), _FLAGS)}", file=sys.stderr)
        return e.exit_code
    except _Terminated:
        print(f"clipkd {args.command}: interrupted (SIGTERM); re-run the same command to resume (finished shards are "
              "kept)", file=sys.stderr)
        return 143
    except ClipkdError as e:
        print(f"clipkd {args.command}: error: {as_flags(str(e), _FLAGS)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        extra = missing_extra(e.name or "")
        if extra is None or args.verbose:
            raise
        print(f"clipkd {args.command}: error: this needs {e.name}, which is not installed: "
              f"pip install 'clipkd[{extra}]'", file=sys.stderr)
        return 2
    except OSError as e:
        if args.verbose or e.errno is None:
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(f"clipkd {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
