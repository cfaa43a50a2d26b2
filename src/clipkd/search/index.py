"""A searchable image index: an embedding store (resumable, sharded, corrupt files skipped and counted) plus a
FAISS index over its rows.

Layout of an index folder::

    index.json     the model (reference, identity, size, preprocessing), the collection root, the FAISS kind, rows,
                   recall@10
    model/         the exported towers or student checkpoint the index was built with, copied in (image/, text/)
    store/         the embedding store; rows keyed by their path relative to the collection root
    labels.tsv     key<TAB>label for sources that have labels (class folders, image lists)
    gen/<N>/       one generation: ``faiss.index`` (``faiss.write_index``), ``rows.npy`` (FAISS position → store row),
                   ``tombstones.npy`` (positions removed, skipped by queries until ``index compact``) and
                   ``removed.txt`` (keys removed); written whole, then named by index.json's ``generation`` (written
                   last, atomically), so a reader (a running ``serve``) sees one generation or the next, never a mix

The folder names no absolute path of the machine that built it: the collection root and any model file outside
``model/`` are recorded relative to the index folder, so an index moved or copied with its images (``mv``,
``rsync``) keeps working, and one copied to a server without them is pointed at the images there
(``serve --images ROOT``).

Exact inner product (``flat``) up to :data:`EXACT_MAX` rows, where one query costs a few milliseconds on a
2-core CPU (17 ms at 100,000 512-d rows, 0.2 ms with HNSW at recall@10 1.000: ``benchmarks/bench_search.py``);
HNSW above it (or ``ivf``/``ivfpq`` on request), with its
recall@10 against exact measured at build time and recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data.images import load_rgb
from ..errors import ClipkdError
from ..store import EmbeddingStore
from .faiss_backend import FaissBackend
from .keys import TsvOpener, is_tsv_key, split_key
from .layout import _resolve_ref, column_codes, read_info

if TYPE_CHECKING:
    from .encoder import Encoder

log = logging.getLogger(__name__)


def filter_terms(label: str | None, where: dict[str, str] | None) -> list[tuple[str, str]]:
    """The ``(column, value)`` terms a query's ``label`` and ``where`` ask for, every one of which must hold: a
    ``where`` label that differs from ``label`` is a second term on the same column, which no row meets."""
    terms = {("label", str(label))} if label is not None else set()
    terms |= {(c, str(v)) for c, v in (where or {}).items()}
    return sorted(terms)


class SearchIndex:
    """An index folder opened for search: its store, keys, labels and columns, and a backend holding its vectors
    (:class:`~clipkd.search.faiss_backend.FaissBackend`, or :class:`~clipkd.search.milvus.MilvusBackend` for an
    index built with ``backend="milvus"``); ``encoder`` loads the model that made it (checked by identity)."""

    def __init__(self, root: str | Path, images: str | Path | None = None) -> None:
        self.root = Path(root)
        info = read_info(self.root)
        self.store = EmbeddingStore(self.root / "store")
        self.paths = self.store.keys()  # read a shard at a time as rows are asked for
        if info.get("backend") == "milvus":
            from .milvus import MilvusBackend

            self.backend: Any = MilvusBackend(self.root, info, self.store)
        else:
            self.backend = FaissBackend(self.root, info, self.store)
        b = self.backend
        self.info: dict[str, Any] = b.info
        self.generation, self.rows, self.tombstones, self.removed = b.generation, b.rows, b.tombstones, b.removed
        self.live = b.live(len(self.paths))  # store rows a query can return
        # filterable columns, coded per store row (an index of clipkd before coded columns: coded here)
        self.codes = b.columns if b.columns is not None else column_codes(self.root, self.paths)
        # the collection root: given (the images on this machine), else where index.json says, relative to the
        # index (indexes of clipkd before portable indexes keyed rows by absolute path: root /)
        self.images_root = Path(images).resolve() if images is not None else \
            (self.root / self.info.get("images", "/")).resolve()
        self.encoder: Encoder | None = None

    @property
    def index(self) -> Any:
        """The FAISS index being searched (None for a Milvus index)."""
        return self.backend.index

    @property
    def identity(self) -> str:
        return self.info["identity"]

    @property
    def model(self) -> str:
        """The model that built the index, as it loads from here (copied in, or relative to the index)."""
        return _resolve_ref(self.info["model"], self.root)

    @property
    def text_model(self) -> str | None:
        return _resolve_ref(self.info.get("text_model"), self.root)

    def key(self, row: int) -> str:
        """Row ``row``'s key read alone (a store's keys: through its shard's line ends, no shard's list of keys
        kept: a server that answers for single rows holds no 65,536 strings per shard it touched)."""
        return self.paths.one(row) if hasattr(self.paths, "one") else self.paths[row]

    def image_path(self, row: int) -> Path:
        """Where a row's image file lies on this machine (a TSV row: its TSV file)."""
        return self.images_root / split_key(self.key(row))[0]

    def check_images(self, sample: int = 64) -> int:
        """Refuse, in one line, a collection root that is not here or lacks most rows (a moved index whose images
        stayed behind); returns how many of the sampled rows are missing."""
        if not self.images_root.is_dir():
            raise ClipkdError(f"the images of index {self.root} are not at {self.images_root}: give the folder "
                              "that holds them here (`--images ROOT`, the folder the index was built from)")
        from ..data.tars import tar_member_path

        rows = np.unique(np.linspace(0, len(self.paths) - 1, min(sample, len(self.paths))).astype(int))
        # a file, a TSV row's TSV, or a WebDataset sample's shard (``shard.tar/key``)
        missing = sum(not (self.image_path(int(r)).exists() or tar_member_path(self.image_path(int(r))))
                      for r in rows)
        if missing * 2 > len(rows):
            raise ClipkdError(f"{missing} of {len(rows)} sampled images of index {self.root} are not under "
                              f"{self.images_root} (e.g. {self.key(int(rows[0]))}): the wrong `--images` root?")
        if missing:
            log.warning("%d of %d sampled images of index %s are missing under %s", missing, len(rows), self.root,
                        self.images_root)
        return missing

    def __len__(self) -> int:
        """Rows a query can return (FAISS rows less the tombstones of removed images)."""
        return len(self.backend)

    def is_live(self, row: int) -> bool:
        """Whether store row ``row`` is in the index and not removed."""
        return 0 <= row < len(self.live) and bool(self.live[row])

    def load_encoder(self, model: str | Path | None = None, text_model: str | Path | None = None,
                     device: str | None = "auto", precision: str = "auto") -> Any:
        """The model that built the index (or ``model``, refused unless it is the same one). An exported student
        (with no text model, or an exported text tower) is run without PyTorch (:mod:`clipkd.deployed`); anything
        else, or a pair that cannot be (the reason is logged), through :mod:`clipkd.models`."""
        from ..deployed import NotDeployable, load_deployed

        model = model or self.model
        text = text_model if text_model is not None else (self.text_model if model == self.model else None)
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

    @property
    def columns(self) -> list[str]:
        """What rows can be filtered on: ``label`` (when the images have labels) and an image list's other columns."""
        return list(self.codes)

    def label(self, row: int) -> str | None:
        """The label of store row ``row`` (None: none)."""
        return self.value("label", row)

    def value(self, column: str, row: int) -> str | None:
        """Column ``column`` of store row ``row`` (None: the row has no value there, or the index no such column)."""
        codes, values = self.codes.get(column, (None, None))
        if codes is None or row >= len(codes) or codes[row] < 0:
            return None
        return values[int(codes[row])]

    def _check_columns(self, want: list[tuple[str, str]]) -> None:
        unknown = sorted(c for c, _ in want if c not in self.codes)
        if unknown:
            raise ClipkdError(f"index {self.root} has no column {unknown[0]!r} to filter on (it has: "
                              f"{', '.join(self.codes) or 'none'})")

    def allowed(self, label: str | None = None, where: dict[str, str] | None = None) -> Any:
        """The rows ``label`` and every ``column: value`` of ``where`` allow, as the backend filters (FAISS
        positions; a Milvus expression), or None for no filter. A column the index does not have is a one-line
        error naming those it has."""
        want = filter_terms(label, where)
        if not want:
            return None
        self._check_columns(want)
        return self.backend.allowed(want, self.codes)

    def search_vectors(self, queries: np.ndarray, k: int = 10, allowed: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, store rows) for unit query vectors (rows of -1 where fewer than ``k`` exist), among
        the rows ``allowed`` when given (:meth:`allowed`). FAISS: exact over them from the store when they are
        few (under a tenth of the rows), else inside FAISS (``IDSelector``: exact on a flat index), and exactly
        again where an approximate search found fewer than ``k`` of them. Removed rows are never returned."""
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.info["embed_dim"])
        return self.backend.search(q, k, allowed)

    def hits(self, scores: np.ndarray, rows: np.ndarray) -> list[dict[str, Any]]:
        """One query's results as dicts: ``id`` (the store row), ``path``, ``score``, ``label``."""
        out = []
        for s, r in zip(scores.tolist(), rows.tolist(), strict=True):
            if r < 0:
                continue
            path = self.key(r)
            score = min(1.0, max(-1.0, float(s)))  # a cosine: fp16 rows and FAISS rounding can pass 1 by 1e-5
            out.append({"id": int(r), "path": path, "score": round(score, 6), "label": self.label(r)})
        return out

    def vector(self, row: int) -> np.ndarray:
        """The stored embedding of a row (for "search by this result")."""
        if not self.is_live(row):
            raise KeyError(row)
        return self.store.gather(np.array([row]))[0].astype(np.float32)

    def open_image(self, row: int):
        """The picture of an indexed row, decoded (files and Chinese-CLIP TSV rows alike)."""
        path = self.key(row)
        return TsvOpener(self.images_root)(path).convert("RGB") if is_tsv_key(path) else load_rgb(self.image_path(row))

    def embed_images(self, images: Sequence[Any]) -> np.ndarray:
        """Unit embeddings of PIL images with the index's model (loaded on first use)."""
        enc = self.encoder or self.load_encoder()
        return enc.encode_batch([enc.preprocess(im) for im in images])

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        enc = self.encoder or self.load_encoder()
        return np.asarray(enc.encode_text(list(texts)), dtype=np.float32)

    def search(self, image: str | Path | None = None, text: str | None = None, k: int = 10,
               label: str | None = None, where: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """Top-``k`` results for an image file or a text; with ``label`` / ``where`` (``{column: value}``), among
        the images that match them (none matching: no results)."""
        allowed = self.allowed(label, where)
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
        scores, rows = self.search_vectors(q, k, allowed)
        return self.hits(scores[0], rows[0])

    def save_grid(self, hits: Sequence[dict[str, Any]], out: str | Path, image: str | Path | None = None,
                  text: str | None = None) -> Path:
        """A PNG of a query (``image`` file, or ``text`` as a title) followed by its ``hits`` from :meth:`search`."""
        from ..evaluation.plots import plot_search_grid

        rows = {h["path"]: h["id"] for h in hits}
        return plot_search_grid(load_rgb(image) if image else None, text or str(image), hits,
                                lambda p: self.open_image(rows[p]), out)


MilvusIndex = SearchIndex  # earlier name of an index opened over Milvus: any index folder opens as SearchIndex


def check_model(index: SearchIndex, encoder: Encoder) -> None:
    """Refuse a model that did not build the index (other identity or embedding size), in one line."""
    if encoder.identity != index.identity or encoder.embed_dim != index.info["embed_dim"]:
        raise ClipkdError(f"index {index.root} was built by '{index.identity}' ({index.info['embed_dim']}-d), not by "
                          f"'{encoder.identity}' ({encoder.embed_dim}-d); query it with its own model or build another")


