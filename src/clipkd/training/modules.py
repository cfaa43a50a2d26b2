"""LightningModules: a student learning from a teacher (or from labels), and CLIP contrastive training."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from ..students.losses import (
    DISTILL_TERMS,
    TermInputs,
    embedding_loss,
    kd_loss,
    kd_needs_projection,
    kd_needs_text,
    term_needs,
)
from ..students.model import Student, StudentConfig


def cosine_warmup(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    """Linear warmup then cosine decay to zero, stepped every optimizer step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)



class OptimMixin:
    """AdamW with linear warmup + cosine decay over all optimizer steps."""

    lr: float
    weight_decay: float
    warmup: float

    def on_fit_start(self) -> None:
        """Each rank's online teacher runs on that rank's device, beside its student."""
        teacher = getattr(self, "teacher", None)
        if teacher is not None and hasattr(teacher, "to_device"):
            teacher.to_device(self.device)

    @property
    def several_ranks(self) -> bool:
        """Whether the module trains under a trainer with more than one rank (logged means are then synced)."""
        trainer = getattr(self, "_trainer", None)
        return trainer is not None and trainer.world_size > 1

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

    ``kind="embedding"``: the weighted sum of the registered distillation ``terms`` (name → weight;
    see :data:`~clipkd.students.losses.DISTILL_TERMS`), e.g. ``embed`` (embedding ``distance`` to the
    teacher's target) and ``label`` (cross entropy over the seen classes' ``text`` embeddings). Targets
    come from the batch (``batch["target"]``: store rows the data set reads on demand) or from ``teacher`` run on
    the batch's second view (the online path); with both, the store gives the targets of the images left plain
    and the teacher embeds only the mixed ones (``teacher_images`` counts its forwards).
    ``kind="classifier"``: plain cross entropy on the class head (the normal baseline).
    ``label_map`` turns dataset labels (folder classes) into positions among the trained classes.
    """

    def __init__(
        self,
        cfg: StudentConfig,
        label_map: torch.Tensor,
        terms: dict[str, float] | None = None,
        distance: str = "mse",
        text: torch.Tensor | None = None,
        logit_scale: float = 100.0,
        teacher: Any = None,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup: float = 0.05,
        vocab: torch.Tensor | None = None,
        vocab_scale: float = 100.0,
        mix: str = "none",
        mix_alpha: float = 1.0,
        mix_prob: float = 1.0,
        mix_mode: str = "batch",
    ) -> None:
        super().__init__()
        self.student = Student(cfg)
        self.vocab_scale, self.mix, self.mix_alpha, self.mix_prob = vocab_scale, mix, mix_alpha, mix_prob
        self.mix_mode = mix_mode
        self.terms = dict(terms or {"embed": 1.0}) if cfg.kind == "embedding" else {}
        self.needs = term_needs(self.terms) if self.terms else set()
        self.distance = distance
        self.logit_scale, self.lr, self.weight_decay, self.warmup = logit_scale, lr, weight_decay, warmup
        self.teacher = teacher
        self.teacher_images = 0
        self.register_buffer("label_map", label_map.long(), persistent=False)
        self.register_buffer("text", text.float() if text is not None else None, persistent=False)
        self.register_buffer("vocab", vocab.float() if vocab is not None else None, persistent=False)

    def training_step(self, batch: dict[str, Any], _: int) -> torch.Tensor | None:
        if batch["image"] is None:  # every image of the batch was undecodable
            return None
        images = batch["image"]
        n = len(batch["index"])
        mixed = torch.zeros(n, dtype=torch.bool, device=batch["index"].device)
        if self.mix != "none" and self.mix_mode == "elem":  # each image its own ratio, box and coin
            images, mixed = mix_views(images, self.mix, self.mix_alpha, per_image=True, prob=self.mix_prob,
                                      return_mask=True)
        elif self.mix != "none" and (self.mix_prob >= 1 or float(torch.rand(())) < self.mix_prob):  # views alike
            images = mix_views(images, self.mix, self.mix_alpha)
            mixed[:] = True
        student_x = images[0] if isinstance(images, tuple) else images
        out = self.student(student_x)
        labels = self.label_map[batch["label"]]
        logs: dict[str, torch.Tensor] = {}
        if self.student.cfg.kind == "classifier":
            total = logs["loss/ce"] = F.cross_entropy(out, labels)
        else:
            x = TermInputs(out, labels=labels, text=self.text, logit_scale=self.logit_scale, distance=self.distance,
                           vocab=self.vocab, vocab_scale=self.vocab_scale)
            if "target" in self.needs:
                x.target = self._targets(images, batch.get("target"), mixed)
            total = out.new_zeros(())
            for name, weight in self.terms.items():
                logs[f"loss/{name}"] = DISTILL_TERMS.get(name)(x)
                total = total + weight * logs[f"loss/{name}"]
        logs["loss/total"] = total
        self.log_dict(logs, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(student_x),
                      sync_dist=self.several_ranks)  # the mean over every rank's images
        return total

    def _targets(self, images: Any, stored: torch.Tensor | None, mixed: torch.Tensor) -> torch.Tensor:
        """Teacher embeddings of this batch's images: from the store (``stored``, the batch's rows), from the online
        teacher, or both (the store for plain images, the teacher only for mixed ones)."""
        if self.teacher is None:
            return stored.float()
        if stored is None:
            self.teacher_images += len(mixed)
            return self.teacher.encode_image(images[1])
        target = stored.float()
        if mixed.any():
            self.teacher_images += int(mixed.sum())
            target[mixed] = self.teacher.encode_image(images[1][mixed]).to(target.dtype)
        return target


def mix_views(views: tuple[torch.Tensor, ...], how: str, alpha: float = 1.0, per_image: bool = False,
              prob: float = 1.0, return_mask: bool = False):
    """Mix each image of a batch with another of the same batch, identically in every view (the student's
    and the teacher's preprocessing of one picture, possibly at different sizes).

    ``mixup``: ``λ·a + (1-λ)·b``; ``cutmix``: a box of area ``1-λ`` (relative to each view's size) pasted
    from ``b``. ``λ ~ Beta(alpha, alpha)``: one per batch, as timm's ``Mixup`` draws it in its default
    ``batch`` mode, or with ``per_image`` one per image with its own box (timm's ``elem`` mode), each image
    mixed with probability ``prob`` (the others stay as they are). ``return_mask``: also return which images
    were mixed (``per_image`` only).
    """
    n = len(views[0])
    dev = views[0].device
    perm = torch.randperm(n, device=dev)
    if how not in ("mixup", "cutmix"):
        raise ValueError(f"unknown mix '{how}'")
    if per_image:
        lam = torch.distributions.Beta(alpha, alpha).sample((n,)).to(dev)
        chosen = torch.rand(n, device=dev) < prob
        lam = torch.where(chosen, lam, torch.ones_like(lam))
        if how == "mixup":
            out = tuple(lam.view(-1, 1, 1, 1) * v + (1 - lam.view(-1, 1, 1, 1)) * v[perm] for v in views)
            return (out, chosen) if return_mask else out
        cut = (1 - lam).sqrt()
        cy, cx = torch.rand(n, device=dev), torch.rand(n, device=dev)
        out = []
        for v in views:
            h, w = v.shape[-2:]
            ys = (torch.arange(h, device=dev) + 0.5) / h
            xs = (torch.arange(w, device=dev) + 0.5) / w
            in_y = (ys[None] >= (cy - cut / 2)[:, None]) & (ys[None] < (cy + cut / 2)[:, None])
            in_x = (xs[None] >= (cx - cut / 2)[:, None]) & (xs[None] < (cx + cut / 2)[:, None])
            box = (in_y[:, :, None] & in_x[:, None, :])[:, None]  # (n, 1, h, w)
            out.append(torch.where(box, v[perm], v))
        return (tuple(out), chosen) if return_mask else tuple(out)
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    if how == "mixup":
        return tuple(lam * v + (1 - lam) * v[perm] for v in views)
    cut = math.sqrt(1 - lam)
    cy, cx = float(torch.rand(())), float(torch.rand(()))
    out = []
    for v in views:
        h, w = v.shape[-2:]
        y0, y1 = int(max(0, (cy - cut / 2) * h)), int(min(h, (cy + cut / 2) * h))
        x0, x1 = int(max(0, (cx - cut / 2) * w)), int(min(w, (cx + cut / 2) * w))
        v = v.clone()
        v[..., y0:y1, x0:x1] = v[perm][..., y0:y1, x0:x1]
        out.append(v)
    return tuple(out)


def contrastive_loss(rank: int = 0, world: int = 1) -> torch.nn.Module:
    """open_clip's ``ClipLoss`` for rank ``rank`` of ``world``: across ranks, local loss over features gathered with
    their gradients (each rank's images against every rank's texts), so the contrastive batch is the global one."""
    from open_clip import ClipLoss

    if world == 1:
        return ClipLoss()
    return ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)


class ClipModule(OptimMixin, L.LightningModule):
    """A CLIP model trained with open_clip's ``ClipLoss``, plus ``kd_weight`` × a distillation loss.

    ``clip``: the trainable model behind the teacher interface (open_clip or Chinese-CLIP).
    Distillation targets: ``teacher`` run online on the batch's second view, or the batch's store rows
    (``batch["target"]``, read on demand by the data set). The ``affinity`` loss
    also needs ``teacher_text`` (teacher embeddings of the distinct captions, by caption id).
    When ``cosine``/``mse`` compare embeddings of different sizes, a learned linear projection
    maps the student's image embedding into the teacher's space (used only for the loss).
    Validation (``val_texts``/``val_owner``/``val_labels``) logs retrieval metrics each epoch.
    """

    def __init__(
        self,
        clip: Any,
        lr: float = 5e-4,
        weight_decay: float = 0.1,
        warmup: float = 0.05,
        kd_loss: str | None = None,
        kd_weight: float = 0.5,
        teacher: Any = None,
        teacher_dim: int = 0,
        teacher_scale: float = 100.0,
        teacher_text: torch.Tensor | None = None,
        kd_text_weight: float = 0.0,
        freeze_image: bool = False,
        freeze_text: bool = False,
        val_texts: torch.Tensor | None = None,
        val_owner: list[int] | None = None,
        val_labels: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.clip, self.model = clip, clip.model
        self.clip_loss = contrastive_loss()
        self.lr, self.weight_decay, self.warmup = lr, weight_decay, warmup
        self.kd_loss, self.kd_weight, self.teacher, self.teacher_scale = kd_loss, kd_weight, teacher, teacher_scale
        self.register_buffer("teacher_text", teacher_text, persistent=False)
        self.kd_text_weight = kd_text_weight if kd_loss else 0.0
        self.proj = None
        if kd_loss and (kd_needs_projection(kd_loss) or self.kd_text_weight) and teacher_dim and \
                teacher_dim != clip.embed_dim:
            self.proj = torch.nn.Linear(clip.embed_dim, teacher_dim, bias=False)
        self.freeze_image, self.freeze_text = freeze_image, freeze_text
        self.image_prefixes = tuple(getattr(clip, "image_prefixes", ("visual.",)))
        for name, p in self.model.named_parameters():
            is_image = name.startswith(self.image_prefixes)
            if (is_image and freeze_image) or (not is_image and name != "logit_scale" and freeze_text):
                p.requires_grad_(False)
        self.val_texts, self.val_owner, self.val_labels = val_texts, val_owner, val_labels
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []

    def setup(self, stage: str) -> None:
        """Across ranks, the contrastive batch is the global batch: as open_clip trains, each rank scores its own
        images against every rank's texts (and its texts against every rank's images), features gathered with
        their gradients."""
        if self.several_ranks:
            self.clip_loss = contrastive_loss(self.trainer.global_rank, self.trainer.world_size)

    def on_train_epoch_start(self) -> None:
        if self.freeze_image:  # frozen towers keep their normalisation statistics
            for name, m in self.model.named_modules():
                if (name + ".").startswith(self.image_prefixes):
                    m.eval()

    def training_step(self, batch: dict[str, Any], _: int) -> torch.Tensor | None:
        if batch["image"] is None:
            return None
        images = batch["image"]
        x = images[0] if isinstance(images, tuple) else images
        s_img = self.clip.image_features(x)
        # stored views and uncaptioned images (``captioned`` false) train the distillation term alone
        cap = batch.get("captioned")
        rows = cap.bool() if cap is not None and not bool(cap.all()) else None
        s_cap = s_img if rows is None else s_img[rows]
        s_txt = self.clip.text_features(batch["text"] if rows is None else batch["text"][rows])
        scale = self.model.logit_scale.exp()
        logs = {"loss/clip": self.clip_loss(F.normalize(s_cap, dim=-1), F.normalize(s_txt, dim=-1), scale)
                if len(s_cap) > 1 else s_img.sum() * 0}
        total = logs["loss/clip"]
        if self.kd_loss:
            if self.teacher is not None:
                t_img = self.teacher.encode_image(images[1])
            else:
                t_img = batch["target"].float()
            s_kd = self.proj(s_img) if self.proj is not None else s_img
            t_txt = None
            if self.teacher_text is not None:  # the teacher's embeddings of the captioned rows' captions
                t_txt = self.teacher_text[batch["caption_id"] if rows is None else batch["caption_id"][rows]].float()
            if self.kd_text_weight:  # text-tower KD: the student's caption embeddings onto the teacher's
                s_t = self.proj(s_txt) if self.proj is not None else s_txt
                logs["loss/kd_text"] = embedding_loss("mse", s_t, t_txt)
                total = total + self.kd_text_weight * logs["loss/kd_text"]
            if kd_needs_text(self.kd_loss) and rows is not None:  # image–text losses: the captioned rows only
                s_kd, t_img = s_kd[rows], t_img[rows]
            logs[f"loss/kd_{self.kd_loss}"] = kd_loss(self.kd_loss, s_kd, t_img, s_txt, t_txt, scale,
                                                      self.teacher_scale)
            total = total + self.kd_weight * logs[f"loss/kd_{self.kd_loss}"]
        logs["loss/total"] = total
        self.log_dict(logs, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(x),
                      sync_dist=self.several_ranks)
        self.log("logit_scale", scale.detach(), on_step=True, on_epoch=False, batch_size=len(x))
        return total

    def on_train_batch_end(self, *args: Any) -> None:
        with torch.no_grad():  # as open_clip does: clamp the temperature to at most 100
            self.model.logit_scale.clamp_(0, 4.6052)

    def validation_step(self, batch: dict[str, Any], _: int) -> None:
        if batch["image"] is not None:
            self._val.append((F.normalize(self.clip.image_features(batch["image"]).float(), dim=-1).cpu(),
                              batch["index"].cpu()))

    def on_validation_epoch_end(self) -> None:
        from ..distributed import gather_objects
        from ..evaluation.metrics import image_image_metrics, text_image_recall

        parts = [p for rank in gather_objects(self._val) for p in rank] if self.several_ranks else self._val
        self._val = []
        if not parts:
            return
        emb = torch.cat([e for e, _ in parts])
        index = torch.cat([i for _, i in parts]).tolist()
        first = {i: j for j, i in reversed(list(enumerate(index)))}  # a distributed sampler pads with repeats
        rows = sorted(first.values())
        emb, index = emb[rows], [index[j] for j in rows]
        pos = {i: j for j, i in enumerate(index)}
        logs: dict[str, float] = {}
        if self.val_texts is not None:
            keep = [t for t, o in enumerate(self.val_owner) if o in pos]
            tokens = self.val_texts[keep].to(self.device)
            txt = torch.cat([F.normalize(self.clip.text_features(tokens[i : i + 256]).float(), dim=-1).cpu()
                             for i in range(0, len(tokens), 256)])
            r = text_image_recall(emb, txt, [pos[self.val_owner[t]] for t in keep])
            logs.update({f"val/{k}": r[k] for k in ("t2i_r@1", "i2t_r@1", "mean_recall")})
        if self.val_labels is not None:
            r = image_image_metrics(emb, [self.val_labels[i] for i in index])
            logs.update({"val/i2i_map@10": r["i2i_map@10"], "val/i2i_r@1": r["i2i_r@1"]})
        self.log_dict(logs, prog_bar=True, on_epoch=True)
