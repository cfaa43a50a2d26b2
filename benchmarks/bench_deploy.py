"""Deployment benchmark: the teacher against the student as PyTorch, ONNX fp32, ONNX INT8 (static PTQ) and 2:4
sparse — latency at batch 1 (p50, p99), throughput at batch 32, file size — and, on the demo world, S/U/H of each
deployed variant of a distilled student next to its fp32 PyTorch original. All ratios come from this one run.

    python bench_deploy.py --demo-run ../runs/demo --out results/deploy.md
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from common import report, table

import clipkd
from clipkd.export import export_model
from clipkd.students.model import Student, StudentConfig, save_student
from clipkd.students.onnx import OnnxStudent, student_metadata
from clipkd.students.quantize import export_qat_onnx, prepare_qat
from clipkd.students.sparsity import apply_two_four


def latency(fn, x1: torch.Tensor, x32: torch.Tensor, n1: int, n32: int) -> dict[str, float]:
    """Batch-1 p50/p99 in ms over ``n1`` calls; batch-32 images/s (median of ``n32`` calls)."""
    for _ in range(3):
        fn(x1)
    t1 = []
    for _ in range(n1):
        t = time.perf_counter()
        fn(x1)
        t1.append(1000 * (time.perf_counter() - t))
    fn(x32)
    t32 = []
    for _ in range(n32):
        t = time.perf_counter()
        fn(x32)
        t32.append(time.perf_counter() - t)
    return {"b1 p50 ms": float(np.percentile(t1, 50)), "b1 p99 ms": float(np.percentile(t1, 99)),
            "b32 img/s": len(x32) / statistics.median(t32)}


def size_mb(path: Path) -> float:
    return path.stat().st_size / 1e6


def deployed_rows(label: str, model: str | Path, work: Path, calib: Path, x1, x32, n1: int, n32: int) -> list[dict]:
    """``model`` exported by ``clipkd export`` as ONNX fp32 and INT8 (static PTQ), each timed in ONNX Runtime."""
    rows = []
    variants = [("ONNX Runtime fp32", {}), ("ONNX Runtime INT8 (static PTQ, QDQ)", {"int8": True, "calib": calib})]
    for name, kw in variants:
        path = export_model(model, work / f"{label.replace(' ', '-')}-{len(rows)}.onnx", images=calib, **kw).path
        m = OnnxStudent(path, "cpu")
        rows.append({"model": label, "runtime": name, **latency(m, x1, x32, n1, n32), "MB": size_mb(path)})
    return rows


def speed_rows(teacher_spec: str, arch: str, work: Path, calib: Path, n1: int, n32: int,
               smaller: tuple[str, ...] = ()) -> list[dict]:
    """Teacher (eager, ONNX fp32, ONNX INT8) and student (eager, ONNX fp32, ONNX INT8, 2:4 sparse ONNX) at 224 px;
    each of the ``smaller`` architectures deployed (ONNX fp32 and INT8)."""
    teacher = clipkd.load_teacher(teacher_spec, device="cpu")
    x1, x32 = torch.randn(1, 3, 224, 224), torch.randn(32, 3, 224, 224)
    rows = []
    with torch.no_grad():
        t_file = work / "teacher.pt"
        torch.save(teacher.model.visual.state_dict(), t_file)
        rows.append({"model": f"teacher {teacher_spec} (image tower)", "runtime": "PyTorch eager fp32",
                     **latency(teacher.encode_image, x1, x32, n1, n32), "MB": size_mb(t_file)})
        rows += deployed_rows(f"teacher {teacher_spec} (image tower)", teacher_spec, work, calib, x1, x32, n1, n32)
        student = Student(StudentConfig(arch=arch, out_dim=teacher.embed_dim, image_size=224)).eval()
        pt = save_student(work / "student" / "student.pt", student)
        rows.append({"model": f"student {arch}", "runtime": "PyTorch eager fp32",
                     **latency(student, x1, x32, n1, n32), "MB": size_mb(pt)})
        rows += deployed_rows(f"student {arch}", pt, work, calib, x1, x32, n1, n32)
        qat = prepare_qat(student)  # the QAT graph's speed (its ranges from a few calibration batches)
        calib_x = torch.randn(16, 3, 224, 224)
        for i in range(0, 16, 8):
            qat(calib_x[i : i + 8])
        path = work / "student-qat.onnx"
        export_qat_onnx(qat, path, student_metadata(student.cfg, "bench"))
        m = OnnxStudent(path, "cpu")
        rows.append({"model": f"student {arch}", "runtime": "ONNX Runtime INT8 (QAT graph, QDQ)",
                     **latency(m, x1, x32, n1, n32), "MB": size_mb(path)})
        student = Student(StudentConfig(arch=arch, out_dim=teacher.embed_dim, image_size=224)).eval()
        apply_two_four(student)
        sp = save_student(work / "sparse" / "student.pt", student)
        path = export_model(sp, work / "sparse.onnx", images=calib).path
        m = OnnxStudent(path, "cpu")
        rows.append({"model": f"student {arch}, 2:4 sparse", "runtime": "ONNX Runtime fp32 (no sparse CPU kernels)",
                     **latency(m, x1, x32, n1, n32), "MB": size_mb(path)})
        for small in smaller:
            s = Student(StudentConfig(arch=small, out_dim=teacher.embed_dim, image_size=224)).eval()
            rows += deployed_rows(f"student {small}", save_student(work / small / "student.pt", s), work, calib, x1,
                                  x32, n1, n32)
    return rows


def accuracy_rows(demo: Path, work: Path, device: str) -> tuple[list[dict], str]:
    """S/U/H on the demo world of the demo's ``embed`` student and its deployed variants."""
    world, student = demo / "world", demo / "students" / "embed"
    text, split = demo / "text_embeddings.npz", world / "split.json"

    def ev(model: Path | str) -> dict:
        r = clipkd.evaluate(str(model), world / "test", text=text, split=split, device=device, progress=False)
        return {"S": r.S, "U": r.U, "H": r.H}

    rows = [{"variant": "fp32 PyTorch (original)", **ev(student)}]
    onnx = export_model(student, work / "embed.onnx").path
    rows.append({"variant": "ONNX fp32", **ev(onnx)})
    int8 = export_model(student, work / "embed-int8.onnx", int8=True, calib=world / "train").path
    rows.append({"variant": "ONNX INT8 (static PTQ)", **ev(int8)})
    cfg = json.loads((student / "run.json").read_text())["train"]
    tc = replace(clipkd.TrainConfig(), **{k: v for k, v in cfg.items() if k in clipkd.TrainConfig.__dataclass_fields__})
    tc = replace(tc, init=str(student), sparsity="2:4", epochs=1, lr=tc.lr / 4, warmup=0.0)
    sparse = clipkd.distill(world / "train", work / "sparse-run", tc, store=demo / "store", text=text, split=split,
                            device=device, progress=False, overwrite="changed")
    rows.append({"variant": "2:4 sparse, 1 epoch fine-tuned (PyTorch)", **ev(sparse.out)})
    # QAT starts from weights that already work: a small learning rate (lr ÷ 20; ÷ 4 lost 1.2 points of H here)
    qat = clipkd.distill(world / "train", work / "qat-run", replace(tc, sparsity="", qat=True, lr=tc.lr / 5),
                         store=demo / "store", text=text, split=split, device=device, progress=False,
                         overwrite="changed")
    rows.append({"variant": "INT8 QAT, 1 epoch at lr ÷ 20 (ONNX Runtime)", **ev(qat.path)})
    sp_onnx = export_model(sparse.out, work / "embed-sparse.onnx").path
    rows.append({"variant": "2:4 sparse, ONNX fp32", **ev(sp_onnx)})
    base = rows[0]["H"]
    for r in rows:
        r["ΔH (points)"] = f"{100 * (r['H'] - base):+.1f}"
    return rows, json.loads((student / "run.json").read_text())["student"]["arch"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="open_clip:ViT-B-32@random")
    ap.add_argument("--student", default="resnet18")
    ap.add_argument("--smaller", nargs="*", default=["resnet10t", "mobilenetv3_small_100"],
                    help="smaller student architectures, deployed (ONNX fp32, INT8) for the ratio table")
    ap.add_argument("--demo-run", type=Path, default=Path("../runs/demo"), help="a finished `clipkd demo` folder")
    ap.add_argument("--calib", type=Path, help="calibration / parity images (default: the demo world's train/)")
    ap.add_argument("--n1", type=int, default=50, help="batch-1 calls timed")
    ap.add_argument("--n32", type=int, default=5, help="batch-32 calls timed")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="results/deploy.md")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not (a.demo_run / "students" / "embed" / "student.pt").is_file():
        raise SystemExit(f"{a.demo_run} is not a finished demo run: run `make demo` first")
    calib = a.calib or a.demo_run / "world" / "train"
    with tempfile.TemporaryDirectory() as tmp:
        speed = speed_rows(a.teacher, a.student, Path(tmp), calib, a.n1, a.n32, tuple(a.smaller))
        acc, arch = accuracy_rows(a.demo_run, Path(tmp), a.device)
    teachers = [r for r in speed if r["model"].startswith("teacher")]
    students = [r for r in speed if r["model"].startswith("student")]
    teacher = teachers[0]
    deployed_teacher = min(teachers[1:], key=lambda r: r["b1 p50 ms"])  # the teacher as fast as clipkd deploys it
    eager = next(r for r in students if r["runtime"].startswith("PyTorch"))
    int8 = next(r for r in students if "PTQ" in r["runtime"] and r["model"] == eager["model"])
    best = min(students, key=lambda r: r["b1 p50 ms"])
    for r in speed:
        r["vs deployed teacher b1"] = f"{deployed_teacher['b1 p50 ms'] / r['b1 p50 ms']:.1f}×"
        r["vs deployed teacher b32"] = f"{r['b32 img/s'] / deployed_teacher['b32 img/s']:.1f}×"
    reach = ", ".join(f"{r['model']} ({r['runtime']})" for r in students
                      if deployed_teacher["b1 p50 ms"] / r["b1 p50 ms"] >= 8) or "none"
    ratios = (f"The teacher deployed as fast as clipkd exports it ({deployed_teacher['runtime']}) is "
              f"{teacher['b1 p50 ms'] / deployed_teacher['b1 p50 ms']:.1f}× its eager self at batch 1. Best deployed "
              f"student ({best['model']}, {best['runtime']}) vs that deployed teacher at batch 1 (p50): "
              f"**{deployed_teacher['b1 p50 ms'] / best['b1 p50 ms']:.1f}×** (target ≥ 8×; vs the eager teacher "
              f"{teacher['b1 p50 ms'] / best['b1 p50 ms']:.1f}×; the seed base's Jetson ratio 4.2×). Student rows at "
              f"≥ 8× the deployed teacher: {reach}. "
              f"INT8 vs fp32 eager student: **{eager['b1 p50 ms'] / int8['b1 p50 ms']:.2f}×** at batch 1, "
              f"**{int8['b32 img/s'] / eager['b32 img/s']:.2f}×** at batch 32 (target ≥ 2×).")
    body = (table(speed, ["model", "runtime", "b1 p50 ms", "b1 p99 ms", "b32 img/s", "MB", "vs deployed teacher b1",
                          "vs deployed teacher b32"]) + "\n\n" + ratios
            + f"\n\nDemo world, the demo's `embed` student ({arch}, {a.demo_run}), each deployed variant evaluated by "
            "`clipkd eval` on the file itself:\n\n" + table(acc, ["variant", "S", "U", "H", "ΔH (points)"])
            + "\n\nLatency rows use random weights (speed does not depend on them); accuracy rows are the demo's "
            "trained student. 2:4 sparsity gives no speed on a CPU (ONNX Runtime has no sparse kernels there); on a "
            "GPU TensorRT's sparse tactics use it (`clipkd export --format tensorrt`).")
    report("Deployment: teacher vs deployed students (CPU)", body, Path(a.out))


if __name__ == "__main__":
    main()
