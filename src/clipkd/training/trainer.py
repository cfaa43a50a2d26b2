"""The one training loop: a Lightning ``Trainer`` with checkpoints, resume, progress and loss logs."""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader

from ..distributed import gather_objects, init_process_group, ranks
from ..errors import ClipkdError, Interrupted
from .recipe import LOGGERS, TrainerSettings, check_logger  # noqa: F401 - the settings live in recipe.py

log = logging.getLogger(__name__)


def make_loggers(out: Path, name: str) -> list:
    """The CSV logger (``out/logs/metrics.csv``) plus ``name``'s logger when it is not ``csv``."""
    check_logger(name)
    loggers: list = [CSVLogger(out, name="", version="logs")]
    if name == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(out, name="", version="tensorboard"))
    elif name == "wandb":  # pragma: no cover - needs wandb
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(WandbLogger(save_dir=str(out), name=out.name, project="clipkd"))
    return loggers


def accelerator_and_devices(device: str, devices: int | str = 1) -> tuple[str, Any]:
    """``--device`` and ``devices`` → Lightning's (accelerator, devices): ``cuda:N`` keeps its index."""
    if not (devices == "auto" or (isinstance(devices, int) and devices >= 1)):
        raise ClipkdError(f"`devices` must be a number >= 1 or 'auto', got '{devices}'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ClipkdError(f"`device`={device} requested but CUDA is not available on this machine")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu", devices
    if device.startswith("cuda:"):
        index = device.split(":", 1)[1]
        if not index.isdigit():
            raise ClipkdError(f"`device`={device}: expected cuda:N with N a GPU number")
        return "gpu", [int(index)]
    if device == "cuda":
        return "gpu", devices
    raise ClipkdError(f"unknown `device` '{device}' (auto, cpu, cuda, cuda:N)")


def lightning_strategy(settings: TrainerSettings) -> str:
    """``auto`` → ``ddp`` when the run spans several devices, machines or ranks."""
    devices = settings.devices if isinstance(settings.devices, int) else 1
    several = devices > 1 or settings.num_nodes > 1 or ranks().distributed
    return "ddp" if settings.strategy == "auto" and several else settings.strategy


def lightning_precision(precision: str, accelerator: str) -> str:
    """clipkd precision names → Lightning's; CPU always trains in fp32."""
    if accelerator == "cpu" or precision in ("fp32", "32"):
        if precision in ("fp16", "bf16"):
            raise ClipkdError(f"precision {precision} is only supported on GPU; CPU trains in fp32")
        return "32-true"
    return {"auto": "16-mixed", "fp16": "16-mixed", "bf16": "bf16-mixed"}[precision]


class EpochThroughput(Callback):
    """Logs ``img_per_s``: images per second of each epoch, from the end of its first batch to its last.

    Steady state as a user sees it (data loading included; start-up and worker spin-up excluded).
    Lightning's ``ThroughputMonitor`` logs windowed rates on the step cadence instead.
    """

    def __init__(self) -> None:
        self.t0, self.images, self.last = 0.0, 0, 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.t0, self.images = 0.0, 0

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, idx: int) -> None:
        if torch.cuda.is_available() and module.device.type == "cuda":
            torch.cuda.synchronize()
        if self.t0 == 0.0:
            self.t0 = time.perf_counter()
        else:
            self.images += len(batch["index"])

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.images:
            self.last = self.images / (time.perf_counter() - self.t0)
            module.log("img_per_s", self.last, on_epoch=True, sync_dist=trainer.world_size > 1, reduce_fx="sum")


class SkippedImages(Callback):
    """Counts and names the training images the loader could not decode (each image once, over all epochs), and
    the batches that really trained (kept in the checkpoint, so a resumed finished run still knows it trained)."""

    def __init__(self) -> None:
        self.index: set[int] = set()
        self.trained = 0

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch, idx: int) -> None:
        self.index.update(int(i) for i, _ in batch.get("skipped", ()))

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, idx: int) -> None:
        if batch.get("image") is not None:  # a batch with no decodable image trains nothing
            self.trained += 1

    def state_dict(self) -> dict[str, Any]:
        return {"trained": self.trained, "skipped": sorted(self.index)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trained = int(state.get("trained", 0))
        self.index.update(state.get("skipped", []))

    def names(self, dataset: Any) -> list[str]:
        paths = getattr(dataset, "paths", None)
        return [str(paths[i]) if paths is not None else f"#{i}" for i in sorted(self.index)]


def skipped_images(trainer: L.Trainer, loader: DataLoader) -> list[str]:
    """The training images of ``loader`` that could not be decoded during ``fit`` (logged by :func:`fit`)."""
    cb = next((c for c in trainer.callbacks if isinstance(c, SkippedImages)), None)
    return cb.names(loader.dataset) if cb is not None else []


def fit(
    module: L.LightningModule,
    train: DataLoader,
    out: str | Path,
    epochs: int,
    val: DataLoader | None = None,
    monitor: str | None = None,
    device: str = "auto",
    settings: TrainerSettings | None = None,
    accumulate: int = 1,
    resume: bool = True,
    progress: bool = True,
    callbacks: list | None = None,
) -> L.Trainer:
    """Train ``module`` for ``epochs``, checkpointing each epoch into ``out/checkpoints``.

    With ``resume`` (default) a run killed part-way continues from ``checkpoints/last.ckpt``,
    losing at most the unfinished epoch. Losses go to ``out/logs/metrics.csv`` and a training
    curve PNG (``out/training_curves.png``). With ``monitor`` (a logged validation metric, higher
    is better) the best epoch is kept as ``checkpoints/best.ckpt``. ``settings``: devices, nodes,
    strategy, precision and logger (see :class:`TrainerSettings`). ``callbacks``: more Lightning callbacks
    (e.g. 2:4 sparsity masks).

    Raises :class:`Interrupted` when the run is stopped (SIGTERM from a scheduler or ``timeout``, Ctrl+C)
    — never a silent success — and a one-line error when no training step ran (every batch undecodable).
    Images the loader could not decode are counted and named (:func:`skipped_images`).
    """
    if epochs < 1:
        raise ClipkdError(f"`epochs` must be at least 1, got {epochs}")
    out = Path(out).resolve()  # checkpoints record absolute paths: the run folder works from any directory
    settings = settings or TrainerSettings()
    accelerator, devices = accelerator_and_devices(device, settings.devices)
    if ranks().distributed:  # meet the other ranks now, with a short timeout, and hand Lightning the group
        init_process_group("gloo" if accelerator == "cpu" else "nccl")
    skipped = SkippedImages()
    callbacks = _callbacks(out, callbacks, skipped, monitor, progress)
    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    trainer = L.Trainer(max_epochs=epochs, accelerator=accelerator, devices=devices, num_nodes=settings.num_nodes,
                        strategy=lightning_strategy(settings), precision=lightning_precision(settings.precision,
                                                                                             accelerator),
                        accumulate_grad_batches=accumulate, callbacks=callbacks,
                        logger=make_loggers(out, settings.logger), enable_progress_bar=progress,
                        enable_model_summary=False, log_every_n_steps=10, num_sanity_val_steps=0,
                        default_root_dir=out, plugins=[atomic_checkpoint_io()])
    last = out / "checkpoints" / "last.ckpt"
    ckpt = str(last) if resume and last.is_file() else None
    if ckpt is not None:
        _check_checkpoint(last)
    _keep_previous_logs(out / "logs", resuming=ckpt is not None)
    _run_fit(trainer, module, train, val, ckpt, out)
    _report_skipped(trainer, skipped, train, ckpt)
    if not trainer.is_global_zero:
        return trainer
    from ..evaluation.plots import plot_training_curves

    plot_training_curves(sorted((out / "logs").glob("metrics*.csv")), out / "training_curves.png")
    return trainer


def _callbacks(out: Path, extra: list | None, skipped: SkippedImages, monitor: str | None, progress: bool) -> list:
    """The callbacks of every run: throughput, skipped images, ``last.ckpt`` each epoch (and ``best.ckpt`` by
    ``monitor``), the progress bar, after the caller's own."""
    callbacks = [*(extra or []), EpochThroughput(), skipped,
                 ModelCheckpoint(dirpath=out / "checkpoints", filename="last", save_last=False, every_n_epochs=1,
                                 save_top_k=1, enable_version_counter=False)]
    if monitor:
        callbacks.append(ModelCheckpoint(dirpath=out / "checkpoints", filename="best", monitor=monitor,
                                         mode="max", save_top_k=1, enable_version_counter=False))
    if progress:
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    return callbacks


QUIET = (".*does not have many workers.*", ".*Checkpoint directory.*exists and is not empty.*",
         ".*Experiment logs directory.*", ".*smaller than the logging interval.*",
         ".*defined a `validation_step` but have no `val_dataloader`.*",
         ".*distributed.nn.functional.all_gather is deprecated.*")  # Lightning warnings a clipkd run answers


def _run_fit(trainer: L.Trainer, module: L.LightningModule, train: DataLoader, val: DataLoader | None,
             ckpt: str | None, out: Path) -> None:
    """Lightning's ``fit`` from ``ckpt``; a stop (SIGTERM, Ctrl+C) as :class:`Interrupted` with its exit code."""
    with warnings.catch_warnings():
        for message in QUIET:
            warnings.filterwarnings("ignore", message=message)
        try:
            trainer.fit(module, train_dataloaders=train, val_dataloaders=val, ckpt_path=ckpt)
        except SIGTERMException:
            raise Interrupted("interrupted (SIGTERM); re-run the same command to resume from the last "
                              f"finished epoch ({out / 'checkpoints' / 'last.ckpt'})", exit_code=143) from None
        except SystemExit as e:  # Lightning turns Ctrl+C into sys.exit(1)
            raise Interrupted("interrupted; re-run the same command to resume from the last finished epoch",
                              exit_code=130) from e


def _report_skipped(trainer: L.Trainer, skipped: SkippedImages, train: DataLoader, ckpt: str | None) -> None:
    """Name the images no rank could decode; a run in which no step trained is a one-line error."""
    if trainer.world_size > 1:  # each rank saw its share of the data
        skipped.index = set().union(*gather_objects(sorted(skipped.index)))
    names = skipped.names(train.dataset)
    if names:
        log.warning("%d training image(s) could not be decoded and were skipped, e.g. %s", len(names), names[:5])
    if skipped.trained == 0 and (ckpt is None or trainer.global_step == 0):
        raise ClipkdError(f"no training step ran ({len(names)} of {len(train.dataset)} images could not be decoded"
                          f"{', e.g. ' + str(names[:3]) if names else ''}); no model was written")

def _check_checkpoint(path: Path) -> None:
    """A one-line error for a damaged resume checkpoint (truncated, or damaged mid-file)."""
    from ..fileio import check_torch_file

    check_torch_file(path, "resume checkpoint", "delete it to start the run over, or re-run with `overwrite`")


def atomic_checkpoint_io():
    """Lightning's checkpoint writer, made atomic: each checkpoint goes to a temporary file beside it, renamed over
    the old one only once complete, so a full disk or a kill mid-write leaves the previous epoch's ``last.ckpt``."""
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
            final = Path(path)
            tmp = final.with_name(f".{final.name}.partial")
            try:
                super().save_checkpoint(checkpoint, tmp, storage_options)
                os.replace(tmp, final)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise

    return AtomicCheckpointIO()


def _keep_previous_logs(logs: Path, resuming: bool) -> None:
    """Lightning's CSV logger overwrites ``metrics.csv``; on resume keep it as ``metrics-N.csv``."""
    current = logs / "metrics.csv"
    if not current.is_file():
        return
    if not resuming:
        for old in logs.glob("metrics*.csv"):
            old.unlink()
        return
    n = len(list(logs.glob("metrics-*.csv")))
    current.rename(logs / f"metrics-{n:03d}.csv")
