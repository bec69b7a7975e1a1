"""Object detection and instance segmentation with torchvision's detectors on zoo backbones."""
import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytorch_lightning as pl
import torch

import attnzoo  # noqa: F401  (registers the az_* models with timm)

from .base import BaseTask, EmaConfig, OptimizerConfig, SchedulerConfig

__all__ = ['DetectionTask']

Target = Dict[str, torch.Tensor]
# pycocotools' summary under torchmetrics' names, and the ones logged per epoch
_LOGGED = ('map', 'map_50', 'map_75', 'map_small', 'map_medium', 'map_large', 'mar_100')
# pycocotools' thresholds, in float64 as it builds them: torchmetrics' defaults come from a float32
# linspace (0.55 as 0.550000011920929...), which moves AP in the fourth decimal
_IOU_THRESHOLDS = np.linspace(.5, .95, 10).tolist()
_REC_THRESHOLDS = np.linspace(.0, 1., 101).tolist()


class DetectionTask(BaseTask):
    """Detection (Faster R-CNN, RetinaNet, FCOS) and instance segmentation (Mask R-CNN) with
    ``attnzoo.zoo.create_detection_model``.

    Batches are ``(images, targets)`` as ``attnzoo.recipes.data.coco.collate_detection`` makes them:
    a list of float32 (3, H, W) images in [0, 1] of any sizes (the detector normalises and resizes
    them itself) and a list of torchvision targets (``boxes`` (N, 4) absolute x0, y0, x1, y1,
    ``labels`` (N,) in 1..num_classes-1, ``masks`` (N, H, W) uint8 for Mask R-CNN, ``image_id``).
    The loss is the sum of the detector's own losses (each logged as ``train_<name>``).

    Metric: COCO mAP from torchmetrics' ``MeanAveragePrecision`` with the pycocotools backend,
    updated with every batch and computed once per epoch over the whole split (synced over
    processes), so it is pycocotools' number for the split, not a mean of batch numbers (its
    thresholds as pycocotools makes them, and each object's size from the target's ``area``, the
    json's where the data module gives it, as pycocotools sorts objects into small/medium/large):
    ``val_map`` (AP at IoU 0.50:0.95), ``val_map_50``, ``val_map_75``, by size, ``val_mar_100``,
    and for Mask R-CNN the same of the masks as ``val_segm_*``.

    Args:
        arch: 'faster_rcnn', 'mask_rcnn', 'retinanet' or 'fcos'.
        backbone: zoo or timm model name.
        num_classes: classes including the background (the data module's ``num_classes``).
        pretrained_backbone: start the backbone from its ImageNet weights.
        model_kwargs: further ``create_detection_model`` arguments (``dense_cfg``, ``min_size``,
            ``max_size``, ``trainable_stages``...).
        ema: weight EMA, off when None.
        optimizer: timm optimizer settings.
        scheduler: timm scheduler settings.
        class_names: names by label for the figures (default: the data module's ``classes``).
        figure_samples: validation images drawn at the end of fit.
        figure_score_threshold: predictions drawn from this score up.
    """

    monitor = 'val_map'
    mode = 'max'

    def __init__(
            self,
            arch: str = 'faster_rcnn',
            backbone: str = 'az_dinat_tiny',
            num_classes: int = 81,
            pretrained_backbone: bool = False,
            model_kwargs: Optional[Dict[str, Any]] = None,
            ema: Optional[EmaConfig] = None,
            optimizer: Optional[OptimizerConfig] = None,
            scheduler: Optional[SchedulerConfig] = None,
            class_names: Optional[List[str]] = None,
            figure_samples: int = 4,
            figure_score_threshold: float = 0.5,
    ) -> None:
        super().__init__()

    @property
    def masks(self) -> bool:
        return self.hparams.arch == 'mask_rcnn'

    def configure_models(self) -> None:
        from attnzoo.zoo.detection import create_detection_model
        hp = self.hparams
        self.model = create_detection_model(
            hp.arch, hp.backbone, hp.num_classes, pretrained_backbone=hp.pretrained_backbone,
            **(hp.model_kwargs or {}))

    def configure_metrics(self) -> None:
        from torchmetrics.detection import MeanAveragePrecision
        iou_type: Any = ('bbox', 'segm') if self.masks else 'bbox'
        self.val_map, self.test_map = (
            MeanAveragePrecision(iou_type=iou_type, backend='pycocotools', iou_thresholds=_IOU_THRESHOLDS,
                                 rec_thresholds=_REC_THRESHOLDS) for _ in range(2))
        self.samples: List[Tuple[torch.Tensor, Target, Target]] = []

    def setup(self, stage: str) -> None:
        super().setup(stage)  # the class count, the background included on both sides
        dm = getattr(self.trainer, 'datamodule', None)
        if self.masks and dm is not None and getattr(dm, 'masks', True) is False:
            raise ValueError('mask_rcnn trains on instance masks: set data.init_args.masks to true')

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        losses = self.model(images, targets)
        loss = sum(losses.values())
        n = len(images)
        for name, value in losses.items():
            self.log(f'train_{name}', value, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
        self.log('train_loss', loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n, sync_dist=True)
        self.log_lr()
        return loss

    def _metric_inputs(self, preds: Sequence[Target], targets: Sequence[Target]) -> Tuple[List[Target], List[Target]]:
        """torchmetrics' layouts: boxes xyxy; masks (N, H, W) bool (predicted: probability > 0.5); the
        targets' ``iscrowd`` and ``area`` where they have them (without an area torchmetrics takes the
        box's or the mask's, which sorts an object into another size range than pycocotools would)."""
        p_out, t_out = [], []
        for p, t in zip(preds, targets):
            pd = {'boxes': p['boxes'], 'scores': p['scores'], 'labels': p['labels']}
            td = {'boxes': t['boxes'], 'labels': t['labels']}
            td.update({k: t[k] for k in ('iscrowd', 'area') if k in t})
            if self.masks:
                m = p['masks']
                pd['masks'] = (m[:, 0] if m.dim() == 4 else m) > 0.5
                td['masks'] = t['masks'].bool()
            p_out.append(pd)
            t_out.append(td)
        return p_out, t_out

    def _evaluate(self, batch: Any, metric: Any) -> List[Target]:
        images, targets = batch
        preds = self.eval_model(images)
        metric.update(*self._metric_inputs(preds, targets))
        return preds

    def _log_map(self, metric: Any, split: str) -> None:
        result = metric.compute()  # pycocotools over every image of the split, gathered from every process
        metric.reset()
        prefixes = [('bbox_', ''), ('segm_', 'segm_')] if self.masks else [('', '')]
        for source, target in prefixes:
            for name in _LOGGED:
                shown = name == 'map' and not target
                self.log(f'{split}_{target}{name}', result[source + name].float(), prog_bar=shown)

    def on_validation_epoch_start(self) -> None:
        self.samples = []

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        preds = self._evaluate(batch, self.val_map)
        images, targets = batch
        room = self.hparams.figure_samples - len(self.samples)
        for i in range(min(max(room, 0), len(images))):
            self.samples.append((images[i].cpu(), {k: v.cpu() for k, v in targets[i].items()},
                                 {k: v.cpu() for k, v in preds[i].items()}))

    def on_validation_epoch_end(self) -> None:
        self._log_map(self.val_map, 'val')

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.test_map)

    def on_test_epoch_end(self) -> None:
        self._log_map(self.test_map, 'test')

    def predict_step(self, batch: Any, batch_idx: int) -> Dict[str, Any]:
        images, targets = batch if isinstance(batch, (list, tuple)) and len(batch) == 2 else (batch, None)
        preds = [{k: v.cpu() for k, v in p.items()} for p in self.eval_model(images)]
        ids = [int(t['image_id']) for t in targets] if targets is not None else None
        return {'predictions': preds, 'image_ids': ids}

    @staticmethod
    def write_predictions(predictions: List[Dict[str, Any]], path: str, dataset: Any = None, first: int = 0,
                          step: int = 1) -> str:
        """Write predict's detections as COCO results (``path.json``: image_id, category_id in the
        dataset's json ids, bbox x, y, w, h, score, and RLE ``segmentation`` for masks), what
        pycocotools' ``loadRes`` and ``scripts/eval_coco.py`` read."""
        preds = [p for batch in predictions for p in batch['predictions']]
        ids = [i for batch in predictions for i in (batch['image_ids'] or [])]
        if dataset is None or len(ids) != len(preds):
            raise ValueError('COCO results need the predict dataset (a CocoDetection) and its image ids')
        file = path + '.json'
        with open(file, 'w', encoding='utf-8') as f:
            json.dump(dataset.to_coco_results(preds, ids), f)
        return file

    def figures(self, trainer: pl.Trainer) -> Dict[str, Any]:
        if not self.samples:
            return {}
        from ..plots import plot_boxes
        names = self.hparams.class_names or getattr(trainer.datamodule, 'classes', None)
        if names is None:
            names = [str(i) for i in range(self.hparams.num_classes)]
        images, targets, preds = (list(t) for t in zip(*self.samples))
        # plot_boxes names labels 1..K from the names of the foreground classes
        foreground = list(names[1:]) if len(names) == self.hparams.num_classes else list(names)
        return {'boxes': plot_boxes(images, targets, preds, foreground, self.hparams.figure_score_threshold)}
