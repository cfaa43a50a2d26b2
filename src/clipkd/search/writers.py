"""Writing an index: ``build_index`` / ``index_store``, ``add_to_index`` / ``append_store``, ``remove_from_index``
and ``compact_index``, over FAISS generations or a Milvus collection."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import settle
from ..distributed import barrier, ranks
from ..errors import ClipkdError
from ..fileio import exclusive, relative, write_json, write_text
from ..store import EmbeddingStore, embed_paths
from .exact import exact_search
from .index import SearchIndex
from .keys import Source, read_source
from .layout import (
    COLUMNS,
    INDEX_FORMAT,
    INFO,
    _current,
    _model_ref,
    _read_columns,
    _read_labels,
    _removed_now,
    _resolve_ref,
    _tombstones,
    column_codes,
    commit_generation,
    read_info,
)
from .planning import (
    BACKENDS,
    CHUNK,
    EXACT_MAX,
    TRAIN_MAX,
    IndexConfig,
    _overlap,
    _set_nprobe_from,
    fill_faiss,
    new_faiss,
    parse_memory,
    plan_index,
    tune,
)

if TYPE_CHECKING:
    from .encoder import Encoder

log = logging.getLogger(__name__)


def _milvus_kind(kind: str, n: int, uri: str) -> str:
    if kind == "auto":
        return "flat" if n <= EXACT_MAX else "ivf"
    if kind not in ("flat", "ivf"):
        raise ClipkdError(f"`kind`={kind} is not offered with `backend`=milvus here: flat (exact) or ivf (IVF_FLAT), "
                          "what Milvus Lite keeps")
    return kind


def _write_milvus(root: Path, store: EmbeddingStore, kind: str, info: dict[str, Any], existing: dict | None,
                  uri: str, collection: str, restore: Sequence[str] = ()) -> dict[str, Any]:
    """Insert the store's rows the collection lacks (all of them into a new collection, or again when the store
    lost a damaged shard), put back removed rows added again, and move index.json to the next generation."""
    from . import milvus

    client = milvus.connect(uri)
    old = (existing or {}).get("milvus", {})
    inserted = int(old.get("inserted", 0)) if old.get("collection") == collection else 0
    removed = milvus.read_removed(root) if inserted else set()
    exists = milvus.check_collection(client, collection, info["identity"], int(info["embed_dim"]), uri)
    chosen = (existing or {}).get("kind") if exists and inserted else _milvus_kind(kind, len(store), uri)
    if exists and (not inserted or inserted > len(store)):  # another index's rows, or a store that lost a shard
        client.drop_collection(collection)
        exists, inserted, removed = False, 0, set()
    params = old.get("params", {}) if exists else \
        milvus.create_collection(client, collection, info["identity"], int(info["embed_dim"]), chosen, len(store))
    codes = column_codes(root, store.keys())
    back = sorted(removed & set(restore))
    if back:
        milvus.insert_rows(client, collection, store, store.rows(back), codes)
        removed -= set(back)
    new = np.arange(inserted, len(store), dtype=np.int64)
    milvus.insert_rows(client, collection, store, new, codes)
    write_text(milvus.removed_file(root), "".join(f"{k}\n" for k in sorted(removed)))
    rows = len(store) - len(removed)
    recall = 1.0
    if chosen != "flat":
        client.flush(collection)
        pick = np.sort(np.random.default_rng(0).choice(len(store), min(100, len(store)), replace=False))
        q = store.gather(pick).astype(np.float32)
        _, want = exact_search(store, np.arange(len(store)), q, 10)
        recall = _overlap(want, milvus.search(client, collection, q, 10, params, None)[1])
    number = int((existing or {}).get("generation", 0)) + 1
    info = {**info, "backend": "milvus", "kind": chosen, "requested_kind": kind, "params": params,
            "milvus": {"uri": milvus.record_uri(uri, root), "collection": collection, "inserted": len(store),
                       "params": params},
            "skipped": int(store.manifest["skipped_count"]), "recall@10": round(recall, 4), "generation": number,
            "rows": rows, "tombstones": 0, "removed": len(removed)}
    write_json(root / INFO, info)
    log.info("index %s: %d rows in Milvus collection %s at %s (%s), %d inserted now", root, rows, collection, uri,
             chosen, len(new) + len(back))
    return info


def _remove_milvus(root: Path, index: SearchIndex, wanted: set[str]) -> int:
    from . import milvus

    info = read_info(root)
    removed = milvus.read_removed(root)
    gone = sorted(wanted - removed)
    rows = index.store.rows(gone)
    if len(index) - len(gone) <= 0:
        raise ClipkdError(f"index {root} would be empty: removing these would leave no image in it; nothing was "
                          "removed")
    milvus.delete_rows(index.backend.client, index.backend.collection, rows.tolist())
    removed |= wanted
    write_text(milvus.removed_file(root), "".join(f"{k}\n" for k in sorted(removed)))
    write_json(root / INFO, {**info, "generation": int(info.get("generation", 0)) + 1,
                                     "rows": int(info["rows"]) - len(gone), "removed": len(removed)})
    return len(gone)


COMPACT_SHARE = 0.2  # removed rows past this share of the FAISS rows: `index remove` suggests `index compact`


def _write_faiss(root: Path, store: EmbeddingStore, kind: str, info: dict[str, Any],
                 restore: Sequence[str] = (), max_memory: int | None = None) -> dict[str, Any]:
    """Build the FAISS index over the store's rows that are not removed (``restore``: keys added again, no longer
    removed) under a memory budget, streaming the store a chunk at a time (an IVF quantizer trains on a sample),
    and commit it as the next generation."""
    import time

    t0 = time.perf_counter()
    removed = _removed_now(root) - set(restore)
    keys = store.keys()
    if removed:
        keep = np.flatnonzero(~np.fromiter((p in removed for p in keys), bool, len(keys))).astype(np.int64)
    else:
        keep = np.arange(len(store), dtype=np.int64)
    if not len(keep):
        raise ClipkdError(f"index {root} would be empty: no decodable image is left in it")
    budget = max_memory if max_memory is not None else info.get("max_memory")
    plan = plan_index(kind, len(keep), store.embed_dim, budget)
    index, params = new_faiss(plan, len(keep), store.embed_dim)
    sample = None
    if not index.is_trained:
        rng = np.random.default_rng(0)
        sample = store.gather(keep[np.sort(rng.choice(len(keep), min(len(keep), TRAIN_MAX), replace=False))])
        log.info("index %s: training a %s quantizer on %d of %d rows", root, plan["kind"], len(sample), len(keep))
    fill_faiss(index, _progress((v for _, v in store.chunks(keep, CHUNK)), len(keep), f"indexing {root.name}"),
               sample)
    del sample
    recall, queries = (1.0, 0) if plan["kind"] == "flat" else tune(index, params, store, keep)
    info = {**info, "kind": plan["kind"], "requested_kind": kind, "params": params,
            "skipped": int(store.manifest["skipped_count"]), "recall@10": round(recall, 4),
            "recall_rows": int(len(keep)), "recall_queries": queries, "index_bytes": int(plan["bytes"]),
            "build_s": round(time.perf_counter() - t0, 1), **({"max_memory": budget} if budget else {})}
    info = commit_generation(root, info, index, keep, np.zeros(0, np.int64), removed,
                             columns=column_codes(root, keys))
    log.info("index %s: %d rows, %s, recall@10 vs exact %.3f", root, len(keep), plan["kind"], recall)
    return info


def _progress(parts: Any, total: int, what: str) -> Any:
    """``parts`` (arrays) passed through, with a progress bar counting their rows."""
    from tqdm import tqdm

    with tqdm(total=total, desc=what, unit="row", unit_scale=True, disable=total < 4 * CHUNK) as bar:
        for part in parts:
            yield part
            bar.update(len(part))


def _append_faiss(root: Path, store: EmbeddingStore, info: dict[str, Any], restore: Sequence[str]) -> dict[str, Any]:
    """Add the store's rows that the FAISS index lacks to it (flat, IVF and IVF-PQ append to their lists with the
    trained quantizer, HNSW links them into its graph), a chunk at a time: no rebuild. Keys in ``restore`` are no
    longer removed."""
    cur = _current(root)
    if cur is None or cur.path is None or (len(cur.rows) and int(cur.rows.max()) >= len(store)):
        # no index yet, one of clipkd before generations, or a store that lost a damaged shard: rebuilt
        return _write_faiss(root, store, info.get("requested_kind", info["kind"]), info, restore)
    removed = cur.removed - set(restore)
    keys = store.keys()
    listed = np.zeros(len(store), dtype=bool)
    listed[cur.rows] = True
    new = np.flatnonzero(~listed)
    if removed:
        new = new[~np.fromiter((keys[r] in removed for r in new.tolist()), bool, len(new))]
    index = cur.index
    _set_nprobe_from(index, info)
    for _, part in store.chunks(new, CHUNK):
        index.add(part)
    rows = np.concatenate([cur.rows, new]).astype(np.int64)
    tomb = _tombstones(rows, keys, removed)
    if len(rows) == len(tomb):
        raise ClipkdError(f"index {root} would be empty: no decodable image is left in it")
    info = commit_generation(root, {**info, "skipped": int(store.manifest["skipped_count"])}, index, rows, tomb,
                             removed, same_faiss=None if len(new) else cur.path,
                             columns=column_codes(root, keys) if len(new) or restore else None)
    back = len(cur.removed) - len(removed)
    log.info("index %s: %d rows added%s, %d in all, %s", root, len(new),
             f" ({back} removed earlier are back)" if back else "", info["rows"], info["kind"])
    if info["kind"] == "flat" and info.get("requested_kind") == "auto" and info["rows"] > EXACT_MAX:
        log.warning("index %s now holds %d rows, more than exact search suits (%d): `clipkd index compact` rebuilds "
                    "it as HNSW", root, info["rows"], EXACT_MAX)
    return info


def _append_columns(root: Path, source: Source) -> None:
    import csv
    import io

    if not source.columns:
        return
    have = _read_columns(root)
    for c, col in source.columns.items():
        have.setdefault(c, {}).update(col)
    names = sorted(have)
    keys = sorted({k for col in have.values() for k in col})
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    w.writerow(["key", *names])
    for k in keys:
        w.writerow([k, *(have[c].get(k, "") for c in names)])
    write_text(root / COLUMNS, buf.getvalue())


def _append_labels(root: Path, source: Source) -> None:
    if not source.labels:
        return
    have = _read_labels(root / "labels.tsv")
    have.update(source.labels)
    write_text(root / "labels.tsv", "".join(f"{p}\t{lab}\n" for p, lab in have.items()))


def _index_encoder(out: Path, existing: dict | None, encoder: Encoder | None, model: str | Path,
                   text_model: str | Path | None, device: str | None, precision: str) -> Encoder:
    """The encoder given or loaded, checked against the index already at ``out`` (one model per index)."""
    if encoder is None:
        from .encoder import load_encoder

        encoder = load_encoder(model, text_model, device, precision)
    if existing is not None and existing.get("identity") != encoder.identity:
        raise ClipkdError(f"{out} holds an index built by '{existing.get('identity')}', not '{encoder.identity}'; "
                          "use another `out`")
    return encoder


def build_index(model: str | Path, images: str | Path, out: str | Path, cfg: IndexConfig | None = None, *,
                text_model: str | Path | None = None, encoder: Encoder | None = None, progress: bool = True,
                add: bool = False, images_root: str | Path | None = None, **settings: Any) -> SearchIndex:
    """Embed ``images`` (a folder or an image list) with ``model`` into a new index at ``out``, or resume one.

    ``model``: a teacher spec, a ``clip-train`` run, or a distilled student (``text_model``: its teacher, for
    text queries). ``cfg``: how (:class:`~clipkd.search.planning.IndexConfig`: the kind, the memory budget, FAISS
    or a Milvus collection, the embedding pass); its fields may also be given as keywords (``kind="hnsw"``), on top
    of ``cfg``. The build streams the store within ``max_memory``. Killed
    midway, the same command resumes (finished shards are kept; a half-written FAISS generation is never named).
    An index of other images at ``out`` is refused unless ``add`` (what :func:`add_to_index` does). Rows are keyed
    relative to the collection root: ``images`` for a new index (a list's folder, a TSV's), the index's own for an
    added source (``images_root``: where that root is on this machine, when the index moved without its images
    beside it).
    """

    c = settle(IndexConfig, cfg, settings, "build_index", first="kind")
    out = Path(out)
    budget = parse_memory(c.max_memory)
    plan_index(c.kind, 1, 1)  # a one-line error for an unknown kind, before the work
    source = read_source(images)
    r = ranks()  # ranks of one job (torchrun/srun) embed their shares; rank 0 holds the folder and writes the index
    with exclusive(out, "search index") if r.zero else nullcontext():
        existing = read_info(out, missing_ok=True, check=False)
        here = relative(images, out)
        if existing is not None and not add and here not in existing.get("sources", []):
            raise ClipkdError(f"{out} holds an index of {existing.get('sources')} (relative to it), not of {here}; "
                              "add images with `clipkd index add`, or build into another `out`")
        root = _collection_root(out, existing, images_root, source.root)
        source = source.under(root)
        enc = _index_encoder(out, existing, encoder, model, text_model, c.device, c.precision)
        budget = budget or (existing or {}).get("max_memory")
        milvus_at = _milvus_target(out, existing, c.backend, c.uri, c.collection)
        _check_target(c.kind, len(source.paths) + int((existing or {}).get("rows", 0)), enc, budget, milvus_at)
        store = embed_paths(enc, root, source.paths, out / "store", c.batch_size, c.workers, progress=progress,
                            opener=source.opener, fingerprint=getattr(source.opener, "fingerprint", None))
        if r.distributed:
            barrier()  # every rank's rows are in the store
            store = EmbeddingStore(out / "store")
        if r.zero:
            _append_labels(out, source)
            _append_columns(out, source)
            info = _describe(model, text_model, enc, [*(existing or {}).get("sources", []), here], out)
            if budget:
                info["max_memory"] = budget
            if existing is None or "images" in existing:
                info["images"] = relative(root, out)
            _write_vectors(out, store, c.kind, info, existing, source.paths, budget, milvus_at)
    barrier()  # rank 0 has written the index
    index = SearchIndex(out)
    index.encoder = enc
    return index



def _collection_root(out: Path, existing: dict[str, Any] | None, images_root: str | Path | None,
                     source_root: Path) -> Path:
    """Where the rows of the index at ``out`` are keyed from: a new index's source root, an existing one's recorded
    root (or ``images_root`` where it is on this machine), ``/`` for an index of clipkd before portable indexes."""
    if existing is not None and "images" in existing:
        root = Path(images_root).resolve() if images_root is not None else (out / existing["images"]).resolve()
        if not root.is_dir():
            raise ClipkdError(f"the collection root of index {out} is not at {root}: give where its images are "
                              "on this machine (`--images-root`)")
        return root
    return Path("/") if existing is not None else source_root


def _check_target(kind: str, rows: int, enc: Encoder, budget: int | None, milvus_at: tuple[str, str] | None) -> None:
    """Before any embedding: the FAISS kind fits ``budget`` for ``rows``, or the Milvus is reachable and holds no
    collection of another model."""
    if milvus_at is None:
        plan_index(kind, rows, enc.embed_dim, budget)
        return
    from . import milvus

    _milvus_kind(kind, 0, milvus_at[0])
    milvus.check_collection(milvus.connect(milvus_at[0]), milvus_at[1], enc.identity, enc.embed_dim, milvus_at[0])


def _write_vectors(out: Path, store: EmbeddingStore, kind: str, info: dict[str, Any], existing: dict[str, Any] | None,
                   paths: list[str], budget: int | None, milvus_at: tuple[str, str] | None) -> None:
    """The vectors of ``store`` into Milvus, appended to the same FAISS index (more images of the same kind), or a
    new FAISS generation."""
    if milvus_at is not None:
        _write_milvus(out, store, kind, info, existing, milvus_at[0], milvus_at[1], paths)
    elif existing is not None and existing.get("requested_kind", existing.get("kind")) == kind and \
            "generation" in existing:
        keep = ("kind", "requested_kind", "params", "recall@10", "recall_rows", "recall_queries", "index_bytes",
                "build_s")
        _append_faiss(out, store, {**info, **{k: existing[k] for k in keep if k in existing}}, paths)
    else:
        _write_faiss(out, store, kind, info, paths, budget)

def _milvus_target(out: Path, existing: dict | None, backend: str, uri: str | None,
                   collection: str | None) -> tuple[str, str] | None:
    """(URI, collection) of an index whose vectors go to Milvus (given, or recorded by the index), else None."""
    from . import milvus

    if backend not in BACKENDS:
        raise ClipkdError(f"unknown `backend`={backend!r} (faiss or milvus)")
    if existing is not None and existing.get("backend") == "milvus":
        rec = existing["milvus"]
        given = (uri if milvus.is_remote(uri) else str(Path(uri).resolve())) if uri else None
        return given or milvus.resolve_uri(rec["uri"], out), collection or rec["collection"]
    if backend == "faiss":
        if uri or collection:
            raise ClipkdError("`uri` and `collection` are for `backend`=milvus")
        return None
    if existing is not None:
        raise ClipkdError(f"{out} holds a FAISS index; build the Milvus one into another `out`")
    if not uri:
        raise ClipkdError("`backend`=milvus needs `uri`: a Milvus Lite file (e.g. index.db) or http://host:19530")
    name = collection or "".join(c if c.isalnum() else "_" for c in out.resolve().name)
    if not name[:1].isalpha() and not name.startswith("_"):
        name = f"clipkd_{name}"
    return (uri if milvus.is_remote(uri) else str(Path(uri).resolve())), name


def _describe(model: str | Path, text_model: str | Path | None, enc: Encoder, sources: Sequence[str],
              out: Path) -> dict:
    from .encoder import is_student

    return {"format": INDEX_FORMAT, "model": _model_ref(model, out, "image"),
            "text_model": _model_ref(text_model, out, "text"),
            "identity": enc.identity, "embed_dim": enc.embed_dim, "preprocess": enc.preprocess_cfg.to_dict(),
            "student": is_student(model), "sources": sorted(set(sources))}


def index_store(out: str | Path, model: str | Path, kind: str = "auto", text_model: str | Path | None = None,
                device: str | None = "auto", max_memory: int | str | None = None, backend: str = "faiss",
                uri: str | None = None, collection: str | None = None) -> SearchIndex:
    """Make ``out`` a search index over the embedding store already in ``out/store`` (made by ``model``; its rows
    keyed under the folder it records): for embeddings computed elsewhere, e.g. a benchmark's synthetic gallery.
    The store is streamed: memory stays within ``max_memory`` (:func:`plan_index`, checked before the work);
    ``backend="milvus"``: into a Milvus collection, as :func:`build_index`."""

    out = Path(out)
    from .encoder import load_encoder

    budget = parse_memory(max_memory)
    store = EmbeddingStore(out / "store")
    enc = load_encoder(model, text_model, device)
    store.check_teacher(enc.identity, hint="the store was not made by this model")
    _check_dim(store, enc.embed_dim, out)
    info = {**_describe(model, text_model, enc, [], out), "images": relative(store.images_root(), out)}
    target = _milvus_target(out, None, backend, uri, collection)
    if target is not None:
        from . import milvus

        _milvus_kind(kind, 0, target[0])
        milvus.check_collection(milvus.connect(target[0]), target[1], enc.identity, enc.embed_dim, target[0])
        with exclusive(out, "search index"):
            _write_milvus(out, store, kind, info, None, *target)
        return SearchIndex(out)
    plan_index(kind, len(store), store.embed_dim, budget)  # one line before the work: a kind or budget that fails
    with exclusive(out, "search index"):
        _write_faiss(out, store, kind, info, max_memory=budget)
    return SearchIndex(out)


def _check_dim(store: EmbeddingStore, dim: int, out: Path) -> None:
    if store.embed_dim != dim:
        raise ClipkdError(f"store {store.root} holds {store.embed_dim}-d embeddings, index {out} {dim}-d ones: "
                          "they are of different models")


def append_store(index_dir: str | Path) -> SearchIndex:
    """Add to an index the rows of its store that its FAISS index lacks (embeddings written into ``store/`` by other
    means: ``import-npy``, a benchmark's synthetic rows), appended without a rebuild as a new generation."""
    out = Path(index_dir)
    info, store, _ = _writer_view(out)
    store.check_teacher(info["identity"], hint="the store was not made by the index's model")
    _check_dim(store, int(info["embed_dim"]), out)
    if info.get("backend") == "milvus":
        from . import milvus

        with exclusive(out, "search index"):
            _write_milvus(out, EmbeddingStore(out / "store"), info["requested_kind"], info, info,
                          milvus.resolve_uri(info["milvus"]["uri"], out), info["milvus"]["collection"])
        return SearchIndex(out)
    with exclusive(out, "search index"):
        _append_faiss(out, EmbeddingStore(out / "store"), read_info(out), ())
    return SearchIndex(out)


def add_to_index(index_dir: str | Path, images: str | Path, device: str | None = "auto", batch_size: int = 64,
                 workers: int | None = None, progress: bool = True, precision: str = "auto",
                 images_root: str | Path | None = None) -> SearchIndex:
    """Embed new images into an index with the model that built it; their rows are appended to its vectors."""
    root = Path(index_dir)
    info, _, _ = _writer_view(root)
    cfg = IndexConfig(kind=info.get("requested_kind", info["kind"]), device=device, precision=precision,
                      batch_size=batch_size, workers=workers)
    return build_index(_resolve_ref(info["model"], root), images, index_dir, cfg,
                       text_model=_resolve_ref(info.get("text_model"), root), progress=progress, add=True,
                       images_root=images_root)


def remove_from_index(index_dir: str | Path, paths: Sequence[str], images_root: str | Path | None = None) -> int:
    """Drop ``paths`` (keys as the index lists them, or image paths under its collection root) from an index: their
    FAISS rows become tombstones that queries skip (no rebuild; :func:`compact_index` rewrites the index without
    them); returns how many rows left it. A running ``serve`` picks the new generation up."""

    root = Path(index_dir)
    info, store, images = _writer_view(root, images_root)
    known = set(store.paths)
    wanted = {p if p in known else relative(p, images)
              for p in paths}
    unknown = sorted(p for p in wanted if p not in known)
    if unknown:
        raise ClipkdError(f"{len(unknown)} path(s) are not in index {root}, e.g. {unknown[:3]}")
    if info.get("backend") == "milvus":
        with exclusive(root, "search index"):
            return _remove_milvus(root, SearchIndex(root, images_root), wanted)
    with exclusive(root, "search index"):
        cur = _current(root)  # what is on disk now, under the lock
        removed = cur.removed | wanted
        paths_now = store.paths
        tomb = _tombstones(cur.rows, paths_now, removed)
        if len(tomb) == len(cur.rows):  # refused before anything is written
            raise ClipkdError(f"index {root} would be empty: removing these would leave no image in it; nothing "
                              "was removed")
        info = read_info(root)
        info = commit_generation(root, info, cur.index, cur.rows, tomb, removed, same_faiss=cur.path)
    if len(tomb) > COMPACT_SHARE * len(cur.rows):
        log.warning("index %s: %d of its %d FAISS rows are removed images that every query skips; `clipkd index "
                    "compact --index %s` rewrites it without them", root, len(tomb), len(cur.rows), root)
    return len(wanted - cur.removed)


def compact_index(index_dir: str | Path, max_memory: int | str | None = None) -> SearchIndex:
    """Rewrite an index's FAISS file without its removed rows (their embeddings stay in the store, so adding them
    again costs no model pass); ``auto`` indexes choose their kind again for the rows they now hold (under
    ``max_memory``, or the budget the index was built with)."""
    root = Path(index_dir)
    info, store, _ = _writer_view(root)
    budget = parse_memory(max_memory)
    if info.get("backend") == "milvus":
        log.info("index %s: Milvus compacts its collection's segments itself; nothing to rewrite", root)
        return SearchIndex(root)
    with exclusive(root, "search index"):
        info = read_info(root)
        _write_faiss(root, store, info.get("requested_kind", info["kind"]), info, max_memory=budget)
    return SearchIndex(root)


def _writer_view(root: Path, images_root: str | Path | None = None) -> tuple[dict[str, Any], EmbeddingStore, Path]:
    """What a writer needs of an index without loading its vectors (a writer loads the generation it changes
    itself, once): index.json, the store, where the collection root is."""
    info = read_info(root)
    images = Path(images_root).resolve() if images_root is not None else (root / info.get("images", "/")).resolve()
    return info, EmbeddingStore(root / "store"), images
