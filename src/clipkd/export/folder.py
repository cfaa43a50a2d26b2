"""``clipkd export --format timm|open_clip DIR``: a trained model as a folder that the user's own stack loads without
clipkd, the way the Hugging Face Hub serves models:

- ``timm`` (distilled and supervised students): timm's ``config.json`` (``architecture``, ``num_classes`` = the
  student's output size, ``pretrained_cfg`` with the input size, mean/std and crop) and ``model.safetensors``, so
  that ``timm.create_model("local-dir:DIR", pretrained=True)`` is the student (backbone and head in one network) and
  ``timm.data.create_transform(**timm.data.resolve_data_config({}, model=m))`` its preprocessing;
- ``open_clip`` (``clip-train`` runs and open_clip teachers): ``open_clip_config.json`` (the whole model config, so
  clipkd's own architectures build without clipkd) and ``open_clip_model.safetensors``, for
  ``open_clip.create_model_and_transforms("local-dir:DIR")`` and ``open_clip.get_tokenizer("local-dir:DIR")``
  (a Hugging Face tokenizer is saved into the folder; open_clip's BPE ships with open_clip).

Both carry the zero-shot head when ``text`` is given (class names, text embeddings and logit scale in
``classifier.safetensors`` + ``classifier.json``) and a ``README.md`` model card (teacher, data, S/U/H from an
``eval`` result, speed on the exporting machine, license). A student whose architecture only clipkd registers
(``clipkd_rep_*``) also gets ``model.onnx``, folded to plain convolutions, for ONNX Runtime without clipkd; its card
says what to import for timm. Every export is reloaded the way a user would and compared with clipkd's outputs on
sample images before the folder appears (written beside it, then renamed: never half a folder).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ClipkdError, first_line
from .common import FOLDER_FORMATS, PARITY_MIN, ExportResult, batch_images, default_images, sample_images

MARKER = "clipkd_export.json"  # names what wrote the folder: a later export may replace such a folder
SAMPLE_TEXTS = ("a photo of a dog", "a blurry photo of a small red car", "一只猫")


def _cosines(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    c = F.cosine_similarity(a.float(), b.float(), dim=-1)
    return float(c.min()), float(c.mean())


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ClipkdError(f"`out`={out} is a file; a {', '.join(FOLDER_FORMATS)} export is a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ClipkdError(f"`out`={out} is a folder that holds other files; give a new folder (an earlier "
                          "export there would be replaced)")
    if (out / MARKER).is_file():  # an earlier export: replaced, but never with a file someone added to it
        from ..fileio import read_json

        wrote = read_json(out / MARKER, "export record").get("files")
        added = sorted(f.relative_to(out).as_posix() for f in out.rglob("*") if f.is_file()
                       and f.relative_to(out).as_posix() not in (wrote or []) and f.name != MARKER)
        if wrote is not None and added:
            raise ClipkdError(f"`out`={out} is an earlier export that now also holds {len(added)} file(s) it did not "
                              f"write (e.g. {added[0]}); replacing it would delete them: move them, or give a new "
                              "folder")
    from ..fileio import check_can_create

    check_can_create(out.parent, f"the folder of `out`={out}:")


def _publish(tmp: Path, out: Path) -> None:
    """Put the finished folder ``tmp`` at ``out`` in one rename (an earlier export there is replaced)."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _head(text: str | Path | None, space: str, dim: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The zero-shot head from a text-embedding file, checked against the model's space."""
    if text is None:
        return None
    from ..prompts import TextEmbeddings

    emb = TextEmbeddings.load(text)
    if emb.teacher != space:
        raise ClipkdError(f"`text`={text} comes from '{emb.teacher}', but the model's embeddings live in '{space}'")
    if emb.embeddings.shape[1] != dim:
        raise ClipkdError(f"`text`={text} holds {emb.embeddings.shape[1]}-d embeddings; the model gives {dim}-d")
    tensors = {"text_embeddings": torch.from_numpy(emb.embeddings).float().contiguous(),
               "logit_scale": torch.tensor([emb.logit_scale], dtype=torch.float32)}
    return tensors, {"classnames": emb.classnames, "teacher": emb.teacher, "logit_scale": emb.logit_scale,
                     "embed_dim": dim, "usage": "logits = logit_scale * normalize(model(x)) @ text_embeddings.T"}


def _results(results: str | Path | None) -> dict[str, Any] | None:
    if results is None:
        return None
    from ..fileio import read_json

    r = read_json(results, "eval result")
    if not isinstance(r, dict) or "top1" not in r:
        raise ClipkdError(f"`results`={results} is not a `clipkd eval` result (no top1)")
    return r


def _card(kind: str, title: str, facts: list[tuple[str, str]], usage: str, license: str,
          results: dict[str, Any] | None, cost: dict[str, float]) -> str:
    lines = ["---", f"library_name: {kind}", f"license: {license}", "tags:", "- clipkd", "- image-feature-extraction",
             "- zero-shot-image-classification", "---", "", f"# {title}", ""]
    lines += [f"- **{k}**: {v}" for k, v in facts]
    lines += ["", "## Use it", "", "```python", usage.strip(), "```", "", "## Measured", ""]
    if results:
        figures = [("images", str(results.get("n_images"))), ("classes", str(results.get("n_classes"))),
                   ("top-1", f"{results['top1']:.4f}")]
        figures += [(k, f"{results[k]:.4f}") for k in ("S", "U", "H") if results.get(k) is not None]
        lines += [f"On `{Path(str(results.get('images', ''))).name}` (`clipkd eval`): " +
                  ", ".join(f"{k} {v}" for k, v in figures) + "."]
    else:
        lines += ["Not evaluated here: export with `--results` (the JSON `clipkd eval --out` writes) to record S/U/H."]
    lines += ["", f"Speed on the machine that exported it (PyTorch, CPU, batch 1): {cost['cpu_ms_per_image']:.2f} ms "
              f"per image; {cost['image_params_m']:.2f} M parameters, {cost['image_mflops']:.1f} MFLOPs per image.",
              "", "## License", "",
              f"`{license}` as given at export. The weights were distilled from the teacher named above and its terms "
              "(and those of the training images) apply to them too.", ""]
    return "\n".join(lines)


def _write_head(tmp: Path, head: tuple[dict[str, torch.Tensor], dict[str, Any]] | None) -> None:
    from safetensors.torch import save_file

    if head is not None:
        save_file(head[0], str(tmp / "classifier.safetensors"))
        (tmp / "classifier.json").write_text(json.dumps(head[1], indent=2, ensure_ascii=False))


def export_folder(model: str | Path, out: str | Path, format: str = "timm", images: str | Path | None = None,
                  samples: int = 16, text: str | Path | None = None, results: str | Path | None = None,
                  license: str = "other", push_to_hub: str | None = None) -> ExportResult:
    """Write ``model`` as a folder of ``format`` (:data:`FOLDER_FORMATS`) at ``out``, checked by reloading it with
    timm / open_clip alone (cosine ≥ :data:`~clipkd.export.common.PARITY_MIN` on ``samples`` sample images), and
    upload it to the Hugging Face Hub repository ``push_to_hub`` when given."""
    out = Path(out)
    if format not in FOLDER_FORMATS:
        raise ClipkdError(f"unknown folder format '{format}' ({', '.join(FOLDER_FORMATS)})")
    _check_out(out)
    if samples < 1:
        raise ClipkdError(f"`samples` must be ≥ 1, got {samples}")
    record = _results(results)
    images = images if images is not None else default_images(model)
    if images is None:
        raise ClipkdError("give `images` (sample images to check the exported folder against clipkd)")
    files = sample_images(images, samples)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        write = _timm_folder if format == "timm" else _open_clip_folder
        lo, mean, meta = write(model, tmp, images, files, text, record, license)
        if lo < PARITY_MIN:
            raise ClipkdError(f"the {format} folder reloaded gives cosine {lo:.5f} to clipkd's outputs on the sample "
                              f"images (< {PARITY_MIN}); not written")
        meta.update(format=format, parity_min_cosine=lo, samples=len(files),
                    files=sorted(f.relative_to(tmp).as_posix() for f in tmp.rglob("*") if f.is_file()))
        (tmp / MARKER).write_text(json.dumps(meta, indent=2, ensure_ascii=False))
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    extra: dict[str, Any] = {}
    if push_to_hub:
        extra["hub"] = push_folder(out, push_to_hub)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return ExportResult(out, format, meta, len(files), lo, mean, size, extra)


def push_folder(folder: str | Path, repo: str) -> str:
    """Upload an exported folder to the Hugging Face Hub model repository ``repo`` (created if missing); returns the
    commit's address. Needs a token (``HF_TOKEN`` or ``huggingface-cli login``) and the network."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ClipkdError(f"`push_to_hub`={repo!r} is not a repository name (OWNER/NAME)")
    api = HfApi()
    try:
        api.create_repo(repo, repo_type="model", exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                                 commit_message="clipkd export")
    except OfflineModeIsEnabled:
        raise ClipkdError(f"cannot push to {repo}: HF_HUB_OFFLINE is set; the folder {folder} is written") from None
    except (HfHubHTTPError, OSError) as e:
        raise ClipkdError(f"cannot push {folder} to {repo}: {first_line(e, 200)} (the folder is written)") from None
    return str(getattr(info, "commit_url", info))


def _timm_folder(model: str | Path, tmp: Path, images: str | Path, files: list[Path], text: str | Path | None,
                 record: dict[str, Any] | None, license: str) -> tuple[float, float, dict[str, Any]]:
    import timm
    from timm.models import save_for_hf

    from ..models import image_cost, is_student, load_image_model

    if not is_student(model) or Path(model).suffix == ".onnx":
        raise ClipkdError(f"`format`=timm exports a clipkd student (run folder or student.pt); {model} is not one "
                          "(a clip-train run goes to `format`=open_clip)")
    loaded = load_image_model(model, device="cpu", precision="fp32", fold=False)  # the layout timm's name builds
    student = loaded.student.float().eval()
    cfg = student.cfg
    net = _as_timm(student)
    x = batch_images(files, loaded.preprocess)
    with torch.no_grad():
        want = student(x).float()
    prep = cfg.preprocess
    data = {"input_size": (3, *prep.size), "mean": tuple(prep.mean), "std": tuple(prep.std), "crop_pct": 1.0,
            "crop_mode": "center", "interpolation": "bicubic"}
    config: dict[str, Any] = {}
    if cfg.kind == "classifier":
        config["label_names"] = list(cfg.classnames)
    save_for_hf(net, str(tmp), model_config=config, safe_serialization=True, data_config=data)
    head = _head(text, cfg.teacher, cfg.out_dim) if cfg.kind == "embedding" else None
    _write_head(tmp, head)
    own = not _timm_builds_alone(cfg.arch)
    if own:  # folded, for ONNX Runtime without clipkd
        from .onnx import export_onnx

        export_onnx(model, tmp / "model.onnx", images=images, samples=len(files))
    # reloaded as a user would, through timm's own preprocessing
    got_net = timm.create_model(f"local-dir:{tmp}", pretrained=True).eval()
    tf = timm.data.create_transform(**timm.data.resolve_data_config({}, model=got_net))
    with torch.no_grad():
        got = got_net(batch_images(files, tf)).float()
    lo, mean = _cosines(got, want)
    cost = image_cost(model, repeats=50)
    (tmp / "README.md").write_text(_card("timm", f"clipkd student: {cfg.arch} → {cfg.out_dim}-d",
                                         _timm_facts(cfg, head, own), _timm_usage(cfg, head), license, record, cost))
    meta = {"arch": cfg.arch, "kind": cfg.kind, "teacher": cfg.teacher, "out_dim": cfg.out_dim,
            "head": bool(head), "onnx": own, "source": Path(model).name}
    return lo, mean, meta


def _as_timm(student: Any) -> Any:
    """The student as timm's own model of its architecture: the backbone's weights, its head as timm's classifier
    (one line when timm's classifier cannot hold it)."""
    import timm

    cfg = student.cfg
    net = timm.create_model(cfg.arch, pretrained=False, num_classes=cfg.out_dim).eval()
    classifier = net.get_classifier()
    name = next((n for n, m in net.named_modules() if m is classifier), None)
    state = dict(student.backbone.state_dict())
    state.update({f"{name}.{k}": v for k, v in student.head.state_dict().items()})
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ClipkdError(f"timm's '{cfg.arch}' with {cfg.out_dim} outputs does not hold the student's head where "
                          f"its classifier is ({first_line(e, 160)}); export it as ONNX instead") from None
    return net


def _timm_usage(cfg: Any, head: Any) -> str:
    """The model card's code: load the folder with timm, embed an image (and score it with the zero-shot head)."""
    rel = "local-dir:DIR"
    usage = f"""import timm, torch
model = timm.create_model("{rel}", pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=model))
embedding = model(transform(image).unsqueeze(0))  # {"logits over label_names" if cfg.kind == "classifier" else
                                                     f"{cfg.out_dim}-d, in the teacher's image-embedding space"}"""
    if head is not None:
        usage += """
from safetensors.torch import load_file
head = load_file("DIR/classifier.safetensors")  # class names: DIR/classifier.json
logits = head["logit_scale"] * torch.nn.functional.normalize(embedding, dim=-1) @ head["text_embeddings"].T"""
    return usage


def _timm_facts(cfg: Any, head: Any, own: bool) -> list[tuple[str, str]]:
    """The model card's facts of a timm folder."""
    prep = cfg.preprocess
    facts = [("architecture", f"`{cfg.arch}` (timm) with a {cfg.out_dim}-output linear head"),
             ("kind", "distilled embedding student (zero-shot through its teacher's text embeddings)"
              if cfg.kind == "embedding" else "supervised classifier (the baseline)"),
             ("teacher", f"`{cfg.teacher}`" if cfg.teacher else "none"),
             ("input", f"{prep.size[0]}×{prep.size[1]} RGB, bicubic shortest-side resize and centre crop, "
                       f"mean {tuple(round(v, 4) for v in prep.mean)}, std {tuple(round(v, 4) for v in prep.std)}"),
             ("zero-shot head", f"{len(head[1]['classnames'])} classes in classifier.safetensors" if head else
              "none in this folder (export with `--text`)")]
    if own:
        facts.append(("clipkd architecture", f"timm builds `{cfg.arch}` only after `import clipkd.students.repnets` "
                      "(pip install clipkd); without clipkd run `model.onnx` (folded to plain convolutions) with "
                      "ONNX Runtime"))
    return facts


def _timm_builds_alone(arch: str) -> bool:
    """Whether timm registers ``arch`` itself (not clipkd)."""
    import timm.models

    fn = timm.models.model_entrypoint(arch)
    return not fn.__module__.startswith("clipkd")


def _open_clip_folder(model: str | Path, tmp: Path, images: str | Path, files: list[Path], text: str | Path | None,
                      record: dict[str, Any] | None, license: str) -> tuple[float, float, dict[str, Any]]:
    import open_clip
    from open_clip.push_to_hf_hub import save_config_for_hf
    from safetensors.torch import save_file

    from ..models import image_cost, is_student, load_image_model

    if is_student(model):
        raise ClipkdError(f"{model} is a distilled student; `format`=open_clip exports a clip-train run or open_clip "
                          "model (a student goes to `format`=timm)")
    m = load_image_model(model, device="cpu", precision="fp32")
    clip = m.clip
    name = getattr(clip, "model_name", None)
    if name is None or not hasattr(clip, "model") or not isinstance(clip.model, torch.nn.Module) or \
            not clip.identity.startswith("open_clip:"):
        raise ClipkdError(f"{model} is '{clip.identity}', not an open_clip model: `format`=open_clip exports "
                          "open_clip models (Chinese-CLIP keeps its own checkpoint format; export its image tower "
                          "as ONNX)")
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise ClipkdError(f"open_clip has no config for '{name}' to write into the folder")
    net = clip.model.float().eval()
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()},
              str(tmp / "open_clip_model.safetensors"))
    save_config_for_hf(net, tmp / "open_clip_config.json", model_config=model_cfg)
    if model_cfg.get("text_cfg", {}).get("hf_tokenizer_name"):
        clip.tokenizer.save_pretrained(str(tmp))
    head = _head(text, clip.identity, clip.embed_dim)
    _write_head(tmp, head)
    x = batch_images(files, clip.preprocess)
    with torch.no_grad():
        want_i = F.normalize(net.encode_image(x).float(), dim=-1)
        want_t = F.normalize(net.encode_text(clip.tokenizer(list(SAMPLE_TEXTS))).float(), dim=-1)
        got_net, _, tf = open_clip.create_model_and_transforms(f"local-dir:{tmp}")
        got_net.eval()
        tok = open_clip.get_tokenizer(f"local-dir:{tmp}")
        got_i = F.normalize(got_net.encode_image(batch_images(files, tf)).float(), dim=-1)
        got_t = F.normalize(got_net.encode_text(tok(list(SAMPLE_TEXTS))).float(), dim=-1)
    lo_i, mean_i = _cosines(got_i, want_i)
    lo_t, _ = _cosines(got_t, want_t)
    cost = image_cost(model, repeats=50)
    usage = """import open_clip, torch
model, _, transform = open_clip.create_model_and_transforms("local-dir:DIR")
tokenizer = open_clip.get_tokenizer("local-dir:DIR")
image_features = model.encode_image(transform(image).unsqueeze(0))
text_features = model.encode_text(tokenizer(["a photo of a cat"]))"""
    facts = [("architecture", f"open_clip `{name}` ({clip.embed_dim}-d; its config is in open_clip_config.json)"),
             ("teacher", f"`{_distilled_from(model)}`"), ("zero-shot head", f"{len(head[1]['classnames'])} classes in "
              "classifier.safetensors" if head else "none in this folder: embed prompts with the text tower")]
    (tmp / "README.md").write_text(_card("open_clip", f"clipkd CLIP: {name}", facts, usage, license, record, cost))
    meta = {"arch": name, "kind": "clip", "teacher": _distilled_from(model), "identity": clip.identity,
            "out_dim": clip.embed_dim, "head": bool(head),
            "text_min_cosine": lo_t, "source": Path(str(model)).name}
    return min(lo_i, lo_t), mean_i, meta


def _distilled_from(model: str | Path) -> str:
    """The teacher a clip-train run distilled from (its run.json), or none."""
    run = Path(str(model)) / "run.json"
    if run.is_file():
        try:
            return str((json.loads(run.read_text()).get("distillation") or {}).get("teacher") or "none")
        except (OSError, json.JSONDecodeError):
            pass
    return "none"
