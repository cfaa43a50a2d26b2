"""LightningModules: a student learning from a teacher (or from labels), and CLIP contrastive training."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from ..students.losses import embedding_loss, label_loss
from ..students.model import Student, StudentConfig
from .trainer import cosine_warmup


class OptimMixin:
    """AdamW with linear warmup + cosine decay over all optimizer steps."""

    lr: float
    weight_decay: float
    warmup: float

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = int(self.warmup * total) if self.warmup < 1 else int(self.warmup)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": cosine_warmup(opt, total, warm), "interval": "step"}}


class StudentModule(OptimMixin, L.LightningModule):
    """Trains a :class:`Student`.

    ``kind="embedding"``: ``embed_weight`` × embedding loss against teacher targets, plus
    ``label_weight`` × cross entropy over scaled cosine logits with the seen classes' text
    embeddings. Targets come from ``targets`` (rows indexed by the dataset index — the store
    path) or from ``teacher`` run on the batch's second view (the online path).
    ``kind="classifier"``: plain cross entropy on the class head (the normal baseline).
    ``label_map`` turns dataset labels (folder classes) into positions among the trained classes.
    """

    def __init__(
        self,
        cfg: StudentConfig,
        label_map: torch.Tensor,
        loss: str = "mse",
        embed_weight: float = 1.0,
        label_weight: float = 0.0,
        text: torch.Tensor | None = None,
        logit_scale: float = 100.0,
        targets: torch.Tensor | None = None,
        teacher: Any = None,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup: float = 0.05,
    ) -> None:
        super().__init__()
        self.student = Student(cfg)
        self.loss, self.embed_weight, self.label_weight = loss, embed_weight, label_weight
        self.logit_scale, self.lr, self.weight_decay, self.warmup = logit_scale, lr, weight_decay, warmup
        self.teacher = teacher
        self.register_buffer("label_map", label_map.long(), persistent=False)
        self.register_buffer("text", text.float() if text is not None else None, persistent=False)
        self.register_buffer("targets", targets if targets is not None else None, persistent=False)

    def training_step(self, batch: dict[str, Any], _: int) -> torch.Tensor | None:
        if batch["image"] is None:  # every image of the batch was undecodable
            return None
        images = batch["image"]
        student_x = images[0] if isinstance(images, tuple) else images
        out = self.student(student_x)
        labels = self.label_map[batch["label"]]
        logs: dict[str, torch.Tensor] = {}
        if self.student.cfg.kind == "classifier":
            total = logs["loss/ce"] = F.cross_entropy(out, labels)
        else:
            total = out.new_zeros(())
            if self.embed_weight > 0:
                if self.teacher is not None:
                    target = self.teacher.encode_image(images[1])
                else:
                    target = self.targets[batch["index"]].float()
                logs["loss/embed"] = embedding_loss(self.loss, out, target)
                total = total + self.embed_weight * logs["loss/embed"]
            if self.label_weight > 0:
                logs["loss/label"] = label_loss(out, self.text, labels, self.logit_scale)
                total = total + self.label_weight * logs["loss/label"]
        logs["loss/total"] = total
        self.log_dict(logs, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(student_x))
        return total


class ClipModule(OptimMixin, L.LightningModule):
    """open_clip model trained with open_clip's ``ClipLoss`` (image–text contrastive)."""

    def __init__(self, model: torch.nn.Module, lr: float = 5e-4, weight_decay: float = 0.1,
                 warmup: float = 0.05) -> None:
        super().__init__()
        from open_clip import ClipLoss

        self.model = model
        self.clip_loss = ClipLoss()
        self.lr, self.weight_decay, self.warmup = lr, weight_decay, warmup

    def training_step(self, batch: dict[str, Any], _: int) -> torch.Tensor | None:
        if batch["image"] is None:
            return None
        out = self.model(batch["image"], batch["text"])
        if not isinstance(out, dict):
            out = dict(zip(("image_features", "text_features", "logit_scale"), out, strict=False))
        loss = self.clip_loss(out["image_features"], out["text_features"], out["logit_scale"])
        self.log_dict({"loss/clip": loss, "logit_scale": out["logit_scale"].detach()}, prog_bar=True,
                      on_step=True, on_epoch=True, batch_size=len(batch["image"]))
        return loss

    def on_train_batch_end(self, *args: Any) -> None:
        with torch.no_grad():  # as open_clip does: clamp the temperature to at most 100
            self.model.logit_scale.clamp_(0, 4.6052)
