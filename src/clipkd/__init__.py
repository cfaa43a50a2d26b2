"""clipkd: distill large CLIP teachers into small, fast students, and prove what they keep.

The public API, in pipeline order (data flows one way: data → teachers → store → students/training →
evaluation); every ``clipkd`` command is one call of it::

    import clipkd

    teacher = clipkd.load_teacher("open_clip:ViT-B-32@laion2b_s34b_b79k")
    text = clipkd.embed_text(teacher, classes="data/train")                   # TextEmbeddings
    store = clipkd.embed_images(teacher, "data/train", "runs/store")         # EmbeddingStore
    run = clipkd.distill("data/train", "runs/student", clipkd.TrainConfig(student="resnet18"),
                         store=store, text=text_file, split="split.json")  # TrainResult
    result = clipkd.evaluate(run, "data/test", text=text_file, split="split.json")  # EvalResult

Each step takes what the previous one returned (a store, a training result) as well as paths and specs.

Names are imported on first use, so ``import clipkd`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name → the module that defines it
_API: dict[str, str] = {
    "ClipkdError": ".errors",
    # registries of pluggable parts
    "Registry": ".registry",
    "EMBEDDING_LOSSES": ".students.losses", "DISTILL_TERMS": ".students.losses", "KD_LOSSES": ".students.losses",
    "TermInputs": ".students.losses", "BACKENDS": ".teachers", "register_backend": ".teachers",
    # data
    "PreprocessConfig": ".data.preprocess", "LabelledImages": ".data.folders", "load_labelled": ".data.datasets",
    "Split": ".data.splits", "load_split": ".data.splits", "WorldConfig": ".data.synth", "synthesize": ".data.synth",
    "make_pool": ".data.procedural",
    "encode_dataset": ".data.encode", "iter_encoded": ".data.encode", "ImageSource": ".data.sources",
    "open_source": ".data.sources", "read_image_list": ".data.datasets", "write_image_list": ".data.datasets",
    "write_xlsa17": ".data.datasets", "write_coop_split": ".data.datasets", "DigitsConfig": ".data.digits",
    "make_digits_world": ".data.digits", "download": ".data.download", "load_rgb": ".data.loader",
    # teachers and trainable CLIPs
    "ClipModel": ".teachers", "load_teacher": ".teachers", "load_clip": ".teachers",
    # prompts and text embeddings
    "build_prompts": ".prompts", "load_templates": ".prompts", "load_classnames": ".data.datasets",
    "embed_prompts": ".prompts", "embed_text": ".prompts", "TextEmbeddings": ".prompts", "write_prompts": ".prompts",
    "import_seed_text": ".prompts",
    # the embedding store
    "EmbeddingStore": ".store", "embed_images": ".store", "import_npy_folder": ".store", "export_npy_folder": ".store",
    # students and training
    "Student": ".students.model", "StudentConfig": ".students.model", "load_student": ".students.model",
    "convert_weights": ".students.model", "model_spec": ".training.clip_train",
    "TrainConfig": ".training.distill", "TrainResult": ".training.distill", "distill": ".training.distill",
    "train_supervised": ".training.distill", "ClipTrainConfig": ".training.clip_train",
    "clip_train": ".training.clip_train", "TrainerSettings": ".training.recipe",
    # evaluation
    "evaluate": ".evaluation.zeroshot", "EvalResult": ".evaluation.zeroshot", "predict": ".evaluation.zeroshot",
    "Prediction": ".evaluation.zeroshot", "evaluate_retrieval": ".evaluation.retrieval",
    "RetrievalResult": ".evaluation.retrieval", "predict_video": ".evaluation.zeroshot",
    "plot_search_grid": ".evaluation.plots",
    # the model layer: every kind of model behind one pair of loaders
    "ImageModel": ".models", "load_image_model": ".models", "load_text_model": ".models", "with_text": ".models",
    "image_cost": ".models",
    "image_costs": ".models",
    # export, search and serving
    "export_model": ".export", "ExportResult": ".export", "ExportConfig": ".export", "SearchIndex": ".search.index",
    "IndexConfig": ".search.planning",
    "build_index": ".search.writers", "add_to_index": ".search.writers", "remove_from_index": ".search.writers",
    "compact_index": ".search.writers", "append_store": ".search.writers",
    "select_images": ".search.select", "source_pool": ".search.source", "SourcedPool": ".search.source",
    "SourceConfig": ".search.source",
    "serve": ".search.service",
    "check_out_dir": ".fileio",
    "run_demo": ".demo",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'clipkd' has no attribute '{name}'")
    value = getattr(importlib.import_module(_API[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
