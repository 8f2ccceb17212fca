"""The UDA LightningModule: source-only, DACS/DAFormer self-training, MIC and SSR in one loop.

ALGORITHM.md §4.9 (DACS order), §5 (MIC), §6.7 (SSR) and Appendix B. Every training-only network
(EMA teacher, frozen ImageNet backbone, SAM regulariser) lives here; `self.model` is the plain
`Segmentor` that ships. Manual optimisation reproduces the reference's separate backward calls
(one per loss group) followed by a single optimiser step.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from ssr.checkpointing import for_this_rank, gather_from_ranks, rank_seed
from ssr.data.labels import CLASSES, MEAN, STD, THING_CLASSES
from ssr.metrics import SegMetric
from ssr.model.segmentor import Segmentor
from ssr.optim import param_groups, poly_warmup_factor
from ssr.uda.augment import class_mix_masks, mix, strong_augment
from ssr.uda.losses import feature_distance, weighted_ce
from ssr.uda.teacher import EMATeacher


def _plain(cfg: DictConfig | dict[str, Any] | None) -> dict[str, Any] | None:
    """A resolved plain dict (or None) from a Hydra node."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return None if cfg is None else dict(cfg)


# Logged with prog_bar=True: the terms to watch while a run trains (STYLE.md §4.10).
PROG_BAR_TERMS = ("src_ce", "mix_ce", "mic_ce", "pl_weight")


class UDAConfigError(ValueError):
    """An inconsistent UDA configuration (caught at construction, before any data is read)."""


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN/inf: training stops before the optimiser step corrupts the weights."""


class UDAModule(pl.LightningModule):
    """Trains `model` (the student) on labelled source and unlabelled target batches.

    Args:
        segmentor: the student network (the only network used at inference).
        optim: AdamW + warm-up/poly settings (conf/optim).
        self_training: DACS teacher, pseudo-labels, ClassMix, strong aug; False = source-only.
        alpha: EMA decay cap of the teacher (§4.4).
        pseudo_threshold: confidence for the scalar pseudo-label weight (§4.5).
        pl_ignore_top / pl_ignore_bottom: rows of the target crop whose pseudo-label weight is 0.
        color_jitter_strength / color_jitter_p: kornia-0.5 jitter strength, gate threshold (§4.7).
        blur: Gaussian blur in the strong augmentation (§4.7).
        fd_weight: ImageNet feature distance weight on thing classes (§4.8); 0 disables it.
        fd_min_ratio: class-fraction threshold of the label downscaling for FD.
        fd_skip_without_pretrained: FD is meaningless for a randomly initialised backbone; by
            default that is an error (the paper always has ImageNet weights); this skips FD.
        masking: MIC block masker config (`ssr.uda.masking.BlockMasker`), None disables MIC (§5).
        mic_weight: weight of the masked consistency loss.
        sam: SSR regulariser config (`ssr.uda.sam.SamRegularizer`), None disables SSR (§6).
        teacher_bn_eval: deviation: pseudo-label with the teacher fully in eval mode.
        model_config: the Hydra model config, stored in checkpoints so eval/export can rebuild it.
        test_mode / test_crop_size / test_stride: validation inference (§3.2).
        single_backward: sum every loss group into one backward call instead of the reference's
            separate calls (same gradients, higher peak memory; benchmarks/uda_memory.py).
    """

    def __init__(
        self,
        segmentor: Segmentor,
        optim: DictConfig | dict[str, Any],
        self_training: bool = False,
        alpha: float = 0.999,
        pseudo_threshold: float = 0.968,
        pl_ignore_top: int = 15,
        pl_ignore_bottom: int = 120,
        color_jitter_strength: float = 0.2,
        color_jitter_p: float = 0.2,
        blur: bool = True,
        fd_weight: float = 0.0,
        fd_classes: Sequence[int] = THING_CLASSES,
        fd_min_ratio: float = 0.75,
        fd_skip_without_pretrained: bool = False,
        masking: DictConfig | dict[str, Any] | None = None,
        mic_weight: float = 1.0,
        sam: DictConfig | dict[str, Any] | None = None,
        teacher_bn_eval: bool = False,
        model_config: dict[str, Any] | None = None,
        test_mode: str = "whole",
        test_crop_size: Sequence[int] = (512, 512),
        test_stride: Sequence[int] = (341, 341),
        seed: int = 0,
        single_backward: bool = False,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False  # separate backward per loss group, one step (§4.9)
        # Plain containers only: checkpoints must load with torch.load(weights_only=True).
        optim, masking, sam, model_config = (_plain(c) for c in (optim, masking, sam, model_config))
        fd_classes, test_crop_size, test_stride = (
            list(v) for v in (fd_classes, test_crop_size, test_stride)
        )
        self.save_hyperparameters(ignore=["segmentor"])
        self.model = segmentor
        self.optim_cfg = OmegaConf.create(optim)
        self.self_training = self_training
        self.teacher = (
            EMATeacher(segmentor, alpha=alpha, bn_eval=teacher_bn_eval) if self_training else None
        )
        pretrained = getattr(segmentor.backbone, "pretrained_path", None)
        if fd_weight > 0 and not self_training:
            raise UDAConfigError("fd_weight > 0 needs self_training (FD is part of the DACS loop)")
        if fd_weight > 0 and pretrained is None and not fd_skip_without_pretrained:
            raise UDAConfigError(
                "ImageNet feature distance needs an ImageNet-initialised backbone "
                "(model.backbone.pretrained=<mit_bX.pth>); set uda.fd_skip_without_pretrained=true "
                "to train without FD"
            )
        self.fd_weight = fd_weight if pretrained is not None else 0.0
        # Frozen ImageNet backbone for FD: a copy taken before the first step (§4.3).
        self.imnet_backbone = self._frozen_copy(segmentor.backbone) if self.fd_weight else None
        self.masker = instantiate(masking) if masking is not None else None
        # An empty stage list is Table I's "no stage" row: plain DAFormer, no SAM at all.
        if sam is not None and len(sam.get("stages", [0])) == 0:
            sam = None
        self.sam = (
            instantiate(
                sam,
                stage_dims=list(segmentor.backbone.embed_dims),
                stage_heads=list(segmentor.backbone.num_heads),
                data_mean=list(MEAN),
                data_std=list(STD),
            )
            if sam is not None
            else None
        )
        self.val_metric = SegMetric()
        self.test_metric = SegMetric()
        self.test_results: dict[str, Any] | None = None
        self.val_results: dict[str, Any] | None = None  # the latest validation (IoU plots)
        # Own RNGs (ClassMix classes, gates, jitter factors, blur sigma, MIC masks), saved in
        # checkpoints so a resumed run draws the same numbers.
        self.np_rng = np.random.default_rng(seed)
        self.py_rng = random.Random(seed)
        self.torch_gen = torch.Generator().manual_seed(seed)
        self._pending: list[Tensor] = []  # losses awaiting the single summed backward
        # Debug panels (ssr.callbacks.DebugImages) set `capture_debug` on the steps they draw;
        # only then does the step fill `debug` with detached CPU copies of its tensors.
        self.capture_debug = False
        self.debug: dict[str, Tensor] | None = None

    @staticmethod
    def _frozen_copy(module: nn.Module) -> nn.Module:
        frozen = copy.deepcopy(module).eval()
        frozen.requires_grad_(False)
        return frozen

    def train(self, mode: bool = True) -> UDAModule:
        """Keep the frozen ImageNet backbone in eval mode (the teacher stays in train mode §4.4)."""
        super().train(mode)
        if self.imnet_backbone is not None:
            self.imnet_backbone.eval()
        return self

    def setup(self, stage: str) -> None:
        """Cached SAM features are cut at each crop's box: ask the datamodule to send them."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.sam is not None and self.sam.cache is not None and datamodule is not None:
            datamodule.crop_info = True
        self._seed_rank_streams(stage)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        opt, sched = self.optimizers(), self.lr_schedulers()
        xs, ys, step = batch["src_img"], batch["src_lbl"], self.global_step
        opt.zero_grad(set_to_none=True)
        logs: dict[str, Tensor] = {}
        self.debug = {} if self.capture_debug else None
        self._stash(src_img=xs, src_lbl=ys)
        if not self.self_training:
            logs |= self._seg_backward("src_ce", self.model.features(xs), ys)
        else:
            xt = batch["tgt_img"]
            self.teacher.update(self.model, step)
            pl_lbl, pl_w = self.teacher.pseudo_label(xt, **self._pl_kwargs())
            logs["pl_weight"] = pl_w.amax()  # the scalar q (rows outside the crop bands)
            xm, ym, wm, mask = self._class_mix(xs, ys, xt, pl_lbl, pl_w)
            self._stash(tgt_img=xt, pl_lbl=pl_lbl, pl_w=pl_w, mix_img=xm, mix_lbl=ym)
            if self.debug is not None:
                self._stash(pl_conf=self._teacher_confidence(xt))
            sam_src, sam_mix = (
                self.sam.step_features(xs, xm, mask, batch) if self.sam else (None,) * 2
            )

            feats = self.model.features(xs)
            logs |= self._seg_backward("src_ce", feats, ys, sam_feats=sam_src, keep=self.fd_weight)
            if self.fd_weight:
                logs["fd"] = self._fd_backward(xs, ys, feats)
            del feats
            logs |= self._seg_backward("mix_ce", self.model.features(xm), ym, wm, sam_feats=sam_mix)
            if self.masker is not None:
                xk = self.masker(self._strong_aug(xt, per_image=False), generator=self.torch_gen)
                self._stash(mic_img=xk)
                logs |= self._seg_backward(
                    "mic_ce", self.model.features(xk), pl_lbl, pl_w, scale=self.hparams.mic_weight
                )
        self._flush_backward()
        opt.step()
        sched.step()
        self._log_train(logs | {"lr": torch.tensor(sched.get_last_lr()[0])})

    def _log_train(self, logs: dict[str, Tensor]) -> None:
        """`train/<term>`; the main terms also in the progress bar (STYLE.md §4.10)."""
        main = {k: v for k, v in logs.items() if k in PROG_BAR_TERMS}
        # sync_dist: under DDP the logged terms are means over ranks, i.e. over the global batch.
        self.log_dict({f"train/{k}": v for k, v in main.items()}, prog_bar=True, sync_dist=True)
        rest = {f"train/{k}": v for k, v in logs.items() if k not in main}
        self.log_dict(rest, prog_bar=False, sync_dist=True)
        total = sum(v for k, v in logs.items() if k.endswith("ce"))
        self.log("train/loss", total, prog_bar=True, sync_dist=True)

    def _pl_kwargs(self) -> dict[str, Any]:
        hp = self.hparams
        return dict(
            threshold=hp.pseudo_threshold,
            ignore_top=hp.pl_ignore_top,
            ignore_bottom=hp.pl_ignore_bottom,
        )

    def _strong_aug(self, x: Tensor, per_image: bool) -> Tensor:
        """Colour jitter + blur with gates drawn once per call and shared by the batch (§4.7)."""
        u_jitter, u_blur = self.py_rng.random(), self.py_rng.random()
        return strong_augment(
            x,
            u_jitter=u_jitter,
            u_blur=u_blur if self.hparams.blur else 0.0,
            mean=MEAN,
            std=STD,
            strength=self.hparams.color_jitter_strength,
            jitter_p=self.hparams.color_jitter_p,
            generator=self.torch_gen,
            np_rng=self.np_rng,
            per_image_order=per_image,
        )

    def _class_mix(
        self, xs: Tensor, ys: Tensor, xt: Tensor, pl_lbl: Tensor, pl_w: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """ClassMix source classes onto the target crop, then strongly augment (§4.6).

        Returns the mixed image, label, weight and the mask (cached SAM features are mixed too).
        """
        m = class_mix_masks(ys, self.np_rng)  # (B, 1, H, W)
        xm = mix(m, xs, xt)
        ym = mix(m[:, 0], ys, pl_lbl).long()
        wm = mix(m[:, 0], torch.ones_like(pl_w), pl_w)
        return self._strong_aug(xm, per_image=True), ym, wm, m

    def _seg_backward(
        self,
        name: str,
        feats: list[Tensor],
        label: Tensor,
        weight: Tensor | None = None,
        sam_feats: Tensor | None = None,
        keep: float = 0.0,
        scale: float = 1.0,
    ) -> dict[str, Tensor]:
        """CE of the shadow branch (+ SSR's enhanced branch), one backward call (§6.7, 6-12)."""
        logits = self.model.decode(feats)
        loss = scale * weighted_ce(logits, label, weight)
        self._check_finite(name, loss)
        out = {name: loss.detach()}
        if self.debug is not None:
            self._stash(**{name.removesuffix("_ce") + "_pred": logits.argmax(1)})
        if sam_feats is not None:
            fused = self.sam.fuse(feats, sam_feats)
            if self.debug is not None and name == "src_ce":  # how much SAM changes each stage
                self._stash(
                    **{f"ssr_delta_{i}": (fused[i] - feats[i]).norm(dim=1) for i in self.sam.stages}
                )
            enh = self.sam.loss_weight * weighted_ce(self.model.decode(fused), label, weight)
            self._check_finite(f"ssr_{name}", enh)
            out[f"ssr_{name}"] = enh.detach()
            loss = loss + enh
        self._backward(loss, retain_graph=bool(keep))
        return out

    def _fd_backward(self, xs: Tensor, ys: Tensor, feats: list[Tensor]) -> Tensor:
        with torch.no_grad():
            f_imnet = self.imnet_backbone(xs)[-1]
        fd = feature_distance(
            feats[-1], f_imnet, ys, self.hparams.fd_classes, min_ratio=self.hparams.fd_min_ratio
        )
        self._check_finite("fd", fd)
        self._backward(self.fd_weight * fd)
        return fd.detach()

    def _backward(self, loss: Tensor, retain_graph: bool = False) -> None:
        """One backward call per loss group (§4.9), or deferred to a single summed one."""
        if self.hparams.single_backward:
            self._pending.append(loss)
        else:
            self.manual_backward(loss, retain_graph=retain_graph)

    def _flush_backward(self) -> None:
        """The single summed backward of `single_backward` mode (a no-op otherwise)."""
        if self._pending:
            self.manual_backward(sum(self._pending))
            self._pending.clear()

    def _stash(self, **tensors: Tensor) -> None:
        """Detached CPU copies for the debug panels, only on the steps a callback asked for."""
        if self.debug is not None:
            for k, v in tensors.items():
                v = v.detach().cpu()
                self.debug[k] = v.float() if v.is_floating_point() else v

    @torch.no_grad()
    def _teacher_confidence(self, xt: Tensor) -> Tensor:
        """(B, H, W) max softmax of the teacher on the target crop (debug panels only).

        Re-runs the forward of `pseudo_label` (same weights and mode); BatchNorm statistics are
        restored so drawing a panel never changes training.
        """
        buffers = [b.clone() for b in self.teacher.model.buffers()]
        logits = self.teacher.model(xt)
        for b, saved in zip(self.teacher.model.buffers(), buffers, strict=True):
            b.copy_(saved)
        return torch.softmax(logits.float(), dim=1).amax(dim=1)

    def _check_finite(self, name: str, loss: Tensor) -> None:
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss term '{name}' is {loss.item()} at step {self.global_step}; stopped before "
                "the optimiser step (the last saved checkpoint is untouched)"
            )

    # ---------------------------------------------------------------- validation
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metric)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metric)

    def _eval_step(self, batch: dict[str, Tensor], metric: SegMetric) -> None:
        """Student only (the shadow branch), whole-image inference, logits to label size (§3.2)."""
        label = batch["label"]
        logits = self.model.inference(
            batch["img"],
            mode=self.hparams.test_mode,
            crop_size=tuple(self.hparams.test_crop_size),
            stride=tuple(self.hparams.test_stride),
            out_size=tuple(label.shape[-2:]),
        )
        metric.update(logits.argmax(1), label)

    def on_validation_epoch_end(self) -> None:
        self.val_results = self._log_metric("val", self.val_metric)

    def on_test_epoch_end(self) -> None:
        self.test_results = self._log_metric("test", self.test_metric)

    def _log_metric(self, stage: str, metric: SegMetric) -> dict[str, Any]:
        result = metric.compute()
        metric.reset()
        logs = {f"{stage}/mIoU": result["mIoU"], f"{stage}/aAcc": result["aAcc"]}
        for name in CLASSES:
            if result["IoU"][name] is not None:
                logs[f"{stage}/IoU/{name}"] = result["IoU"][name]
        self.log_dict(logs, sync_dist=False)
        return result

    # ---------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> dict[str, Any]:
        o = self.optim_cfg
        named = list(self.model.named_parameters(prefix="model"))
        if self.sam is not None:
            named += [(f"sam.{n}", p) for n, p in self.sam.named_trainable_parameters()]
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

    # --------------------------------------------------------------- checkpoints
    def _seed_rank_streams(self, stage: str) -> None:
        """Under DDP rank r > 0 draws its augmentations from its own stream, seeded (seed, r).

        Rank 0 keeps the single-process stream. Called from `setup`, i.e. before a checkpoint is
        restored, so a resumed run gets every rank's saved state back (`on_load_checkpoint`).
        """
        rank = self.trainer.global_rank
        if stage == "fit" and rank > 0:
            seed = rank_seed(self.hparams.seed, rank)
            self.np_rng = np.random.default_rng([self.hparams.seed, rank])
            self.py_rng = random.Random(seed)
            self.torch_gen = torch.Generator().manual_seed(seed)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["model_config"] = self.hparams.model_config
        state = {
            "numpy": self.np_rng.bit_generator.state,
            "python": self.py_rng.getstate(),
            "torch": self.torch_gen.get_state(),
        }
        checkpoint["uda_rng"] = gather_from_ranks(state)  # one entry per rank (collective)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("uda_rng")
        trainer = self._trainer  # None when loaded outside a Trainer (e.g. load_from_checkpoint)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        state = for_this_rank(states, rank, world)
        if state is not None:
            self.np_rng.bit_generator.state = state["numpy"]
            self.py_rng.setstate(state["python"])
            self.torch_gen.set_state(state["torch"])
