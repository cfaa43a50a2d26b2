"""The save stage every student run shares: ``student.pt`` (or the QAT run's ``student.int8.onnx``) and
``run.json`` from what the run trained on, written by rank 0."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..data.loader import ImageDataset
from ..distributed import gather_objects, ranks
from ..fileio import write_json
from ..students.model import save_student
from .build import Built
from .modules import StudentModule
from .recipe import TrainConfig, TrainResult


def _export_qat(module: StudentModule, dataset: ImageDataset, out: Path) -> tuple[Path, dict[str, Any]]:
    """The QAT run's product: ``student.int8.onnx``, checked against its PyTorch graph on training images."""
    from ..students.onnx import student_metadata
    from ..students.quantize import export_qat_onnx

    images = []
    for i in range(min(len(dataset), 64)):
        item = dataset[i]["image"]
        if item is not None:
            images.append(item[0] if isinstance(item, tuple) else item)
        if len(images) == 8:
            break
    path = out / "student.int8.onnx"
    lo = export_qat_onnx(module.student, path, student_metadata(module.student.cfg, str(out.resolve())),
                         check=torch.stack(images) if images else None)
    return path, {"onnx": str(path), "min_cosine_onnx_vs_pytorch": lo}


def save_run(out: Path, cfg: TrainConfig, built: Built, items: int, during: list[str]) -> TrainResult:
    """Record what the run trained on (``during``: the images the loader could not decode) and, on rank 0, write
    the student and ``run.json``."""
    module = built.module
    skipped = built.info.skipped_before + during  # undecodable before training (views) or by the loader
    trained = items - len(during)
    info = {"train": asdict(cfg), **built.info.to_dict(), "train_images": trained, "skipped_images": len(skipped),
            "skipped": skipped[:1000]}
    # teacher forwards: online (every rank's), or the views it embedded; 0 from a store
    info["teacher_images"] = built.info.teacher_images + sum(gather_objects(module.teacher_images))
    path = out / ("student.int8.onnx" if cfg.qat else "student.pt")
    if not ranks().zero:  # rank 0 writes the run's files
        return TrainResult(out, path, train_images=trained, skipped_images=len(skipped))
    if cfg.sparsity:
        from ..students.sparsity import sparsity_report

        info["sparsity"] = sparsity_report(module.student)
    if cfg.qat:
        path, info["qat"] = _export_qat(module, built.dataset, out)
    else:
        path = save_student(out / "student.pt", module.student.cpu(), extra=info)
    write_json(out / "run.json", {**info, "student": asdict(module.student.cfg)})
    return TrainResult(out, path, train_images=trained, skipped_images=len(skipped))
