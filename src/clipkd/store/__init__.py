"""The embedding store: a teacher's image embeddings, computed once, in resumable fp16 shards.

Layout of a store folder::

    manifest.json          teacher identity, embed size, preprocessing, counts, shards, skipped files
    shard-00000.npy        (n, D) float16, L2-normalised rows
    shard-00000.txt        the n image paths (relative to the image root), one per line
    shard-00000.size.npy   (n,) int64 byte sizes of those files when they were embedded (ties rows to files)
    shard-00000.fp.npy     (n,) int64 content fingerprints of those files (their first and last 4 KiB hashed), for
                           files whose sizes cannot tell them apart

A shard is written (atomically) before the manifest names it, so a killed run loses at most the
shard it was filling; re-running the same command embeds only images no finished shard holds.
One command writes a store at a time (a lock; a second one gets a one-line error), except the ranks of one
job (``torchrun``/``srun``, see :mod:`clipkd.distributed`): each rank embeds the images a hash of their key gives
it and merges its shards into the manifest under a short lock, re-reading it first and dropping any row another
writer added meanwhile, so ranks may finish in any order, and a job killed part-way may be re-run with another
number of ranks, without a lost or duplicated row.

Reading is memory-mapped: :class:`TargetRows` reads the rows a trainer asks for from the shards on demand, so
a store far larger than memory can feed training, and each loader worker or rank maps the files itself.

Rows are keyed by relative path, so a store also records each file's size: a store used with another
folder whose files share the relative names (``train/`` vs ``test/``) is refused. Sizes, not content
hashes: a ``stat`` per file costs microseconds where hashing reads every byte again; and not mtimes, which
a plain copy of the folder changes.

The rooms: :mod:`.reader` (:class:`EmbeddingStore`, :class:`Keys`), :mod:`.targets` (:class:`TargetRows`, the
training views), :mod:`.writer` (:class:`ShardWriter`, :func:`new_manifest`, the lock), :mod:`.pipeline`
(:func:`embed_images`, :func:`embed_paths`, :func:`embed_views`) and :mod:`.npy` (the per-image ``.npy`` interop).
"""

from .npy import export_npy_folder, import_npy_folder
from .pipeline import embed_images, embed_paths, embed_views
from .reader import MERGE_LOCK, OPEN_SHARDS, STORE_FORMAT, EmbeddingStore, Keys
from .targets import StoreTargets, TargetRows
from .writer import ShardWriter, new_manifest

__all__ = ["export_npy_folder", "import_npy_folder", "embed_images", "embed_paths", "embed_views", "MERGE_LOCK",
           "OPEN_SHARDS", "STORE_FORMAT", "EmbeddingStore", "Keys", "StoreTargets", "TargetRows", "ShardWriter",
           "new_manifest"]
