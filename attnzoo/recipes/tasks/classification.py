"""Image classification of any timm or zoo model: timm train.py's recipe as a LightningModule."""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import pytorch_lightning as pl
import timm
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

import attnzoo  # noqa: F401  (registers the az_* models with timm)

from .base import BaseTask, EmaConfig, OptimizerConfig, SchedulerConfig

__all__ = ['ClassificationTask', 'MixupConfig']

# above this many classes the confusion matrix is neither kept nor drawn (ImageNet's is 8 MB a split)
_CONFUSION_MAX_CLASSES = 100


@dataclass
class MixupConfig:
    """timm's ``Mixup`` (train.py's ``--mixup``, ``--cutmix``, ``--mixup-prob``...). With it the
    targets are soft (label smoothing is applied by the mixing) and the loss is
    ``SoftTargetCrossEntropy``. Batches must have an even size."""
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    cutmix_minmax: Optional[Tuple[float, float]] = None
    prob: float = 1.0
    switch_prob: float = 0.5
    mode: str = 'batch'


class ClassificationTask(BaseTask):
    """Image classification with a timm model (any ``az_*`` zoo name or any other timm name).

    Batches are ``(image, label)``: image float32 (B, 3, H, W) in [0, 1] (normalised here by the
    model's ``pretrained_cfg`` mean and std), label int64 (B,). Loss as timm's train.py chooses it:
    ``SoftTargetCrossEntropy`` under mixup/cutmix, else label-smoothed cross entropy. Metrics:
    top-1 and top-5 accuracy (``val_acc1``, ``val_acc5``, ``test_*``) and the confusion matrix,
    drawn at the end of fit.

    Args:
        model: timm model name.
        num_classes: classes of the head.
        in_chans: input channels.
        pretrained: start from the model's pretrained weights (timm's ``pretrained=True``).
        model_kwargs: further ``timm.create_model`` arguments (``img_size``, ...).
        drop_rate: dropout before the classifier (None: the model's default).
        drop_path_rate: stochastic depth (None: the model's default; not every model has it).
        label_smoothing: label smoothing of the training loss.
        mixup: mixup/cutmix, off when None.
        ema: weight EMA, off when None.
        optimizer: timm optimizer settings.
        scheduler: timm scheduler settings.
        class_names: names for the plots (default: the data module's ``classes``).
    """

    monitor = 'val_acc1'
    mode = 'max'

    def __init__(
            self,
            model: str = 'az_van_b0',
            num_classes: int = 1000,
            in_chans: int = 3,
            pretrained: bool = False,
            model_kwargs: Optional[Dict[str, Any]] = None,
            drop_rate: Optional[float] = None,
            drop_path_rate: Optional[float] = None,
            label_smoothing: float = 0.1,
            mixup: Optional[MixupConfig] = None,
            ema: Optional[EmaConfig] = None,
            optimizer: Optional[OptimizerConfig] = None,
            scheduler: Optional[SchedulerConfig] = None,
            class_names: Optional[List[str]] = None,
    ) -> None:
        super().__init__()

    def configure_models(self) -> None:
        hp = self.hparams
        # as timm's train.py: regularisation arguments only when given (SHViT has no drop path)
        extra = {k: hp[k] for k in ('drop_rate', 'drop_path_rate') if hp[k] is not None}
        self.model = timm.create_model(
            hp.model, pretrained=hp.pretrained, num_classes=hp.num_classes, in_chans=hp.in_chans,
            **extra, **(hp.model_kwargs or {}))
        cfg = timm.data.resolve_model_data_config(self.model)
        self.set_input_stats(cfg['mean'], cfg['std'], hp.in_chans)

    def configure_losses(self) -> None:
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
        hp = self.hparams
        self.mixup_fn = None
        m: Optional[MixupConfig] = self.config('mixup', MixupConfig)
        if m is not None:
            from timm.data import Mixup
            self.mixup_fn = Mixup(
                mixup_alpha=m.mixup_alpha, cutmix_alpha=m.cutmix_alpha, cutmix_minmax=m.cutmix_minmax, prob=m.prob,
                switch_prob=m.switch_prob, mode=m.mode, label_smoothing=hp.label_smoothing,
                num_classes=hp.num_classes)
            self.train_criterion: torch.nn.Module = SoftTargetCrossEntropy()
        elif hp.label_smoothing > 0:
            self.train_criterion = LabelSmoothingCrossEntropy(smoothing=hp.label_smoothing)
        else:
            self.train_criterion = torch.nn.CrossEntropyLoss()

    def configure_metrics(self) -> None:
        n = self.hparams.num_classes
        metrics = {'acc1': MulticlassAccuracy(n, top_k=1, average='micro')}
        if n > 5:
            metrics['acc5'] = MulticlassAccuracy(n, top_k=5, average='micro')
        collection = MetricCollection(metrics)
        self.train_metrics = collection.clone(prefix='train_')
        self.val_metrics = collection.clone(prefix='val_')
        self.test_metrics = collection.clone(prefix='test_')
        # a metric, not self.log's mean of batch means: weighted by batch size and summed over processes
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self.val_confusion = MulticlassConfusionMatrix(n) if n <= _CONFUSION_MAX_CLASSES else None
        self.confusion: Optional[torch.Tensor] = None  # the last validation epoch's, for the plot

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        x = self.normalize(x)
        target = y
        if self.mixup_fn is not None:
            x, target = self.mixup_fn(x, y)
        logits = self.model(x)
        loss = self.train_criterion(logits, target)
        self.log('train_loss', loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(x), sync_dist=True)
        if self.mixup_fn is None:  # accuracy against mixed targets means nothing
            self.train_metrics(logits, y)
            self.log_dict(self.train_metrics, on_step=False, on_epoch=True, batch_size=len(x))
        self.log_lr()
        return loss

    def _evaluate(self, batch: Any, split: str) -> torch.Tensor:
        x, y = batch
        logits = self.eval_model(self.normalize(x))
        loss_metric = self.val_loss if split == 'val' else self.test_loss
        metrics = self.val_metrics if split == 'val' else self.test_metrics
        loss_metric.update(F.cross_entropy(logits, y), weight=len(x))
        metrics.update(logits, y)
        self.log(f'{split}_loss', loss_metric, on_step=False, on_epoch=True, prog_bar=True)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=True)
        return logits

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        logits = self._evaluate(batch, 'val')
        if self.val_confusion is not None:
            self.val_confusion.update(logits.argmax(1), batch[1])

    def on_validation_epoch_end(self) -> None:
        if self.val_confusion is not None:
            self.confusion = self.val_confusion.compute().cpu()  # synced over processes
            self.val_confusion.reset()

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, 'test')

    def predict_step(self, batch: Any, batch_idx: int) -> Dict[str, torch.Tensor]:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        probs = self.eval_model(self.normalize(x)).softmax(1)
        k = min(5, probs.shape[1])
        top_p, top_i = probs.topk(k, dim=1)
        return {'top_classes': top_i, 'top_probs': top_p}

    @staticmethod
    def write_predictions(predictions: List[Dict[str, torch.Tensor]], path: str, dataset: Any = None,
                          first: int = 0, step: int = 1) -> str:
        """Write predict's outputs as ``path.csv``: one row per image (its index in the dataset,
        ``first + step * n`` for a process' shard), its top-k classes and probabilities."""
        import csv
        file = path + '.csv'
        top_i = torch.cat([p['top_classes'] for p in predictions]).tolist()
        top_p = torch.cat([p['top_probs'] for p in predictions]).tolist()
        k = len(top_i[0]) if top_i else 0
        with open(file, 'w', newline='') as f:
            w = csv.writer(f)
            w.writerow(['index'] + [f'class_{j + 1}' for j in range(k)] + [f'prob_{j + 1}' for j in range(k)])
            for n, (classes, probs) in enumerate(zip(top_i, top_p)):
                w.writerow([first + step * n, *classes, *(f'{p:.6f}' for p in probs)])
        return file

    def figures(self, trainer: pl.Trainer) -> Dict[str, Any]:
        if self.confusion is None:
            return {}
        from ..plots import plot_confusion_matrix
        names = self.hparams.class_names or getattr(trainer.datamodule, 'classes', None)
        return {'confusion_matrix': plot_confusion_matrix(self.confusion, names, title='validation')}
