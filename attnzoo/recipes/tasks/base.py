"""The base of every task: model, losses and metrics built from constructor arguments (torchgeo's
``BaseTask``), timm's optimizers, schedulers and weight EMA, and per-epoch seeding for exact resumes.
"""
import math
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytorch_lightning as pl
import torch
from torch import nn

from ..sampling import seed_everything_for_batch

__all__ = ['BaseTask', 'EmaConfig', 'OptimizerConfig', 'SchedulerConfig', 'backbone_mean_std']


@dataclass
class OptimizerConfig:
    """timm's ``create_optimizer_v2`` arguments (timm train.py's ``--opt``, ``--lr``, ...).

    Weight decay skips biases, norms and the model's ``no_weight_decay()`` names; ``layer_decay``
    scales each layer's lr by ``layer_decay ** (depth - layer)``, layers from ``group_matcher()``.
    """
    opt: str = 'adamw'
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    layer_decay: Optional[float] = None
    eps: Optional[float] = None
    betas: Optional[Tuple[float, float]] = None


@dataclass
class SchedulerConfig:
    """timm's ``create_scheduler_v2`` arguments; durations in epochs (fractions allowed).

    ``on_updates`` steps the schedule after every optimizer update (timm's ``--sched-on-updates``),
    otherwise once per epoch. ``warmup_steps`` (with ``on_updates``) gives the warmup in updates
    instead of epochs, as mmseg/mmdet configs state it. The schedule spans the trainer's run
    (``max_epochs``, or ``max_steps`` counted in epochs), less ``cooldown_epochs`` at ``min_lr``.
    ``sched='poly'`` takes its power from ``decay_rate``; ``'multistep'`` decays at
    ``decay_milestones``.
    """
    sched: str = 'cosine'
    on_updates: bool = False
    warmup_epochs: float = 0.0
    warmup_steps: Optional[int] = None
    warmup_lr: float = 1e-6
    min_lr: float = 0.0
    decay_epochs: Optional[float] = None
    decay_milestones: List[float] = field(default_factory=lambda: [90, 180, 270])
    decay_rate: float = 0.1
    cooldown_epochs: float = 0.0


@dataclass
class EmaConfig:
    """timm's ``ModelEmaV3`` of the weights, updated after every optimizer step; with
    ``evaluate`` validation, test and predict use the averaged weights."""
    decay: float = 0.9998
    warmup: bool = False
    evaluate: bool = True


def _nested_no_weight_decay(model: nn.Module) -> List[str]:
    """Full names of the parameters that submodules exclude from weight decay (their own
    ``no_weight_decay()``, e.g. a backbone's relative position biases inside a segmentation model);
    empty when only the top level declares any, which timm reads itself."""
    names: List[str] = []
    for prefix, module in model.named_modules():
        if prefix and hasattr(module, 'no_weight_decay'):
            names += [f'{prefix}.{n}' for n in module.no_weight_decay()]
    return names


def backbone_mean_std(backbone: str) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The pretraining mean and std of a timm/zoo ``backbone``, as its pretrained config states them."""
    from timm.models import resolve_pretrained_cfg
    cfg = resolve_pretrained_cfg(backbone.split('.')[0])
    return tuple(cfg.mean), tuple(cfg.std)


class BaseTask(pl.LightningModule, ABC):
    """A LightningModule built from its constructor arguments: subclasses implement
    ``configure_models`` (setting ``self.model``), ``configure_losses`` and ``configure_metrics``,
    and the steps. This base adds timm's optimizer and scheduler, the weight EMA and the seeding.

    ``monitor``/``mode`` name the metric the checkpoints keep the best of. ``figures(trainer)``
    returns the task's plots of predictions, written beside the checkpoints at the end of fit.
    """

    monitor: str = 'val_loss'
    mode: str = 'min'
    #: constructor arguments left out of the saved hyperparameters (weights travel in the state dict)
    ignore: Tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=list(self.ignore))
        self.configure_models()
        ema = self.config('ema', EmaConfig)
        self.model_ema = None
        if ema is not None:
            from timm.utils import ModelEmaV3
            self.model_ema = ModelEmaV3(self.model, decay=ema.decay, use_warmup=ema.warmup)
        self.configure_losses()
        self.configure_metrics()

    def config(self, name: str, cls: type) -> Any:
        """The dataclass argument ``name`` (``OptimizerConfig``...) or None. Hyperparameters saved
        from LightningCLI hold the config's dicts, those given in Python the dataclasses."""
        value = self.hparams.get(name)
        return cls(**value) if isinstance(value, dict) else value

    @abstractmethod
    def configure_models(self) -> None:
        """Build ``self.model``."""

    def configure_losses(self) -> None:
        """Build the loss criteria."""

    def configure_metrics(self) -> None:
        """Build the metrics (torchmetrics, so they sync over processes)."""

    @property
    def eval_model(self) -> nn.Module:
        """The network validation, test and predict run: the EMA weights when asked for."""
        ema: Optional[EmaConfig] = self.config('ema', EmaConfig)
        if self.model_ema is not None and ema is not None and ema.evaluate:
            return self.model_ema.module
        return self.model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def setup(self, stage: str) -> None:
        # a head sized for other data would train without complaint and score nonsense
        found = getattr(getattr(self.trainer, 'datamodule', None), 'num_classes', None)
        n = self.hparams.get('num_classes')
        if found is not None and n is not None and found != n:
            raise ValueError(f"the data has {found} classes, the model's head {n}: "
                             f'set model.init_args.num_classes to {found}')

    # ------------------------------------------------------------------------------------ input stats

    def set_input_stats(self, mean: Sequence[float], std: Sequence[float], channels: int) -> None:
        """Register the model's input mean and std (per channel, averaged to ``channels`` where the
        config states another count) for ``normalize``; buffers, so they follow the device."""
        mean, std = list(mean), list(std)
        if len(mean) != channels:  # timm's configs state 3 (or 1) values
            mean, std = [sum(mean) / len(mean)] * channels, [sum(std) / len(std)] * channels
        self.register_buffer('mean', torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] images (B, C, *spatial) to the model's input statistics (``set_input_stats``)."""
        mean, std = self.mean, self.std
        if x.dim() > mean.dim():  # volumes (B, C, D, H, W)
            mean = mean.view(*mean.shape, *[1] * (x.dim() - mean.dim()))
            std = std.view(*std.shape, *[1] * (x.dim() - std.dim()))
        return (x - mean) / std

    # ------------------------------------------------------------------------------------------ seeding

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # every draw of the global generators in a step (dropout, drop path, mixup) depends on
        # (seed, epoch, batch, rank) only: a resumed run continues exactly, whatever else drew
        # from them before (a resumed run creates its loader iterators at other moments)
        seed = int(os.environ.get('PL_GLOBAL_SEED', 0))
        seed_everything_for_batch(seed, self.current_epoch, batch_idx, self.global_rank)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.model_ema is not None:
            self.model_ema.update(self.model, step=self.global_step)

    # ------------------------------------------------------------------------------------------ optimization

    def configure_optimizers(self) -> Dict[str, Any]:
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2

        opt: OptimizerConfig = self.config('optimizer', OptimizerConfig) or OptimizerConfig()
        sched: SchedulerConfig = self.config('scheduler', SchedulerConfig) or SchedulerConfig()
        kwargs: Dict[str, Any] = {}
        if opt.eps is not None:
            kwargs['eps'] = opt.eps
        if opt.betas is not None:
            kwargs['betas'] = tuple(opt.betas)
        nested = _nested_no_weight_decay(self.model)
        if nested:
            # a task model (UperNet, Mask R-CNN...) wraps a backbone whose no_weight_decay() timm would
            # not see: the top level's is all it reads. Hand timm the groups built with every name
            from timm.optim import param_groups_layer_decay, param_groups_weight_decay
            top = self.model.no_weight_decay() if hasattr(self.model, 'no_weight_decay') else ()
            names = list(top) + nested
            if opt.layer_decay is not None:
                kwargs['param_group_fn'] = lambda m: param_groups_layer_decay(
                    m, weight_decay=opt.weight_decay, layer_decay=opt.layer_decay, no_weight_decay_list=names)
            else:
                kwargs['param_group_fn'] = lambda m: param_groups_weight_decay(
                    m, weight_decay=opt.weight_decay, no_weight_decay_list=names)
        optimizer = create_optimizer_v2(
            self.model, opt=opt.opt, lr=opt.lr, weight_decay=opt.weight_decay, momentum=opt.momentum,
            layer_decay=opt.layer_decay, **kwargs)
        if sched.sched == 'none':
            return {'optimizer': optimizer}

        trainer = self.trainer
        total_steps = trainer.estimated_stepping_batches
        if trainer.train_dataloader is None:
            # with max_epochs=-1 Lightning answers from max_steps without loading the training data,
            # which leaves num_training_batches unknown
            trainer.fit_loop.setup_data()
        if not math.isfinite(total_steps):
            raise ValueError('the learning-rate schedule needs an end: set trainer.max_epochs or trainer.max_steps')
        batches = trainer.num_training_batches
        # an iterable dataset has no length: the whole run is one "epoch" of updates
        updates_per_epoch = (max(1, math.ceil(batches / trainer.accumulate_grad_batches)) if math.isfinite(batches)
                             else int(total_steps))
        if trainer.max_steps != -1 or trainer.max_epochs in (None, -1):
            num_epochs = total_steps / updates_per_epoch  # an iteration budget, counted in epochs
        else:
            num_epochs = trainer.max_epochs
        warmup_epochs = sched.warmup_epochs
        if sched.warmup_steps is not None:
            if not sched.on_updates:
                raise ValueError('scheduler.warmup_steps counts updates: it needs scheduler.on_updates=true')
            warmup_epochs = sched.warmup_steps / updates_per_epoch
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=sched.sched, num_epochs=num_epochs - sched.cooldown_epochs,
            decay_epochs=sched.decay_epochs, decay_milestones=list(sched.decay_milestones),
            cooldown_epochs=sched.cooldown_epochs, decay_rate=sched.decay_rate, min_lr=sched.min_lr,
            warmup_lr=sched.warmup_lr, warmup_epochs=warmup_epochs, step_on_epochs=not sched.on_updates,
            updates_per_epoch=updates_per_epoch)
        interval = 'step' if sched.on_updates else 'epoch'
        return {'optimizer': optimizer, 'lr_scheduler': {'scheduler': scheduler, 'interval': interval}}

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        # timm's schedulers (but the plateau one) keep no progress, only their settings, which
        # loading their state would put back over the ones this run's configuration built: a run
        # resumed with a larger max_steps then kept the old horizon and trained past it at lr 0.
        # They are asked at the restored step, so an unchanged schedule resumes exactly as before
        sched: SchedulerConfig = self.config('scheduler', SchedulerConfig) or SchedulerConfig()
        if sched.sched != 'plateau' and checkpoint.get('lr_schedulers'):
            checkpoint['lr_schedulers'] = [{} for _ in checkpoint['lr_schedulers']]

    def on_train_start(self) -> None:
        # a resumed run: the learning rate this run's schedule gives at the restored position, in
        # place of the one the optimizer's state brought back (the same where the schedule is)
        if self.global_step == 0:
            return
        sched: SchedulerConfig = self.config('scheduler', SchedulerConfig) or SchedulerConfig()
        for config in self.trainer.lr_scheduler_configs:
            if sched.on_updates:
                config.scheduler.step_update(num_updates=self.global_step)
            elif sched.sched != 'plateau':
                config.scheduler.step(epoch=self.current_epoch)

    def lr_scheduler_step(self, scheduler: Any, metric: Optional[Any]) -> None:
        # timm's schedulers take the position reached: updates done, or the epoch about to start
        sched: SchedulerConfig = self.config('scheduler', SchedulerConfig) or SchedulerConfig()
        if sched.on_updates:
            scheduler.step_update(num_updates=self.global_step, metric=metric)
        else:
            scheduler.step(epoch=self.current_epoch + 1, metric=metric)

    def log_lr(self) -> None:
        """Log the mean learning rate of the parameter groups (they differ under layer decay)."""
        groups = self.optimizers().param_groups
        self.log('lr', sum(g['lr'] for g in groups) / len(groups), on_step=True, on_epoch=False)

    # ------------------------------------------------------------------------------------------ plots

    def figures(self, trainer: pl.Trainer) -> Dict[str, Any]:
        """The task's figures of its predictions (name -> matplotlib Figure), made at the end of fit."""
        return {}
