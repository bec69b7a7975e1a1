"""Medical image segmentation (AGUNet, DAUNet; 2D and 3D) with MONAI's losses, metrics and sliding windows."""
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torchmetrics import MeanMetric

import attnzoo  # noqa: F401  (registers the az_* models with timm)

from .base import BaseTask, EmaConfig, OptimizerConfig, SchedulerConfig, backbone_mean_std

__all__ = ['MedicalSegmentationTask']


class MedicalSegmentationTask(BaseTask):
    """Segmentation of volumes (3D) or images (2D) with ``attnzoo.zoo.create_medical_model``.

    Batches are dicts as ``attnzoo.recipes.data.volumes.VolumeDataset`` makes them: ``image``
    float32 (B, C, D, H, W) (or (B, C, H, W) in 2D), ``label`` int64 (B, D, H, W) (or (B, H, W)),
    optionally ``spacing`` (B, 3) in mm (HD95 is then in mm, else in voxels); an ``(image, label)``
    pair works too. Intensities are used as they come (the presets normalise volumes); with a zoo
    backbone (2D) images in [0, 1] are normalised with its pretraining mean and std.

    Loss: MONAI's ``DiceCELoss`` (softmax, one-hot labels); with deep supervision the model returns
    one logit map per decoder level in training, and MONAI's ``DeepSupervisionLoss`` sums the loss of
    each against the label downsampled to it (``weight_mode='same'``, the paper's sum).

    Evaluation: the whole image or volume, through MONAI's ``sliding_window_inference`` over
    ``roi_size`` windows (Gaussian-weighted, ``overlap``) when ``roi_size`` is set, so volumes larger
    than a training patch are segmented whole. Metrics per case, averaged over the split's cases (and
    processes): Dice of the foreground classes (``val_dice``, MONAI's ``compute_dice``) and their
    95th-percentile Hausdorff distance (``val_hd95``, MONAI's ``compute_hausdorff_distance`` with
    ``percentile=95``). A class absent from both the label and the prediction has neither and is
    left out of a case's mean; one predicted where the label has none has Dice 0 (MONAI's
    ``ignore_empty=False``), so false positives on a tumour-free case count; a case whose prediction
    or label is empty has no HD95 and is left out of ``val_hd95`` (its Dice of 0 counts).

    Args:
        arch: 'agunet' or 'daunet'.
        backbone: None (the paper's conv encoder, the only one in 3D) or a zoo backbone (2D).
        spatial_dims: 2 or 3.
        in_chans: image channels.
        num_classes: classes including the background.
        model_kwargs: further ``create_medical_model`` arguments (``channels``, ``deep_supervision``,
            ``multiscale_input``, ``attention_guiding``, ``drop_rate``...).
        lambda_dice: weight of the Dice part of DiceCE.
        lambda_ce: weight of the cross-entropy part.
        roi_size: sliding-window size for evaluation (None: the whole input at once).
        sw_batch_size: windows per forward pass.
        overlap: overlap of neighbouring windows.
        ema: weight EMA, off when None.
        optimizer: timm optimizer settings.
        scheduler: timm scheduler settings.
        figure_samples: validation cases drawn at the end of fit.
    """

    monitor = 'val_dice'
    mode = 'max'

    def __init__(
            self,
            arch: str = 'agunet',
            backbone: Optional[str] = None,
            spatial_dims: int = 3,
            in_chans: int = 1,
            num_classes: int = 2,
            model_kwargs: Optional[Dict[str, Any]] = None,
            lambda_dice: float = 1.0,
            lambda_ce: float = 1.0,
            roi_size: Optional[List[int]] = None,
            sw_batch_size: int = 4,
            overlap: float = 0.25,
            ema: Optional[EmaConfig] = None,
            optimizer: Optional[OptimizerConfig] = None,
            scheduler: Optional[SchedulerConfig] = None,
            figure_samples: int = 2,
    ) -> None:
        super().__init__()

    def configure_models(self) -> None:
        from attnzoo.zoo.medical import create_medical_model
        hp = self.hparams
        if hp.arch not in ('agunet', 'daunet'):
            raise ValueError(f"MedicalSegmentationTask segments with 'agunet' or 'daunet', got {hp.arch!r}")
        if hp.num_classes < 2:
            raise ValueError(f'num_classes counts the background too: at least 2, got {hp.num_classes}')
        self.model = create_medical_model(
            hp.arch, hp.backbone, spatial_dims=hp.spatial_dims, in_chans=hp.in_chans, num_classes=hp.num_classes,
            **(hp.model_kwargs or {}))
        if hp.backbone is not None:
            self.set_input_stats(*backbone_mean_std(hp.backbone), hp.in_chans)

    def configure_losses(self) -> None:
        from monai.losses import DeepSupervisionLoss, DiceCELoss
        hp = self.hparams
        self.criterion = DeepSupervisionLoss(
            DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=hp.lambda_dice, lambda_ce=hp.lambda_ce),
            weight_mode='same')

    def configure_metrics(self) -> None:
        # per-case values averaged over the split; NaN (nothing to measure) left out
        self.val_dice = MeanMetric(nan_strategy='ignore')
        self.val_hd95 = MeanMetric(nan_strategy='ignore')
        self.test_dice = MeanMetric(nan_strategy='ignore')
        self.test_hd95 = MeanMetric(nan_strategy='ignore')
        self.val_loss = MeanMetric()
        self.samples: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        # the largest label seen (``_check_labels``), for the class-count warning after validation
        self.highest_label = 0
        self.class_count_checked = False

    # ------------------------------------------------------------------------------------------ batches

    @staticmethod
    def _unpack(batch: Any) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        if isinstance(batch, dict):
            return batch['image'], batch['label'], batch.get('spacing')
        image, label = batch[0], batch[1]
        return image, label, None

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x) if self.hparams.backbone is not None else x

    def _infer(self, x: torch.Tensor) -> torch.Tensor:
        """Full-size logits (B, num_classes, *S) of the evaluation network, windowed if ``roi_size``."""
        hp = self.hparams
        x = self._input(x)
        if hp.roi_size is None:
            return self.eval_model(x)
        from monai.inferers import sliding_window_inference
        return sliding_window_inference(
            x, list(hp.roi_size), hp.sw_batch_size, self.eval_model, overlap=hp.overlap, mode='gaussian')

    def _check_labels(self, y: torch.Tensor) -> None:
        """A label outside 0..num_classes-1 as an error that says so (MONAI's one-hot fails on it
        with an index error, on CUDA with a device-side assert)."""
        low, high = (int(v) for v in torch.aminmax(y))
        n = self.hparams.num_classes
        if low < 0 or high >= n:
            raise ValueError(f'labels hold values from {low} to {high}, outside 0..{n - 1} of num_classes={n}: '
                             'set num_classes to the largest label + 1, or map the labels to 0..num_classes-1')
        self.highest_label = max(self.highest_label, high)

    def on_validation_epoch_end(self) -> None:
        # the data modules know no class count, so a num_classes larger than the labels need shows
        # only here: after a whole validation split (every rank's) without the top classes
        trainer = self._trainer
        if trainer is None or trainer.sanity_checking or self.class_count_checked:
            return
        self.class_count_checked = True
        high = torch.tensor(self.highest_label, device=self.device)
        high = int(trainer.strategy.reduce(high, reduce_op='max'))
        n = self.hparams.num_classes
        if high < n - 1:
            rank_zero_warn(f'num_classes={n}, but no label of the validation split (nor of the first training '
                           f'batch) is above {high}: classes {high + 1}..{n - 1} never occur, and their outputs '
                           'only learn to be absent; set num_classes to the largest label + 1 if that is not meant')

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, _ = self._unpack(batch)
        if batch_idx == 0:  # a wrong class count shows on any batch; checking one spares a sync per step
            self._check_labels(y)
        out = self.model(self._input(x))
        # DeepSupervisionLoss takes one map or the list of levels; labels carry a channel axis
        loss = self.criterion(out, y[:, None].float())
        self.log('train_loss', loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(x), sync_dist=True)
        self.log_lr()
        return loss

    def _scores(self, logits: torch.Tensor, y: torch.Tensor,
                spacing: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-case Dice and HD95 (B,), each the mean over the foreground classes present."""
        from monai.metrics import compute_dice, compute_hausdorff_distance
        from monai.networks.utils import one_hot
        n = self.hparams.num_classes
        self._check_labels(y)
        pred = one_hot(logits.argmax(1, keepdim=True), n)
        target = one_hot(y[:, None], n)
        # MONAI's ignore_empty=False, so a class predicted where the label has none scores 0 (with
        # ignore_empty=True it is left out, and false positives on a tumour-free case cost nothing);
        # a class absent from both, which MONAI would score 1, is left out of the case's mean
        dice = compute_dice(pred, target, include_background=False, ignore_empty=False)
        present = (pred[:, 1:] + target[:, 1:]).flatten(2).amax(2) > 0
        dice = torch.where(present, dice, torch.full_like(dice, float('nan')))
        spacings = spacing.tolist() if spacing is not None else None
        hd = compute_hausdorff_distance(pred, target, include_background=False, percentile=95, spacing=spacings)
        hd = torch.where(torch.isfinite(hd), hd, torch.full_like(hd, float('nan')))
        return dice.float().nanmean(1), hd.float().nanmean(1)

    def _evaluate(self, batch: Any, split: str) -> Tuple[torch.Tensor, torch.Tensor]:
        x, y, spacing = self._unpack(batch)
        logits = self._infer(x)
        dice, hd = self._scores(logits, y, spacing)
        dice_metric, hd_metric = (self.val_dice, self.val_hd95) if split == 'val' else (self.test_dice, self.test_hd95)
        dice_metric.update(dice)
        if hd.isfinite().any():
            hd_metric.update(hd)
        if split == 'val':
            self.val_loss.update(self.criterion(logits, y[:, None].float()), weight=len(x))
            self.log('val_loss', self.val_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f'{split}_dice', dice_metric, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f'{split}_hd95', hd_metric, on_step=False, on_epoch=True)
        return x, logits.argmax(1)

    def on_validation_epoch_start(self) -> None:
        self.samples = []

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, pred = self._evaluate(batch, 'val')
        y = self._unpack(batch)[1]
        room = self.hparams.figure_samples - len(self.samples)
        self.samples += [(x[i].cpu(), y[i].cpu(), pred[i].cpu()) for i in range(min(max(room, 0), len(x)))]

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, 'test')

    def predict_step(self, batch: Any, batch_idx: int) -> Dict[str, Any]:
        x = batch['image'] if isinstance(batch, dict) else (batch[0] if isinstance(batch, (list, tuple)) else batch)
        pred = self._infer(x).argmax(1).to(torch.uint8 if self.hparams.num_classes <= 256 else torch.int16).cpu()
        out: Dict[str, Any] = {'labels': pred}
        if isinstance(batch, dict):
            out['cases'] = list(batch.get('case', []))
            if 'affine' in batch:
                out['affines'] = batch['affine'].cpu()
            if 'shape' in batch:
                out['shapes'] = batch['shape'].tolist()
        return out

    @staticmethod
    def write_predictions(predictions: List[Dict[str, Any]], path: str, dataset: Any = None, first: int = 0,
                          step: int = 1) -> str:
        """Write predict's label maps into the folder ``path``: volumes as ``<case>.nii.gz`` on their
        image's affine (so they overlay the image in any NIfTI viewer), 2D maps as PNGs by index.

        A volume predicted on another grid than its image's (a transform that resampled or cropped it)
        is refused: written on the image's affine it would cover another region."""
        import numpy as np
        os.makedirs(path, exist_ok=True)
        n = 0
        for batch in predictions:
            cases: Sequence[str] = batch.get('cases') or []
            for i, label in enumerate(batch['labels']):
                array = label.numpy()
                name = cases[i] if i < len(cases) else f'{first + step * n:06d}'
                if 'shapes' in batch and tuple(array.shape) != tuple(batch['shapes'][i]):
                    raise ValueError(
                        f'case {name}: predicted on a {tuple(array.shape)} grid, its image is '
                        f'{tuple(batch["shapes"][i])}: a prediction transform that resamples or crops must be '
                        'inverted before writing (the affine is the image file\'s)')
                if array.ndim == 3:
                    from ..data.volumes import write_nifti
                    affine = batch['affines'][i].numpy() if 'affines' in batch else None
                    write_nifti(os.path.join(path, f'{name}.nii.gz'), array.astype(np.int32), affine=affine)
                else:
                    from PIL import Image
                    Image.fromarray(array.astype(np.uint8)).save(os.path.join(path, f'{name}.png'))
                n += 1
        return path

    def figures(self, trainer: pl.Trainer) -> Dict[str, Any]:
        if not self.samples:
            return {}
        from ..plots import plot_masks, plot_volume_slices
        if self.hparams.spatial_dims == 3:
            return {f'slices_{i}': plot_volume_slices(x, y, p) for i, (x, y, p) in enumerate(self.samples)}
        images, targets, preds = (list(t) for t in zip(*self.samples))
        return {'masks': plot_masks(images, targets, preds, self.hparams.num_classes)}
