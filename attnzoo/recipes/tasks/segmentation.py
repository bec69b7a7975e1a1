"""Semantic segmentation of the zoo's segmentation models (UperNet, Semantic FPN, smp's decoders)."""
import os
from typing import Any, Dict, List, Optional, Tuple

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

import attnzoo  # noqa: F401  (registers the az_* models with timm)

from .base import BaseTask, EmaConfig, OptimizerConfig, SchedulerConfig, backbone_mean_std

__all__ = ['SegmentationTask']


class SegmentationTask(BaseTask):
    """Semantic segmentation with ``attnzoo.zoo.create_segmentation_model``.

    Batches are ``(image, mask)``: image float32 (B, 3, H, W) in [0, 1] (normalised here with the
    backbone's pretraining mean and std), mask int64 (B, H, W) of class indices, ``ignore_index``
    where no loss or metric looks. The loss is cross entropy on the decode head's logits plus
    ``model.aux_loss_weight`` (UperNet's 0.4) times that of the auxiliary head, as mmseg trains.
    Metrics, dataset-level (torchmetrics accumulates the confusion over every batch and process
    before dividing): mIoU (``val_miou``, ``MulticlassJaccardIndex(average='macro')``: the mean over
    classes of intersection over union) and pixel accuracy (``val_acc``, mmseg's aAcc).

    Args:
        arch: ``'upernet'``, ``'fpn'`` or ``'smp:<name>'`` (see ``create_segmentation_model``).
        backbone: zoo or timm model name.
        num_classes: classes (ADE20K: 150).
        pretrained_backbone: start the backbone from its ImageNet weights.
        model_kwargs: further ``create_segmentation_model`` arguments (``dense_cfg``, ``aux_head``,
            ``drop_path_rate``, ``channels``...).
        ignore_index: the label no loss or metric counts (255: ADE20K's "other", padding).
        ema: weight EMA, off when None.
        optimizer: timm optimizer settings.
        scheduler: timm scheduler settings.
        figure_samples: validation images drawn at the end of fit.
    """

    monitor = 'val_miou'
    mode = 'max'

    def __init__(
            self,
            arch: str = 'upernet',
            backbone: str = 'az_dinat_tiny',
            num_classes: int = 150,
            pretrained_backbone: bool = False,
            model_kwargs: Optional[Dict[str, Any]] = None,
            ignore_index: int = 255,
            ema: Optional[EmaConfig] = None,
            optimizer: Optional[OptimizerConfig] = None,
            scheduler: Optional[SchedulerConfig] = None,
            figure_samples: int = 4,
    ) -> None:
        super().__init__()

    def configure_models(self) -> None:
        from attnzoo.zoo.segmentation import create_segmentation_model
        hp = self.hparams
        kwargs = dict(hp.model_kwargs or {})
        self.model = create_segmentation_model(
            hp.arch, hp.backbone, hp.num_classes, pretrained_backbone=hp.pretrained_backbone, **kwargs)
        self.set_input_stats(*backbone_mean_std(hp.backbone), kwargs.get('in_chans', 3))

    def configure_metrics(self) -> None:
        n, ignore = self.hparams.num_classes, self.hparams.ignore_index
        collection = MetricCollection({
            'miou': MulticlassJaccardIndex(n, average='macro', ignore_index=ignore),
            'acc': MulticlassAccuracy(n, average='micro', ignore_index=ignore),
        })
        self.val_metrics = collection.clone(prefix='val_')
        self.test_metrics = collection.clone(prefix='test_')
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        # the first validation images, their labels and predictions, for the figure
        self.samples: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def _ce(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, ignore_index=self.hparams.ignore_index)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self.model(self.normalize(x))
        if isinstance(out, dict):  # decode head + auxiliary head, both at the input size
            loss = self._ce(out['out'], y) + self.model.aux_loss_weight * self._ce(out['aux'], y)
        else:
            loss = self._ce(out, y)
        self.log('train_loss', loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(x), sync_dist=True)
        self.log_lr()
        return loss

    def _evaluate(self, batch: Any, split: str) -> torch.Tensor:
        x, y = batch
        logits = self.eval_model(self.normalize(x))
        loss_metric = self.val_loss if split == 'val' else self.test_loss
        metrics = self.val_metrics if split == 'val' else self.test_metrics
        # a batch without any labelled pixel has no loss to weigh in
        labelled = int((y != self.hparams.ignore_index).sum())
        if labelled:
            loss_metric.update(self._ce(logits, y), weight=labelled)
        pred = logits.argmax(1)
        metrics.update(pred, y)
        self.log(f'{split}_loss', loss_metric, on_step=False, on_epoch=True, prog_bar=True)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=True)
        return pred

    def on_validation_epoch_start(self) -> None:
        self.samples = []

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pred = self._evaluate(batch, 'val')
        room = self.hparams.figure_samples - len(self.samples)
        if room > 0:
            x, y = batch
            self.samples += [(x[i].cpu(), y[i].cpu(), pred[i].cpu()) for i in range(min(room, len(x)))]

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, 'test')

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """The label map (B, H, W) uint8 (int16 above 255 classes) of each image."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        pred = self.eval_model(self.normalize(x)).argmax(1)
        return pred.to(torch.uint8 if self.hparams.num_classes <= 256 else torch.int16)

    @staticmethod
    def write_predictions(predictions: List[torch.Tensor], path: str, dataset: Any = None, first: int = 0,
                          step: int = 1) -> str:
        """Write predict's label maps as PNGs into the folder ``path``, one per image, named after
        the image's file (``dataset.samples``) or its index in the dataset (``first + step * n``)."""
        import numpy as np
        from PIL import Image
        os.makedirs(path, exist_ok=True)
        maps = [m for batch in predictions for m in batch]
        samples = getattr(dataset, 'samples', None)
        for n, label_map in enumerate(maps):
            index = first + step * n
            name = os.path.splitext(os.path.basename(samples[index][0]))[0] if samples else f'{index:06d}'
            Image.fromarray(label_map.cpu().numpy().astype(np.uint8 if label_map.dtype == torch.uint8 else np.int32)
                            ).save(os.path.join(path, f'{name}.png'))
        return path

    def figures(self, trainer: pl.Trainer) -> Dict[str, Any]:
        if not self.samples:
            return {}
        from ..plots import plot_masks
        images, targets, preds = (list(t) for t in zip(*self.samples))
        return {'masks': plot_masks(images, targets, preds, self.hparams.num_classes, self.hparams.ignore_index)}
