"""A searchable image index: an embedding store (resumable, sharded, corrupt files skipped and counted) plus a
FAISS index over its rows.

Layout of an index folder::

    index.json     the model (reference, identity, size, preprocessing), the FAISS kind, rows, recall@10
    store/         the embedding store; rows keyed by absolute image path
    labels.tsv     path<TAB>label for sources that have labels (class folders, image lists)
    removed.txt    paths dropped by ``index remove`` (their store rows stay, out of the FAISS index)
    faiss.index    the FAISS index (written atomically); ``rows.npy`` maps its positions to store rows

Exact inner product (``flat``) up to :data:`EXACT_MAX` rows, where one query costs a few milliseconds on a
2-core CPU (17 ms at 100,000 512-d rows, 0.2 ms with HNSW at recall@10 1.000: ``benchmarks/bench_search.py``);
HNSW above it (or ``ivf``/``ivfpq`` on request), with its
recall@10 against exact measured at build time and recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data.images import load_rgb
from ..distributed import barrier, ranks
from ..errors import ClipkdError, first_line
from ..fileio import atomic_write, exclusive, read_json, write_json, write_npy, write_text
from ..store import EmbeddingStore, embed_paths

if TYPE_CHECKING:
    from .encoder import Encoder

log = logging.getLogger(__name__)
INDEX_FORMAT = "clipkd-index/1"
EXACT_MAX = 30_000  # rows up to which `auto` keeps exact search: ~5 ms a query on 2 cores (17 ms at 100k, measured)
KINDS = ("auto", "flat", "hnsw", "ivf", "ivfpq")


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ClipkdError("search needs FAISS: pip install 'clipkd[search]' (faiss-cpu)") from None
    return faiss


@dataclass
class Source:
    """Images to index: absolute paths (``TSV#image_id`` for a Chinese-CLIP TSV) and, where known, labels."""

    paths: list[str]
    labels: dict[str, str]
    opener: Any = None


class TsvOpener:
    """Decodes ``/abs/file.tsv#image_id`` keys from their Chinese-CLIP TSVs (picklable, for loader workers)."""

    def __init__(self) -> None:
        self.tsvs: dict[str, Any] = {}

    def __call__(self, key: str):
        return self._tsv(key).open(split_key(key)[1])

    def _tsv(self, key: str):
        from ..data.images import TsvImages

        path = split_key(key)[0]
        if path not in self.tsvs:
            self.tsvs[path] = TsvImages(path)
        return self.tsvs[path]

    def fingerprint(self, key: str) -> int:
        """The content fingerprint of a ``/abs/file.tsv#image_id`` row (-1: gone)."""
        try:
            return self._tsv(key).fingerprint(split_key(key)[1])
        except ClipkdError:  # the TSV is gone
            return -1


def read_source(images: str | Path) -> Source:
    """A folder (class sub-folders give labels), a ``path,label`` image list, a Chinese-CLIP ``*_imgs.tsv``, or
    WebDataset shards (labels: the samples' ``.cls``/``.json``), keyed by absolute path."""
    from ..data.sources import open_source

    src = open_source(images)
    if src.kind == "tsv":
        root = str((src.root / Path(images).name).resolve())
        return Source([f"{root}#{i}" for i in src.keys], {}, TsvOpener())
    root = src.root.resolve()
    # a list's paths may climb out of its folder: each is resolved; folders and shards are keyed under their root
    paths = [str((root / k).resolve()) if src.kind == "list" else str(root / k) for k in src.keys]
    labels = src.labels or [None] * len(paths)
    return Source(paths, {p: lab for p, lab in zip(paths, labels, strict=True) if lab is not None})


def split_key(key: str) -> tuple[str, str]:
    """An index row's key as ``(file, row)``: ``row`` the image id of a Chinese-CLIP TSV row (``FILE.tsv#ID``), else
    ``""`` (a file, whose name may hold a ``#``: ``/photos/#1.jpg``). The one parser of ``#`` in row keys."""
    head, sep, row = key.rpartition("#")
    return (head, row) if sep and head.lower().endswith(".tsv") else (key, "")


def is_tsv_key(path: str) -> bool:
    """Whether an index row names a Chinese-CLIP TSV row rather than a file."""
    return bool(split_key(path)[1])


def _model_ref(model: str | Path | None) -> str | None:
    """A model reference that works from any directory: paths made absolute, specs kept."""
    if model is None:
        return None
    p = Path(model)
    return str(p.resolve()) if p.exists() else str(model)


class SearchIndex:
    """An index folder opened for search; ``encoder`` loads the model that made it (checked by identity)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not (self.root / "index.json").is_file():
            raise ClipkdError(f"not a search index (no index.json): {self.root}; build one with `clipkd index build`")
        self.info: dict[str, Any] = read_json(self.root / "index.json", "index description")
        if not isinstance(self.info, dict) or self.info.get("format") != INDEX_FORMAT:
            raise ClipkdError(f"{self.root / 'index.json'} is not a {INDEX_FORMAT} description")
        rebuild = "re-run the `clipkd index build` that made it (its stored embeddings are reused)"
        missing = [k for k in ("identity", "model", "embed_dim", "kind") if k not in self.info]
        if missing:
            raise ClipkdError(f"index {self.root} is damaged: index.json lacks {missing}; {rebuild}")
        if self.info["kind"] not in KINDS or self.info["kind"] == "auto":
            raise ClipkdError(f"index {self.root} is damaged: index.json names kind {self.info['kind']!r}; {rebuild}")
        self.store = EmbeddingStore(self.root / "store")
        self.paths = self.store.paths
        try:
            self.rows = np.load(self.root / "rows.npy")
            self.index = _faiss().deserialize_index(np.load(self.root / "faiss.npy"))
        except (OSError, ValueError, EOFError, RuntimeError) as e:
            raise ClipkdError(f"index {self.root} is damaged ({first_line(e, 120)}); {rebuild}") from None
        if self.index.ntotal != len(self.rows):
            raise ClipkdError(f"index {self.root}: FAISS holds {self.index.ntotal} rows, rows.npy {len(self.rows)}; "
                              f"{rebuild}")
        self.labels = _read_labels(self.root / "labels.tsv")
        try:
            self._set_search_params()
        except AttributeError:
            raise ClipkdError(f"index {self.root} is damaged: index.json says kind {self.info['kind']!r} but "
                              f"faiss.npy holds a {type(self.index).__name__}; {rebuild}") from None
        self.encoder: Encoder | None = None

    @property
    def identity(self) -> str:
        return self.info["identity"]

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def _set_search_params(self) -> None:
        kind = self.info.get("kind")
        if kind == "hnsw":
            self.index.hnsw.efSearch = int(self.info.get("params", {}).get("efSearch", 64))
        elif kind in ("ivf", "ivfpq"):
            self.index.nprobe = int(self.info.get("params", {}).get("nprobe", 16))

    def load_encoder(self, model: str | Path | None = None, text_model: str | Path | None = None,
                     device: str | None = "auto", precision: str = "auto") -> Any:
        """The model that built the index (or ``model``, refused unless it is the same one). An exported student
        (with no text model, or an exported text tower) is run without PyTorch (:mod:`clipkd.deployed`); anything
        else, or a pair that cannot be (the reason is logged), through :mod:`clipkd.models`."""
        from ..deployed import NotDeployable, load_deployed

        model = model or self.info["model"]
        text = text_model if text_model is not None else (self.info.get("text_model") if model == self.info["model"]
                                                          else None)
        try:
            enc = load_deployed(model, text, device)
        except NotDeployable as why:
            if str(model).endswith(".onnx"):
                log.info("querying %s through PyTorch: %s", self.root, why)
            try:
                from .encoder import load_encoder
            except ImportError as e:
                raise ClipkdError(f"querying {self.root} needs PyTorch ({e.name} is not installed): {why}") from None
            enc = load_encoder(model, text, device, precision)
        check_model(self, enc)
        self.encoder = enc
        return enc

    def search_vectors(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, store rows) for unit query vectors (rows of -1 where fewer than ``k`` exist)."""
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.info["embed_dim"])
        scores, pos = self.index.search(q, min(k, max(1, len(self))))
        rows = np.where(pos >= 0, self.rows[np.clip(pos, 0, None)], -1)
        return scores, rows

    def hits(self, scores: np.ndarray, rows: np.ndarray) -> list[dict[str, Any]]:
        """One query's results as dicts: ``id`` (the store row), ``path``, ``score``, ``label``."""
        out = []
        for s, r in zip(scores.tolist(), rows.tolist(), strict=True):
            if r < 0:
                continue
            path = self.paths[r]
            score = min(1.0, max(-1.0, float(s)))  # a cosine: fp16 rows and FAISS rounding can pass 1 by 1e-5
            out.append({"id": int(r), "path": path, "score": round(score, 6), "label": self.labels.get(path)})
        return out

    def vector(self, row: int) -> np.ndarray:
        """The stored embedding of a row (for "search by this result")."""
        if not 0 <= row < len(self.paths) or self.paths[row] in self.removed:
            raise KeyError(row)
        return np.asarray(self.store.embeddings()[row], dtype=np.float32)

    @property
    def removed(self) -> set[str]:
        if not hasattr(self, "_removed"):
            self._removed = _read_removed(self.root)
        return self._removed

    def open_image(self, row: int):
        """The picture of an indexed row, decoded (files and Chinese-CLIP TSV rows alike)."""
        path = self.paths[row]
        return TsvOpener()(path).convert("RGB") if is_tsv_key(path) else load_rgb(path)

    def embed_images(self, images: Sequence[Any]) -> np.ndarray:
        """Unit embeddings of PIL images with the index's model (loaded on first use)."""
        enc = self.encoder or self.load_encoder()
        return enc.encode_batch([enc.preprocess(im) for im in images])

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        enc = self.encoder or self.load_encoder()
        return np.asarray(enc.encode_text(list(texts)), dtype=np.float32)

    def search(self, image: str | Path | None = None, text: str | None = None, k: int = 10) -> list[dict[str, Any]]:
        """Top-``k`` results for an image file or a text."""
        if (image is None) == (text is None):
            raise ClipkdError("give exactly one query: an image or a text")
        if text is not None:
            if not text.strip():
                raise ClipkdError("the text query is empty")
            q = self.embed_text([text])
        else:
            try:
                img = load_rgb(image)
            except Exception as e:  # noqa: BLE001 - any decode failure is the user's query file
                raise ClipkdError(f"cannot read query image {image}: {type(e).__name__}: {e}") from None
            q = self.embed_images([img])
        scores, rows = self.search_vectors(q, k)
        return self.hits(scores[0], rows[0])

    def save_grid(self, hits: Sequence[dict[str, Any]], out: str | Path, image: str | Path | None = None,
                  text: str | None = None) -> Path:
        """A PNG of a query (``image`` file, or ``text`` as a title) followed by its ``hits`` from :meth:`search`."""
        from ..evaluation.plots import plot_search_grid

        rows = {h["path"]: h["id"] for h in hits}
        return plot_search_grid(load_rgb(image) if image else None, text or str(image), hits,
                                lambda p: self.open_image(rows[p]), out)


def _read_labels(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        p, _, label = line.partition("\t")
        out[p] = label
    return out


def _read_removed(root: Path) -> set[str]:
    f = root / "removed.txt"
    return set(f.read_text(encoding="utf-8").splitlines()) if f.is_file() else set()


def check_model(index: SearchIndex, encoder: Encoder) -> None:
    """Refuse a model that did not build the index (other identity or embedding size), in one line."""
    if encoder.identity != index.identity or encoder.embed_dim != index.info["embed_dim"]:
        raise ClipkdError(f"index {index.root} was built by '{index.identity}' ({index.info['embed_dim']}-d), not by "
                          f"'{encoder.identity}' ({encoder.embed_dim}-d); query it with its own model or build another")


def _choose_kind(kind: str, n: int) -> str:
    if kind not in KINDS:
        raise ClipkdError(f"unknown index kind '{kind}' (choose from {', '.join(KINDS)})")
    if kind == "auto":
        return "flat" if n <= EXACT_MAX else "hnsw"
    return kind


def make_faiss(vectors: np.ndarray, kind: str, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """A FAISS inner-product index of ``kind`` over ``vectors`` (N, D) float32, and its search parameters."""
    faiss = _faiss()
    n, d = vectors.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
        params: dict[str, Any] = {}
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        params = {"M": 32, "efSearch": 64}
        index.hnsw.efSearch = 64
    else:
        nlist = int(max(1, min(4 * np.sqrt(n), n // 39 if n >= 39 else 1)))
        quantizer = faiss.IndexFlatIP(d)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            m = next(m for m in (64, 32, 16, 8, 4, 2, 1) if d % m == 0 and m <= d)
            index = faiss.IndexIVFPQ(quantizer, d, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
        if n < (256 if kind == "ivfpq" else nlist):
            raise ClipkdError(f"{n} images are too few for a {kind} index; use `kind`=flat")
        rng = np.random.default_rng(seed)
        train = vectors[rng.choice(n, min(n, 100_000), replace=False)]
        index.train(train)
        index.nprobe = min(nlist, 16)
        params = {"nlist": nlist, "nprobe": int(index.nprobe)}
    index.add(vectors)
    return index, params


def recall_at_10(index: Any, vectors: np.ndarray, queries: int = 1000, seed: int = 0) -> float:
    """Recall@10 of ``index`` against exact inner-product search, on stored vectors used as queries."""
    faiss = _faiss()
    n = len(vectors)
    q = vectors[np.random.default_rng(seed).choice(n, min(queries, n), replace=False)]
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    k = min(10, n)
    _, want = exact.search(q, k)
    _, got = index.search(q, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(want.tolist(), got.tolist(), strict=True)]))


def _write_faiss(root: Path, store: EmbeddingStore, kind: str, info: dict[str, Any]) -> dict[str, Any]:
    """(Re)build the FAISS index over the store's rows that are not removed; write it and ``index.json``."""
    faiss = _faiss()
    removed = _read_removed(root)
    keep = np.array([i for i, p in enumerate(store.paths) if p not in removed], dtype=np.int64)
    if not len(keep):
        raise ClipkdError(f"index {root} would be empty: no decodable image is left in it")
    vectors = np.ascontiguousarray(store.embeddings()[keep], dtype=np.float32)
    chosen = _choose_kind(kind, len(keep))
    index, params = make_faiss(vectors, chosen)
    recall = 1.0 if chosen == "flat" else recall_at_10(index, vectors)
    atomic_write(root / "faiss.npy", lambda f: np.save(f, faiss.serialize_index(index)))
    write_npy(root / "rows.npy", keep)
    info = {**info, "kind": chosen, "requested_kind": kind, "params": params, "rows": int(len(keep)),
            "removed": len(removed), "skipped": int(store.manifest["skipped_count"]), "recall@10": round(recall, 4)}
    write_json(root / "index.json", info)
    log.info("index %s: %d rows, %s, recall@10 vs exact %.3f", root, len(keep), chosen, recall)
    return info


def _restore_removed(root: Path, paths: Sequence[str]) -> None:
    """Images added again after ``index remove`` dropped them are back in the index (their rows are in the store)."""
    removed = _read_removed(root)
    back = removed.intersection(paths)
    if back:
        write_text(root / "removed.txt", "".join(f"{p}\n" for p in sorted(removed - back)))
        log.info("index %s: %d image(s) removed earlier are back in it", root, len(back))


def _append_labels(root: Path, source: Source) -> None:
    if not source.labels:
        return
    have = _read_labels(root / "labels.tsv")
    have.update(source.labels)
    write_text(root / "labels.tsv", "".join(f"{p}\t{lab}\n" for p, lab in have.items()))


def build_index(model: str | Path, images: str | Path, out: str | Path, kind: str = "auto",
                text_model: str | Path | None = None, device: str | None = "auto", batch_size: int = 64,
                workers: int | None = None, progress: bool = True, encoder: Encoder | None = None,
                precision: str = "auto", add: bool = False) -> SearchIndex:
    """Embed ``images`` (a folder or an image list) with ``model`` into a new index at ``out``, or resume one.

    ``model``: a teacher spec, a ``clip-train`` run, or a distilled student (``text_model``: its teacher, for
    text queries). ``kind``: ``auto`` (exact up to :data:`EXACT_MAX` rows, HNSW above), ``flat``, ``hnsw``,
    ``ivf`` or ``ivfpq``. Killed midway, the same command resumes (finished shards are kept). An index of other
    images at ``out`` is refused unless ``add`` (what :func:`add_to_index` does).
    """
    out = Path(out)
    _choose_kind(kind, 0)
    source = read_source(images)
    r = ranks()  # ranks of one job (torchrun/srun) embed their shares; rank 0 holds the folder and writes the index
    with exclusive(out, "search index") if r.zero else nullcontext():
        existing = read_json(out / "index.json", "index description") if (out / "index.json").is_file() else None
        here = str(Path(images).resolve())
        if existing is not None and not add and here not in existing.get("sources", []):
            raise ClipkdError(f"{out} holds an index of {existing.get('sources')}, not of {here}; add images with "
                              "`clipkd index add`, or build into another `out`")
        if encoder is None:
            from .encoder import load_encoder

            encoder = load_encoder(model, text_model, device, precision)
        enc = encoder
        if existing is not None and existing.get("identity") != enc.identity:
            raise ClipkdError(f"{out} holds an index built by '{existing.get('identity')}', not '{enc.identity}'; "
                              "use another `out`")
        store = embed_paths(enc, "/", source.paths, out / "store", batch_size, workers, progress=progress,
                            opener=source.opener, fingerprint=getattr(source.opener, "fingerprint", None))
        if r.distributed:
            barrier()  # every rank's rows are in the store
            store = EmbeddingStore(out / "store")
        if r.zero:
            _append_labels(out, source)
            _restore_removed(out, source.paths)
            sources = [*(existing or {}).get("sources", []), here]
            _write_faiss(out, store, kind, _describe(model, text_model, enc, sources))
    barrier()  # rank 0 has written the index
    index = SearchIndex(out)
    index.encoder = enc
    return index


def _describe(model: str | Path, text_model: str | Path | None, enc: Encoder, sources: Sequence[str]) -> dict:
    from .encoder import is_student

    return {"format": INDEX_FORMAT, "model": _model_ref(model), "text_model": _model_ref(text_model),
            "identity": enc.identity, "embed_dim": enc.embed_dim, "preprocess": enc.preprocess_cfg.to_dict(),
            "student": is_student(model), "sources": sorted(set(sources))}


def index_store(out: str | Path, model: str | Path, kind: str = "auto", text_model: str | Path | None = None,
                device: str | None = "auto") -> SearchIndex:
    """Make ``out`` a search index over the embedding store already in ``out/store`` (rows keyed by absolute
    path, made by ``model``): for embeddings computed elsewhere, e.g. a benchmark's synthetic gallery."""
    out = Path(out)
    from .encoder import load_encoder

    store = EmbeddingStore(out / "store")
    enc = load_encoder(model, text_model, device)
    store.check_teacher(enc.identity, hint="the store was not made by this model")
    _choose_kind(kind, 0)  # a one-line error for an unknown kind, before the work
    with exclusive(out, "search index"):
        _write_faiss(out, store, kind, _describe(model, text_model, enc, []))
    return SearchIndex(out)


def add_to_index(index_dir: str | Path, images: str | Path, device: str | None = "auto", batch_size: int = 64,
                 workers: int | None = None, progress: bool = True, precision: str = "auto") -> SearchIndex:
    """Embed new images into an index with the model that built it, and rebuild its FAISS index."""
    index = SearchIndex(index_dir)
    info = index.info
    return build_index(info["model"], images, index_dir, info.get("requested_kind", info["kind"]),
                       info.get("text_model"), device, batch_size, workers, progress, precision=precision, add=True)


def remove_from_index(index_dir: str | Path, paths: Sequence[str]) -> int:
    """Drop ``paths`` (as given, or made absolute) from an index; returns how many rows left it."""
    root = Path(index_dir)
    index = SearchIndex(root)
    known = set(index.paths)
    wanted = {p if p in known else str(Path(p).resolve()) for p in paths}
    unknown = sorted(p for p in wanted if p not in known)
    if unknown:
        raise ClipkdError(f"{len(unknown)} path(s) are not in index {root}, e.g. {unknown[:3]}")
    with exclusive(root, "search index"):
        removed = _read_removed(root)
        new = wanted - removed
        if all(p in removed or p in wanted for p in index.store.paths):  # refused before anything is written
            raise ClipkdError(f"index {root} would be empty: removing these would leave no image in it; nothing "
                              "was removed")
        before = (root / "removed.txt").read_text(encoding="utf-8") if (root / "removed.txt").is_file() else None
        write_text(root / "removed.txt", "".join(f"{p}\n" for p in sorted(removed | wanted)))
        try:
            _write_faiss(root, index.store, index.info.get("requested_kind", index.info["kind"]), index.info)
        except BaseException:  # a removal that did not finish changes nothing: the next add must not apply it
            if before is None:
                (root / "removed.txt").unlink(missing_ok=True)
            else:
                write_text(root / "removed.txt", before)
            raise
    return len(new)
