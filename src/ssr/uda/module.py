"""The UDA LightningModule: source-only, DACS/DAFormer self-training, MIC and SSR in one loop.

docs/method.md §4.9 (DACS order), §5.2 (MIC), §6.7 (SSR). Each part of the method is its own
object with its own config node, composed by the experiment: the EMA `teacher` (§4.4-§4.5), the
ClassMix + strong augmentation `mixing` (§4.6-§4.7), the ImageNet feature distance `fd` (§4.8),
MIC's `masking` (§5) and SSR's regulariser `sam` (§6); a part left null is off. `self.model` is
the plain segmentor that ships. Manual optimisation reproduces the reference's separate backward
calls (one per loss group) followed by a single optimiser step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from ssr.data.formats import CITYSCAPES_CLASSES, ClassSet
from ssr.errors import UserError
from ssr.metrics import SegMetric
from ssr.model.inference import Inference
from ssr.model.segmentor import Segmentor, View
from ssr.optim import check_optim_config, param_groups, poly_warmup_factor
from ssr.uda.fd import FeatureDistance
from ssr.uda.losses import seg_loss
from ssr.uda.masking import MaskedConsistency
from ssr.uda.mixing import DACSMixing, MixedBatch
from ssr.uda.ssr import SSRRegularizer
from ssr.uda.teacher import EMATeacher

# Logged with prog_bar=True: the terms to watch while a run trains.
PROG_BAR_TERMS = ("src_ce", "mix_ce", "mic_ce", "pl_weight")


class UDAConfigError(UserError, ValueError):
    """An inconsistent UDA configuration (caught at construction, before any data is read)."""


class NonFiniteLossError(UserError, RuntimeError):
    """A loss term became NaN/inf: training stops before the optimiser step corrupts the weights."""


class StudentPass(NamedTuple):
    """One training forward of the student: the views it saw and their stage features."""

    views: list[View]
    feats: list[list[Tensor]]


class UDAModule(pl.LightningModule):
    """Trains `model` (the student) on labelled source and unlabelled target batches.

    Args:
        segmentor: the student network (the only network used at inference).
        optim: AdamW + warm-up/poly settings (config group `optim`).
        inference: the test protocol of validation (config group `inference`).
        teacher: builds the EMA teacher from the student; None = source-only training.
        mixing: ClassMix + strong augmentation (needed with a teacher).
        fd: builds the ImageNet feature distance from the student's backbone; None = no FD.
        masking: MIC's masked image consistency; None = no MIC.
        sam: builds SSR's regulariser from the backbone's stage widths; None = no SSR.
        single_backward: sum every loss group into one backward call instead of the reference's
            separate calls (same gradients, higher peak memory; benchmarks/uda_memory.py).
        compile: a speed mode (off by default): `torch.compile` the student's backbone and head
            in place (state dicts and checkpoints unchanged); the first steps pay for
            compilation, and losses agree with eager mode to rounding (docs/method.md §10).
        channels_last: a layout mode (off by default): every convolution weight of the student,
            teacher, FD copy and SAM in channels-last memory order; same math, other kernels.

    `model_config` (the Hydra model config, set by `ssr.train.build_module`) is stored in
    checkpoints so that eval/export rebuild the student without being told the architecture.
    """

    def __init__(
        self,
        segmentor: Segmentor,
        optim: DictConfig | dict[str, Any],
        inference: Inference | None = None,
        teacher: Callable[[nn.Module], EMATeacher] | None = None,
        mixing: DACSMixing | None = None,
        fd: Callable[[nn.Module], FeatureDistance] | None = None,
        masking: MaskedConsistency | None = None,
        sam: Callable[..., SSRRegularizer] | None = None,
        single_backward: bool = False,
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False  # separate backward per loss group, one step (§4.9)
        if (teacher is None) != (mixing is None):
            raise UDAConfigError("self-training needs both uda.teacher and uda.mixing (or neither)")
        for name, part in (("fd", fd), ("masking", masking), ("sam", sam)):
            if part is not None and teacher is None:
                raise UDAConfigError(f"uda.{name} is part of self-training: set uda.teacher too")
        # Plain containers only: checkpoints must load with torch.load(weights_only=True).
        if isinstance(optim, DictConfig):
            optim = OmegaConf.to_container(optim, resolve=True)  # type: ignore[assignment]
        check_optim_config(optim)
        self.save_hyperparameters(
            {
                "optim": dict(optim),
                "single_backward": single_backward,
                "compile": compile,
                "channels_last": channels_last,
            }
        )
        self.model_config: dict[str, Any] | None = None
        self.model = segmentor
        self.optim_cfg = OmegaConf.create(optim)
        # A segmentor with its own test protocol (HRDA) overrides the configured one.
        self.inference = (inference or Inference()).for_model(segmentor)
        if self.inference.augmented:
            raise UDAConfigError(
                "validation runs one view at the test scale: test-time augmentation "
                "(inference.ratios, inference.flip) is for ssr.eval and ssr.predict (tta=...)"
            )
        self.teacher = teacher(segmentor) if teacher is not None else None
        self.mixing = mixing
        # The frozen ImageNet backbone for FD is a copy taken before the first step (§4.3).
        self.fd = fd(segmentor.backbone) if fd is not None else None
        self.masking = masking
        backbone = segmentor.backbone
        self.sam = (
            sam(stage_dims=list(backbone.embed_dims), stage_heads=list(backbone.num_heads))
            if sam is not None
            else None
        )
        self.single_backward = single_backward
        if channels_last:
            self.to(memory_format=torch.channels_last)
        if compile:  # after the teacher and FD copies: only the trained network is compiled
            self.model.backbone.compile()
            self.model.decode_head.compile()
        self.val_metric = SegMetric()
        self.test_metric = SegMetric()
        self.test_results: dict[str, Any] | None = None
        self.val_results: dict[str, Any] | None = None  # the latest validation (IoU plots)
        self._pending: list[Tensor] = []  # losses awaiting the single summed backward
        self._terms: dict[str, Tensor] = {}  # this step's detached loss terms, checked at its end
        # Debug panels (ssr.run.panels.DebugImages) set `capture_debug` on the steps they draw;
        # only then does the step fill `debug` with detached CPU copies of its tensors.
        self.capture_debug = False
        self.debug: dict[str, Tensor] | None = None

    def configure_classes(self, classes: ClassSet, subsets: Mapping[str, Sequence[int]]) -> None:
        """Train and score on the data's classes: validation and test report its class-subset
        means (e.g. SYNTHIA's mIoU16 / mIoU13) beside mIoU; FD counts its thing classes."""
        if self.model.num_classes != classes.num_classes:
            raise UDAConfigError(
                f"the data declares {classes.num_classes} classes but the model's head has "
                f"{self.model.num_classes}; set model.decode_head.num_classes="
                f"{classes.num_classes} or map the labels to the head's classes"
            )
        if self.fd is not None and classes != CITYSCAPES_CLASSES:
            if list(self.fd.classes) != list(classes.thing_classes):
                raise UDAConfigError(
                    f"uda.fd.classes {list(self.fd.classes)} are Cityscapes' things, not the "
                    f"data's thing_classes {list(classes.thing_classes)}; set "
                    "uda.fd.classes to them or uda.fd=null"
                )
            self.fd.num_classes = classes.num_classes
        self.val_metric = SegMetric(classes.names, subsets=subsets)
        self.test_metric = SegMetric(classes.names, subsets=subsets)

    def random_streams(self) -> dict[str, DACSMixing]:
        """The parts that own generators, whose states checkpoints keep (`ssr.run.rng`)."""
        return {"mixing": self.mixing} if self.mixing is not None else {}

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        opt, sched = self.optimizers(), self.lr_schedulers()
        xs, ys = batch["src_img"], batch["src_lbl"]
        opt.zero_grad(set_to_none=True)
        self.debug = {} if self.capture_debug else None
        self._stash(src_img=xs, src_lbl=ys)
        if self.teacher is None:  # source-only: supervised on the source
            logs = self._supervised("src_ce", self._student(xs), ys)
        else:
            xt = batch["tgt_img"]
            self.teacher.update(self.model, self.global_step)  # EMA, §4.4
            pl_lbl, pl_w = self.teacher.pseudo_label(xt, batch.get("tgt_valid"))  # §4.5
            mixed = self.mixing(xs, ys, xt, pl_lbl, pl_w)  # ClassMix + strong aug, §4.6-§4.7
            self._stash_target(xt, pl_lbl, pl_w, mixed)
            sam_src, sam_mix = self._sam_features(xs, mixed, batch)  # SSR, §6.3

            src = self._student(xs)  # source step (+ SSR's enhanced branch), §6.7
            keep = self.fd is not None  # FD backpropagates through the same backbone graph
            logs = self._supervised("src_ce", src, ys, sam_feats=sam_src, keep_graph=keep)
            if self.fd is not None:  # ImageNet feature distance, §4.8
                fd = self.fd(src.feats[0][-1], src.views[0].image, ys)
                logs |= self._backward({"fd": fd}, scale=self.fd.weight)
            del src
            mix = self._student(mixed.image)  # mixed step (+ SSR), §4.9 / §6.7
            logs |= self._supervised("mix_ce", mix, mixed.label, mixed.weight, sam_feats=sam_mix)
            del mix
            if self.masking is not None:  # MIC: masked target, teacher's labels, §5.2
                img, lbl, w = self.masking.inputs(xs, ys, xt, pl_lbl, pl_w, self.mixing)
                self._stash(mic_img=img)
                scale = self.masking.loss_weight
                logs |= self._supervised("mic_ce", self._student(img), lbl, w, scale=scale)
            logs["pl_weight"] = pl_w.amax()  # the scalar q (rows outside the crop bands)
        self._flush_backward()
        self._check_finite()
        opt.step()
        sched.step()
        self._log_train(logs | {"lr": torch.tensor(sched.get_last_lr()[0])})

    def _student(self, x: Tensor) -> StudentPass:
        # Random views (HRDA's detail box) draw from the mixing stream, which checkpoints keep.
        rng = self.mixing.np_rng if self.mixing is not None else None
        views = self.model.train_views(x, rng=rng)
        return StudentPass(views, [self.model.features(v.image) for v in views])

    def _supervised(
        self,
        name: str,
        student: StudentPass,
        label: Tensor,
        weight: Tensor | None = None,
        sam_feats: Tensor | None = None,
        scale: float = 1.0,
        keep_graph: bool = False,
    ) -> dict[str, Tensor]:
        """The shadow branch's loss (+ SSR's enhanced loss on the same features), one backward."""
        predictions = self.model.decode_train(student.feats, student.views)
        losses = {name: seg_loss(predictions, label, weight, scale=scale)}
        if self.debug is not None:  # only on the steps a debug panel is drawn
            self._stash(**{name.removesuffix("_ce") + "_pred": predictions[0].logits.argmax(1)})
        if sam_feats is not None:
            losses[f"ssr_{name}"], fused = self.sam.enhanced_loss(
                self.model, student.views, student.feats, sam_feats, label, weight
            )
            if self.debug is not None and name == "src_ce":  # how much SAM changes each stage
                plain, enhanced = student.feats[0], fused[0]
                with torch.no_grad():
                    deltas = {i: (enhanced[i] - plain[i]).norm(dim=1) for i in self.sam.stages}
                self._stash(**{f"ssr_delta_{i}": d for i, d in deltas.items()})
        return self._backward(losses, keep_graph=keep_graph)

    def _sam_features(
        self, xs: Tensor, mixed: MixedBatch, batch: dict[str, Any]
    ) -> tuple[Tensor | None, Tensor | None]:
        if self.sam is None:
            return None, None
        return self.sam.step_features(xs, mixed, batch["src_crop"], batch["tgt_crop"])

    def _backward(
        self, losses: dict[str, Tensor], scale: float = 1.0, keep_graph: bool = False
    ) -> dict[str, Tensor]:
        """One backward call of the terms' sum (§4.9), or defer it to the single summed one of
        `single_backward`. Returns the detached terms for logging; `_check_finite` checks them
        before the optimiser step."""
        terms = list(losses.values())
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        if scale != 1.0:
            total = scale * total
        if self.single_backward:
            self._pending.append(total)
        else:
            self.manual_backward(total, retain_graph=keep_graph)
        detached = {name: loss.detach() for name, loss in losses.items()}
        self._terms |= detached
        return detached

    def _check_finite(self) -> None:
        """Stop before the optimiser step if a loss term is NaN/inf. One host sync for all terms,
        at the end of the step: a check per term would stall the GPU's queue each time."""
        terms, self._terms = self._terms, {}
        finite = torch.isfinite(torch.stack([t.float() for t in terms.values()]))
        if not bool(finite.all()):
            flags = zip(terms.items(), finite.tolist(), strict=True)
            name, value = next((n, t) for (n, t), ok in flags if not ok)
            raise NonFiniteLossError(
                f"loss term '{name}' is {value.item()} at step {self.global_step}; stopped "
                "before the optimiser step (the last saved checkpoint is untouched)"
            )

    def _flush_backward(self) -> None:
        """The single summed backward of `single_backward` mode (a no-op otherwise)."""
        if self._pending:
            self.manual_backward(sum(self._pending))
            self._pending.clear()

    def _log_train(self, logs: dict[str, Tensor]) -> None:
        """`train/<term>`; the main terms also in the progress bar."""
        main = {k: v for k, v in logs.items() if k in PROG_BAR_TERMS}
        # sync_dist: under DDP the logged terms are means over ranks, i.e. over the global batch.
        self.log_dict({f"train/{k}": v for k, v in main.items()}, prog_bar=True, sync_dist=True)
        rest = {f"train/{k}": v for k, v in logs.items() if k not in main}
        self.log_dict(rest, prog_bar=False, sync_dist=True)
        total = sum(v for k, v in logs.items() if k.endswith("ce"))
        self.log("train/loss", total, prog_bar=True, sync_dist=True)

    # ---------------------------------------------------------------- debug panels
    def _stash(self, **tensors: Tensor) -> None:
        """Detached CPU copies for the debug panels, only on the steps a callback asked for."""
        if self.debug is not None:
            for k, v in tensors.items():
                v = v.detach().cpu()
                self.debug[k] = v.float() if v.is_floating_point() else v

    def _stash_target(self, xt: Tensor, pl_lbl: Tensor, pl_w: Tensor, mixed: MixedBatch) -> None:
        if self.debug is not None:
            self._stash(tgt_img=xt, pl_lbl=pl_lbl, pl_w=pl_w, mix_img=mixed.image)
            self._stash(mix_lbl=mixed.label, pl_conf=self.teacher.confidence(xt))

    # ---------------------------------------------------------------- validation
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metric)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metric)

    def _eval_step(self, batch: dict[str, Tensor], metric: SegMetric) -> None:
        """Student only (the shadow branch, §3.3) under the test protocol, at label size (§3.2)."""
        label = batch["label"]
        ids, _ = self.inference.predict(self.model, [batch["img"]], label.shape[-2:])
        metric.update(ids, label)

    def on_validation_epoch_end(self) -> None:
        self.val_results = self._log_metric("val", self.val_metric)

    def on_test_epoch_end(self) -> None:
        self.test_results = self._log_metric("test", self.test_metric)

    def _log_metric(self, stage: str, metric: SegMetric) -> dict[str, Any]:
        result = metric.compute()
        metric.reset()
        logs = {f"{stage}/mIoU": result["mIoU"], f"{stage}/aAcc": result["aAcc"]}
        for name in metric.subsets:  # class-subset means (SYNTHIA: mIoU16, mIoU13), beside mIoU
            if name in result:
                logs[f"{stage}/{name}"] = result[name]
        for name, iou in result["IoU"].items():  # the data's classes (configure_metrics)
            if iou is not None:
                logs[f"{stage}/IoU/{name}"] = iou
        self.log_dict(logs, sync_dist=False)
        return result

    # ---------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> dict[str, Any]:
        o = self.optim_cfg
        named = list(self.model.named_parameters(prefix="model"))
        if self.sam is not None:
            named += list(self.sam.named_trainable_parameters(prefix="sam"))
        groups = param_groups(
            named,
            lr=o.lr,
            weight_decay=o.weight_decay,
            head_lr_mult=o.head_lr_mult,
            no_decay_keys=tuple(o.no_decay_keys),
        )
        opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        max_steps = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else 40000

        def factor(step: int) -> float:
            return poly_warmup_factor(
                step,
                max_steps=max_steps,
                warmup_steps=o.warmup_steps,
                warmup_ratio=o.warmup_ratio,
                power=o.power,
            )

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The model config lets `ssr.eval` / `ssr.export` rebuild the student without `model=`."""
        checkpoint["model_config"] = self.model_config
