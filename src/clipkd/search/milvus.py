"""Milvus as an index's vector engine: the way past one machine.

``index build --backend milvus --uri URI`` keeps everything else of an index folder (index.json, the embedding store,
the model, labels and columns) and writes its vectors into a Milvus collection instead of a FAISS file: ``URI`` a
file path is Milvus Lite (embedded: tests and small deployments; recorded relative to the index folder, so it moves
with it), ``http://host:19530`` a Milvus server or cluster. A row is ``id`` (the store row), ``vector``, ``key``
(the path relative to the collection root), ``label`` and ``meta`` (an image list's other columns, JSON), so
filters run inside Milvus. ``index add`` inserts the store rows the collection lacks, ``index remove`` deletes
rows; index.json's ``generation`` moves on each change, so a running ``serve`` re-opens the index.

Milvus limits honoured here: top-k at most :data:`MAX_K` (a larger ``num_images`` is clamped by the service's own
cap, or refused in one line), inserts batched well under 64 MB. Milvus Lite keeps FLAT and IVF_FLAT only, and one
process opens its file at a time: a served Lite index takes ``index add/remove`` through the server
(``POST /index/add``, ``/index/remove``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ClipkdError, first_line
from ..fileio import relative

if TYPE_CHECKING:
    from ..store import EmbeddingStore

log = logging.getLogger(__name__)
MAX_K = 16_384  # Milvus's top-k limit
BATCH_BYTES = 16 << 20  # one insert (Milvus refuses more than 64 MB)
_CLIENTS: dict[str, Any] = {}  # one client per URI in a process (Milvus Lite lets one process open its file)


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "tcp://", "grpc://"))


def record_uri(uri: str, out: Path) -> str:
    """The URI as index.json records it: a Lite file relative to the index folder (it moves with it)."""
    return uri if is_remote(uri) else relative(uri, out)


def resolve_uri(uri: str, root: Path) -> str:
    return uri if is_remote(uri) else str((root / uri).resolve())


def connect(uri: str) -> Any:
    """A client of the Milvus at ``uri`` (a server URL, or a Milvus Lite file); one line when it cannot be reached."""
    if uri in _CLIENTS:
        return _CLIENTS[uri]
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise ClipkdError("the Milvus backend needs pymilvus (and milvus-lite for a file URI): "
                          "pip install 'clipkd[search]'") from None
    if not is_remote(uri):
        if uri.endswith(("/", ".")) or (Path(uri).is_dir() and not any(Path(uri).iterdir())):
            raise ClipkdError(f"`uri`={uri}: give a Milvus Lite file (e.g. index.db) or a server URL "
                              "(http://host:19530)")
        if not Path(uri).parent.is_dir():
            raise ClipkdError(f"`uri`={uri}: the folder {Path(uri).parent} does not exist")
    quiet = [logging.getLogger(n) for n in ("milvus_lite", "pymilvus")]  # the one line below says it
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.CRITICAL)
    try:
        client = MilvusClient(uri=uri, timeout=10) if is_remote(uri) else MilvusClient(uri)
        client.list_collections()
    except ClipkdError:
        raise
    except Exception as e:  # noqa: BLE001 - pymilvus raises many kinds; each is the URI's problem
        if is_remote(uri):
            raise ClipkdError(f"cannot reach Milvus at {uri}: {first_line(e, 160)}") from None
        raise ClipkdError(f"cannot open Milvus Lite file {uri} ({first_line(e, 120)}): is it open in another "
                          "process (a running serve)? Change a served Lite index through the server (POST "
                          "/index/add, /index/remove), or use a Milvus server (`uri`=http://host:19530)") from None
    finally:
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)
    _CLIENTS[uri] = client
    return client


def release() -> None:
    """Close the clients this process opened and stop its Milvus Lite servers, so that another process may open
    their files (a server shutting down, or a test handing an index to a subprocess)."""
    for uri in list(_CLIENTS):
        client = _CLIENTS.pop(uri)
        try:
            client.close()
        except Exception:  # noqa: BLE001, S110 - closing what is already gone
            pass
        if not is_remote(uri):
            try:
                from milvus_lite.server_manager import server_manager_instance

                server_manager_instance.release_server(uri)
            except Exception:  # noqa: BLE001, S110 - an older milvus-lite without one
                pass


def check_collection(client: Any, name: str, identity: str, dim: int, uri: str) -> bool:
    """Whether collection ``name`` exists; one of another model (identity or size) is refused in one line."""
    if not client.has_collection(name):
        return False
    props = client.describe_collection(name).get("properties", {}) or {}
    have, have_dim = props.get("clipkd.identity"), props.get("clipkd.dim")
    if have != identity or str(have_dim) != str(dim):
        raise ClipkdError(f"Milvus collection {name!r} at {uri} holds {have_dim}-d rows of '{have}', not {dim}-d "
                          f"rows of '{identity}': choose another `collection`")
    client.load_collection(name)  # searchable (a collection opened by a new process starts released)
    return True


def create_collection(client: Any, name: str, identity: str, dim: int, kind: str, rows: int) -> dict[str, Any]:
    """A collection for an index's rows; ``kind`` flat (exact) or ivf (IVF_FLAT, nlist ~ 4 sqrt(rows));
    returns the search parameters."""
    from pymilvus import DataType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("key", DataType.VARCHAR, max_length=4096)
    schema.add_field("label", DataType.VARCHAR, max_length=1024, nullable=True)
    schema.add_field("meta", DataType.JSON, nullable=True)
    ip = client.prepare_index_params()
    if kind == "flat":
        ip.add_index(field_name="vector", index_type="FLAT", metric_type="IP")
        params: dict[str, Any] = {}
    else:
        nlist = int(max(1, min(4096, 4 * np.sqrt(max(rows, 1)))))
        ip.add_index(field_name="vector", index_type="IVF_FLAT", metric_type="IP", params={"nlist": nlist})
        params = {"nlist": nlist, "nprobe": min(nlist, 32)}
    client.create_collection(name, schema=schema, index_params=ip,
                             properties={"clipkd.identity": identity, "clipkd.dim": str(dim)})
    return params


def insert_rows(client: Any, name: str, store: EmbeddingStore, rows: np.ndarray,
                columns: dict[str, tuple[np.ndarray, list[str]]]) -> None:
    """Write store rows ``rows`` (vectors, keys, label and other columns), in batches under Milvus's limit, as
    upserts: a write killed part-way and run again leaves each row once."""
    keys = store.keys()
    per = max(1, BATCH_BYTES // (store.embed_dim * 4 + 256))
    label = columns.get("label")
    others = {c: v for c, v in columns.items() if c != "label"}
    from tqdm import tqdm

    for start in tqdm(range(0, len(rows), per), desc=f"writing to Milvus {name}", unit="batch",
                      disable=len(rows) < 4 * per):
        part = rows[start:start + per]
        vectors = store.gather(part).astype(np.float32)
        batch = []
        for r, v in zip(part.tolist(), vectors, strict=True):
            meta = {c: vals[int(codes[r])] for c, (codes, vals) in others.items() if r < len(codes) and codes[r] >= 0}
            batch.append({"id": r, "vector": v.tolist(), "key": keys[r],
                          "label": label[1][int(label[0][r])] if label and label[0][r] >= 0 else None,
                          "meta": meta or None})
        client.upsert(name, batch)


def delete_rows(client: Any, name: str, rows: list[int]) -> None:
    for start in range(0, len(rows), 10_000):
        client.delete(name, ids=rows[start:start + 10_000])


def expression(want: list[tuple[str, str]]) -> str:
    """A Milvus filter matching every ``(column, value)`` (``label``, or an image list's other columns in
    ``meta``)."""
    parts = []
    for c, v in want:
        field = "label" if c == "label" else f"meta[{json.dumps(c)}]"
        parts.append(f"{field} == {json.dumps(str(v))}")
    return " and ".join(parts)


def search(client: Any, name: str, q: np.ndarray, k: int, params: dict[str, Any],
           filter_expr: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, store rows; -1 padded) of each query."""
    if k > MAX_K:
        raise ClipkdError(f"Milvus returns at most {MAX_K} results a query; asked for {k}")
    sp = {"metric_type": "IP", "params": {"nprobe": params["nprobe"]} if "nprobe" in params else {}}
    got = client.search(name, data=np.asarray(q, np.float32).tolist(), limit=k, filter=filter_expr or "",
                        search_params=sp)
    scores = np.full((len(q), k), -np.inf, np.float32)
    rows = np.full((len(q), k), -1, np.int64)
    for i, hits in enumerate(got):
        for j, h in enumerate(hits[:k]):
            scores[i, j], rows[i, j] = h["distance"], h["id"]
    return scores, rows


def collection_of(info: dict[str, Any]) -> str:
    return info["milvus"]["collection"]


def open_index(root: Path, info: dict[str, Any]) -> tuple[Any, str]:
    """The client and collection an index folder's index.json names, checked against its model."""
    uri = resolve_uri(info["milvus"]["uri"], root)
    client = connect(uri)
    name = collection_of(info)
    if not check_collection(client, name, info["identity"], int(info["embed_dim"]), uri):
        raise ClipkdError(f"index {root} names Milvus collection {name!r} at {uri}, which does not exist (dropped?); "
                          "re-run its `clipkd index build --backend milvus`")
    return client, name


def read_removed(root: Path) -> set[str]:
    f = root / "milvus-removed.txt"
    return set(f.read_text(encoding="utf-8").splitlines()) if f.is_file() else set()


def removed_file(root: Path) -> Path:
    return root / "milvus-removed.txt"


def info_of(root: Path) -> dict[str, Any]:
    from .layout import read_info

    return read_info(root)


class MilvusBackend:
    """The vectors of an index folder in a Milvus collection: searched and filtered inside Milvus (the rows it
    holds: those inserted, less the removed keys)."""

    name = "milvus"
    index = None  # no FAISS object

    def __init__(self, root: Path, info: dict[str, Any], store: EmbeddingStore) -> None:
        self.root, self.info, self.store = root, info, store
        self.client, self.collection = open_index(root, info)
        self.generation = int(info.get("generation", 0))
        self.removed = read_removed(root)
        self.inserted = min(int(info["milvus"]["inserted"]), len(store))
        self.columns = None  # read from the folder's label and column files
        self.tombstones = np.zeros(0, np.int64)
        self.rows = np.flatnonzero(self.live(len(store)))

    def live(self, n: int) -> np.ndarray:
        """Which of the store's ``n`` rows a query can return."""
        live = np.zeros(n, dtype=bool)
        live[: self.inserted] = True
        if self.removed:
            keys = self.store.keys()
            live[: self.inserted] &= ~np.fromiter((k in self.removed for k in keys[: self.inserted]), bool,
                                                  self.inserted)
        return live

    def __len__(self) -> int:
        return len(self.rows)

    def allowed(self, want: list[tuple[str, str]], codes: Any = None) -> str:
        """A Milvus filter expression for ``want``'s ``(column, value)`` terms."""
        return expression(want)

    def search(self, q: np.ndarray, k: int, allowed: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        return search(self.client, self.collection, q, min(k, max(1, len(self))), self.info["milvus"].get("params", {}),
                      allowed)
