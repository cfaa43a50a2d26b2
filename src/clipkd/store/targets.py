"""Training targets read from a store: :class:`TargetRows` (rows memory-mapped from the shards on demand, picklable
for loader workers) and :class:`StoreTargets`."""


from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ClipkdError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("clipkd.store")


class TargetRows:
    """Chosen rows of one or more stores, read on demand from their memory-mapped shards.

    ``rows[i]`` is the ``i``-th row; an integer index gives a (D,) float16 tensor, an array or tensor of indices
    a (n, D) one. Nothing is loaded up front: memory stays flat however large the store, and the object pickles
    without its maps (each loader worker and each rank maps the files itself).
    """

    def __init__(self, files: Sequence[tuple[str, int]], dim: int, rows: np.ndarray) -> None:
        self.files = [(str(f), int(n)) for f, n in files]
        self.dim = int(dim)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum([n for _, n in self.files])]).astype(np.int64)
        self._maps: dict[int, np.ndarray] = {}

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.rows), self.dim)

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}

    def _map(self, shard: int) -> np.ndarray:
        if shard not in self._maps:
            self._maps[shard] = np.load(self.files[shard][0], mmap_mode="r")
        return self._maps[shard]

    def _row(self, g: int) -> np.ndarray:
        shard = bisect.bisect_right(self.starts, g) - 1
        return self._map(shard)[g - int(self.starts[shard])]

    def __getitem__(self, index: Any) -> torch.Tensor:
        import torch  # here, not at the top: reading a store for search needs no PyTorch

        if isinstance(index, (int, np.integer)):
            return torch.from_numpy(np.array(self._row(int(self.rows[index])), dtype=np.float16))
        idx = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.int64).reshape(-1)
        out = np.empty((len(idx), self.dim), np.float16)
        for j, g in enumerate(self.rows[idx].tolist()):
            out[j] = self._row(g)
        return torch.from_numpy(out)

    def numpy(self) -> np.ndarray:
        """Every chosen row as one (n, D) float16 array (loads them: for small selections)."""
        return self[np.arange(len(self))].numpy()

    @staticmethod
    def cat(parts: Sequence[TargetRows]) -> TargetRows:
        """The rows of ``parts``, one after the other."""
        files: list[tuple[str, int]] = []
        rows = []
        for p in parts:
            if p.dim != parts[0].dim:
                raise ClipkdError(f"cannot join stores of {parts[0].dim}-d and {p.dim}-d embeddings")
            rows.append(p.rows + sum(n for _, n in files))
            files += p.files
        return TargetRows(files, parts[0].dim, np.concatenate(rows) if rows else np.zeros(0, np.int64))


@dataclass
class StoreTargets:
    """Teacher embeddings for a list of images: ``targets[i]`` belongs to ``paths[keep[i]]``.

    ``dropped``: the images the store recorded as undecodable when it was built (left out, counted).
    """

    targets: TargetRows  # (len(keep), D) float16, read on demand
    keep: np.ndarray
    dropped: list[str]
