"""Ranks of a job launched by ``torchrun`` or SLURM (``srun``): who am I, and how ranks share work.

clipkd never launches processes itself. A command started as N ranks (``torchrun --nproc-per-node N`` or
``srun --ntasks N``) reads its rank from the launcher's environment: training hands the ranks to Lightning's
DDP (which reads the same variables), and ``embed-images`` splits the images between ranks by a hash of each
image's key, so the split does not depend on when a rank starts or how many images were already done.
"""

from __future__ import annotations

import os
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

# torch is imported where it is used: a plain process (the lean search server) never loads it here


@dataclass(frozen=True)
class Ranks:
    """This process's place in a job: global ``rank`` of ``world`` ranks, ``local`` rank on its machine."""

    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def zero(self) -> bool:
        """Whether this is rank 0 (the rank that writes a run's files)."""
        return self.rank == 0


def ranks() -> Ranks:
    """The ranks the launcher set: ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) or SLURM with more than
    one task (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``); a plain process is rank 0 of 1."""
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return Ranks(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return Ranks(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return Ranks()


def owner(key: str, world: int) -> int:
    """The rank that handles ``key`` among ``world`` ranks: a stable hash (CRC-32 of the UTF-8 key) modulo
    ``world``, the same in every process and every run."""
    return zlib.crc32(key.encode("utf-8")) % world


def my_share(keys: Sequence[str], r: Ranks | None = None, group: Callable[[str], str] | None = None) -> list[str]:
    """The keys this rank handles (all of them in a plain process); ``group(key)``: split by that instead of the key
    (e.g. a sample's tar shard, so that each rank reads whole shards)."""
    r = r or ranks()
    if not r.distributed:
        return list(keys)
    return [k for k in keys if owner(group(k) if group else k, r.world) == r.rank]


def local_device(device: str | None) -> str | None:
    """``auto``/``cuda`` on rank with local rank L → ``cuda:L`` (one GPU per rank); anything else unchanged."""
    r = ranks()
    if not r.distributed or device not in (None, "auto", "cuda"):
        return device
    import torch

    if torch.cuda.is_available():
        return f"cuda:{r.local % torch.cuda.device_count()}"
    return device


def init_process_group(backend: str | None = None) -> bool:
    """Join the job's process group from the launcher's environment (``backend``: gloo or nccl; default NCCL when
    there is a GPU), if the job has several ranks and the group is not up yet; Lightning's DDP reuses it. Returns
    whether a group is up.

    The ranks meet first with a short timeout (:func:`rank_wait`, 120 s): a process whose ``RANK``/``WORLD_SIZE``
    are leftovers from another job, or whose other ranks never start, is refused in one line instead of waiting
    for PyTorch's rendezvous timeout in silence. After they met, the group's own timeout is two hours."""
    r = ranks()
    if not r.distributed:
        return False
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    env = os.environ
    before = {k: env.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    if "MASTER_ADDR" not in env:  # srun: the address and port Lightning's SLURM environment derives from the job
        from lightning.fabric.plugins.environments import SLURMEnvironment

        if not SLURMEnvironment.detect():
            from .errors import ClipkdError

            raise ClipkdError("MASTER_ADDR is not set: launch the ranks with torchrun or srun, or export "
                              "MASTER_ADDR and MASTER_PORT")
        slurm = SLURMEnvironment()
        env["MASTER_ADDR"], env["MASTER_PORT"] = slurm.main_address, str(slurm.main_port)
    env.setdefault("MASTER_PORT", "29500")
    env.setdefault("RANK", str(r.rank))
    env.setdefault("WORLD_SIZE", str(r.world))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(r.local % torch.cuda.device_count())
    wait = rank_wait()
    try:
        with _native_stderr_held() as held:  # c10d logs each failed connect with a C++ stack: shown only on success
            store, rank, world = next(dist.rendezvous("env://", r.rank, r.world,
                                                      timeout=timedelta(seconds=wait if wait > 0 else 7200)))
        sys.stderr.write("".join(held))
    except (RuntimeError, ValueError) as e:  # torch's DistStoreError / DistNetworkError: the ranks did not meet
        from .errors import ClipkdError, first_line

        address = f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
        for k, v in before.items():  # a refused meeting leaves the environment as it found it
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        raise ClipkdError(
            f"this process is rank {r.rank} of {r.world} (the launcher's RANK/WORLD_SIZE or SLURM variables), but "
            f"the other ranks did not meet it at {address} in {wait:.0f} s "
            f"({first_line(e, 100)}): leftover variables from another job? unset them (env -u RANK -u WORLD_SIZE "
            "-u MASTER_ADDR), or start every rank") from None
    store.set_timeout(timedelta(hours=2))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timedelta(hours=2))
    return True


def barrier() -> None:
    """Wait for every rank (nothing in a plain process)."""
    if init_process_group():
        import torch.distributed as dist

        dist.barrier()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a plain process)."""
    if not init_process_group():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@contextmanager
def _native_stderr_held() -> Iterator[list[str]]:
    """File descriptor 2 (where C++ libraries write) sent to a temporary file for the block; what was written there
    is in the yielded list once the block ends."""
    import tempfile

    written: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+") as held:
        os.dup2(held.fileno(), 2)
        try:
            yield written
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            written.append(held.read())


PRECISIONS = ("auto", "fp32", "fp16", "bf16")  # what a device may compute in (auto: fp16 on GPU, fp32 on CPU)
RANK_WAIT_S = 120.0  # how long ranks wait for each other to start (CLIPKD_RANK_WAIT; 0: no check)


def rank_wait(wait_s: float | None = None) -> float:
    """Seconds the ranks of a job wait for each other to start: ``wait_s``, else ``CLIPKD_RANK_WAIT``, else
    :data:`RANK_WAIT_S` (0: do not check)."""
    if wait_s is not None:
        return wait_s
    try:
        return float(os.environ.get("CLIPKD_RANK_WAIT", RANK_WAIT_S))
    except ValueError:
        from .errors import ClipkdError

        raise ClipkdError(f"CLIPKD_RANK_WAIT must be a number of seconds, got {os.environ['CLIPKD_RANK_WAIT']!r}") \
            from None


def check_peers(folder: str | os.PathLike, what: str) -> None:
    """Ranks that share an output folder (``embed-images``, ``index build``) meet before any work, the way training
    ranks do (:func:`init_process_group`: the launcher's rendezvous with the ``CLIPKD_RANK_WAIT`` timeout). A process
    whose ``RANK``/``WORLD_SIZE`` (or SLURM) variables are leftovers — no other rank will ever come — is refused in
    one line instead of silently doing its share of the work. ``CLIPKD_RANK_WAIT=0`` skips the meeting (ranks
    started one after another on purpose, each doing its share)."""
    from .errors import ClipkdError

    if not ranks().distributed or rank_wait() <= 0:
        return
    try:
        init_process_group()
    except ClipkdError as e:
        raise ClipkdError(f"{e} (nothing was written to {what} {folder})") from None
