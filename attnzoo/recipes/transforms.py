"""Augmentation presets by name: albumentations 2.0 pipelines for images, MONAI dict transforms for volumes.

``create_transform(name, image_size=..., seed=...)`` returns a :class:`Preset`, a callable applied
by the datasets as ``sample = preset(**sample)`` to numpy arrays (the layouts of
``attnzoo.recipes.data``): ``image`` (H, W, 3) uint8 with, per task, ``mask`` (H, W) int64
(255 ignored), or ``bboxes`` (N, 4) COCO x, y, w, h with ``labels``, ``ann_index`` and ``masks``
(a list of (H, W) uint8) moved in step with the image; for volumes ``image`` (C, D, H, W) float32
and ``label`` (D, H, W) int. Geometry is applied to every target at once (albumentations moves boxes
and masks with the image), so a shape's box still covers its mask after flips, crops and resizes.

Randomness: each preset draws from its own generator, seeded by ``seed`` (albumentations'
``Compose(seed=...)``, MONAI's ``set_random_state``). The data modules reseed it per sample from
(seed, epoch, index) through :meth:`Preset.reseed`, so augmentations do not depend on the order of
samples, on the number of workers or processes, or on where a run was resumed.

``list_presets()`` names them all; ``register_preset`` adds one.
"""
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

os.environ.setdefault('NO_ALBUMENTATIONS_UPDATE', '1')  # albumentations would query PyPI at import

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
from albumentations.augmentations.crops.transforms import BaseCrop  # noqa: E402

__all__ = ['Preset', 'RandomCropAbsoluteRange', 'create_transform', 'list_presets', 'register_preset']

Size = Union[int, Sequence[int]]
_PRESETS: Dict[str, Callable[..., Any]] = {}
# mmdet/mmseg keep boxes whose visible part is tiny; torchvision's detectors need boxes of positive size
_BBOX_PARAMS = dict(format='coco', label_fields=['labels', 'ann_index'], min_area=1.0, min_visibility=0.0,
                    min_width=1.0, min_height=1.0, clip=True, filter_invalid_bboxes=True)
IGNORE_INDEX = 255


def _hw(size: Size) -> Tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


class Preset:
    """A named pipeline: ``preset(**sample) -> sample`` on numpy arrays, reseeded with :meth:`reseed`.

    Args:
        name: the preset's name.
        pipeline: an ``albumentations.Compose`` or a MONAI ``Compose`` of dict transforms.
    """

    def __init__(self, name: str, pipeline: Any) -> None:
        self.name = name
        self.pipeline = pipeline
        self.is_monai = not isinstance(pipeline, A.BaseCompose)

    def reseed(self, seed: int) -> None:
        """Restart the pipeline's random generators from ``seed``."""
        if self.is_monai:
            self.pipeline.set_random_state(seed=seed)
        else:
            self.pipeline.set_random_seed(seed)

    def __call__(self, **sample: Any) -> Dict[str, Any]:
        if not self.is_monai:
            return self.pipeline(**sample)
        # MONAI's spatial dict transforms want every key channel-first: give the label map a channel
        has_label = 'label' in sample
        if has_label:
            sample['label'] = sample['label'][None]
        out = self.pipeline(sample)
        if isinstance(out, list):  # croppers return one dict per patch; presets draw a single one
            out = out[0]
        out = {k: (np.asarray(v) if hasattr(v, '__array__') else v) for k, v in out.items()}
        if has_label:
            out['label'] = out['label'][0]
        return out

    def __repr__(self) -> str:
        return f'Preset({self.name!r}, {self.pipeline!r})'


def register_preset(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a builder under ``name``: ``fn(image_size, **kwargs)`` returns a list of
    albumentations ops (composed by :func:`create_transform`) or a MONAI ``Compose``."""
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _PRESETS:
            raise ValueError(f'preset {name!r} is registered twice')
        _PRESETS[name] = fn
        return fn
    return wrap


def list_presets() -> List[str]:
    """The names of the registered presets, sorted."""
    return sorted(_PRESETS)


def create_transform(
        name: str,
        image_size: Size = 224,
        seed: Optional[int] = None,
        boxes: bool = False,
        **kwargs: Any,
) -> Preset:
    """Build the preset ``name`` for ``image_size`` (an int or (H, W); for volumes the patch size),
    its generator seeded with ``seed``. ``boxes=True`` moves ``bboxes`` (COCO x, y, w, h) with their
    ``labels`` and ``ann_index`` along (boxes left with no area are dropped with their fields).
    ``kwargs`` go to the preset's builder."""
    if name not in _PRESETS:
        raise KeyError(f'unknown augmentation preset {name!r}; presets: {", ".join(list_presets())}')
    ops = _PRESETS[name](image_size, **kwargs)
    if isinstance(ops, list):  # albumentations ops; MONAI presets return their own Compose
        ops = A.Compose(ops, bbox_params=A.BboxParams(**_BBOX_PARAMS) if boxes else None, seed=seed)
    preset = Preset(name, ops)
    preset.reseed(seed)
    return preset


# ---------------------------------------------------------------------------------------------- classification

def _rand_augment(magnitude: int = 9, num_ops: int = 2) -> A.SomeOf:
    """RandAugment (Cubuk et al.): ``num_ops`` ops drawn uniformly from its op set, each at
    ``magnitude`` of 10 (timm's ``rand-m9-mstd0.5`` without the magnitude noise), written with
    albumentations' ops."""
    m = magnitude / 10
    ops = [
        A.AutoContrast(p=1), A.Equalize(p=1),
        A.Affine(rotate=(-30 * m, 30 * m), border_mode=cv2.BORDER_CONSTANT, fill=128, p=1),
        A.Solarize(threshold_range=(1 - m, 1 - m), p=1),
        A.Posterize(num_bits=max(1, int(8 - 4 * m)), p=1),
        A.ColorJitter(brightness=0, contrast=0, saturation=(1 - 0.9 * m, 1 + 0.9 * m), hue=0, p=1),
        A.RandomBrightnessContrast(brightness_limit=0.9 * m * 0.5, contrast_limit=0, p=1),
        A.RandomBrightnessContrast(brightness_limit=0, contrast_limit=0.9 * m, p=1),
        A.Sharpen(alpha=(0.1, 0.9 * m), p=1),
        A.Affine(shear={'x': (-17 * m, 17 * m), 'y': 0}, border_mode=cv2.BORDER_CONSTANT, fill=128, p=1),
        A.Affine(shear={'x': 0, 'y': (-17 * m, 17 * m)}, border_mode=cv2.BORDER_CONSTANT, fill=128, p=1),
        A.Affine(translate_percent={'x': (-0.45 * m, 0.45 * m), 'y': 0}, border_mode=cv2.BORDER_CONSTANT,
                 fill=128, p=1),
        A.Affine(translate_percent={'x': 0, 'y': (-0.45 * m, 0.45 * m)}, border_mode=cv2.BORDER_CONSTANT,
                 fill=128, p=1),
    ]
    return A.SomeOf(ops, n=num_ops, p=1)


@register_preset('imagenet')
def _imagenet(image_size: Size, scale: Tuple[float, float] = (0.08, 1.0), hflip: float = 0.5,
              rand_augment: Optional[int] = 9, color_jitter: float = 0.0, erasing: float = 0.25) -> List[Any]:
    """timm's ImageNet training pipeline as the DaViT/Swin recipes use it: RandomResizedCrop
    (bicubic), horizontal flip, RandAugment m9 n2 (or colour jitter), random erasing 0.25."""
    h, w = _hw(image_size)
    ops: List[Any] = [A.RandomResizedCrop(size=(h, w), scale=scale, interpolation=cv2.INTER_CUBIC),
                      A.HorizontalFlip(p=hflip)]
    if rand_augment:
        ops.append(_rand_augment(rand_augment))
    elif color_jitter:
        ops.append(A.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter, hue=0, p=1))
    if erasing:
        ops.append(A.Erasing(scale=(0.02, 1 / 3), ratio=(0.3, 3.3), fill='random', p=erasing))
    return ops


@register_preset('imagenet_eval')
def _imagenet_eval(image_size: Size, crop_pct: float = 0.875) -> List[Any]:
    """timm's evaluation pipeline: shorter side to ``size / crop_pct`` (bicubic), centre crop."""
    h, w = _hw(image_size)
    return [A.SmallestMaxSize(max_size=int(round(min(h, w) / crop_pct)), interpolation=cv2.INTER_CUBIC),
            A.CenterCrop(h, w)]


@register_preset('digits')
def _digits(image_size: Size) -> List[Any]:
    """Small affine jitter for handwritten digits (no flips: a mirrored digit is another symbol).
    The digits dataset upscales to the model's size itself, so ``image_size`` is not used here."""
    return [A.Affine(scale=(0.9, 1.1), translate_percent=(-0.08, 0.08), rotate=(-10, 10),
                     border_mode=cv2.BORDER_CONSTANT, fill=0, p=0.8)]


@register_preset('resize')
def _resize(image_size: Size) -> List[Any]:
    """Resize to ``image_size``, nothing random: evaluation on the embedded sets, with every target."""
    h, w = _hw(image_size)
    return [A.Resize(h, w, interpolation=cv2.INTER_LINEAR)]


# ---------------------------------------------------------------------------------------------- segmentation

def _photometric() -> List[Any]:
    """mmseg's PhotoMetricDistortion, each part with probability 0.5: brightness +-32 levels,
    contrast and saturation x0.5..1.5, hue +-18 of OpenCV's 180 (a tenth of the circle)."""
    return [
        A.RandomBrightnessContrast(brightness_limit=32 / 255, contrast_limit=0, brightness_by_max=True, p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0, contrast_limit=0.5, p=0.5),
        A.ColorJitter(brightness=0, contrast=0, saturation=(0.5, 1.5), hue=0, p=0.5),
        A.ColorJitter(brightness=0, contrast=0, saturation=0, hue=(-0.1, 0.1), p=0.5),
    ]


@register_preset('ade20k')
def _ade20k(image_size: Size = 512, ratio_range: Tuple[float, float] = (0.5, 2.0)) -> List[Any]:
    """mmseg's ADE20K training pipeline (512x512 crops): shorter side rescaled to the crop size
    times a factor in ``ratio_range`` (mmseg's RandomResize to (2048, 512) when the short side
    binds), padded with the ignore index, random crop, flip, photometric distortion. mmseg's
    ``cat_max_ratio`` crop retries have no albumentations counterpart and are left out."""
    h, w = _hw(image_size)
    lo, hi = ratio_range
    return [
        A.SmallestMaxSize(max_size=min(h, w)),
        A.RandomScale(scale_limit=(lo - 1, hi - 1), p=1),
        A.PadIfNeeded(min_height=h, min_width=w, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=IGNORE_INDEX),
        A.RandomCrop(h, w),
        A.HorizontalFlip(p=0.5),
        *_photometric(),
    ]


@register_preset('ade20k_eval')
def _ade20k_eval(image_size: Size = 512) -> List[Any]:
    """mmseg's ADE20K test resize (keep ratio, shorter side 512); the logits are scored at this size."""
    return [A.SmallestMaxSize(max_size=min(_hw(image_size)))]


@register_preset('shapes')
def _shapes(image_size: Size) -> List[Any]:
    """The embedded drawn-shapes sets (segmentation and detection alike): random resized crop,
    horizontal and vertical flips, mild colour jitter; boxes, masks and label maps move in step."""
    h, w = _hw(image_size)
    return [
        A.RandomResizedCrop(size=(h, w), scale=(0.5, 1.0), ratio=(0.75, 4 / 3)),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5),
    ]


# ---------------------------------------------------------------------------------------------- detection

@register_preset('coco')
def _coco(image_size: Size = 800) -> List[Any]:
    """mmdet's COCO training augmentation: a horizontal flip. The (multi-scale) resize is the
    detector's own (torchvision's ``GeneralizedRCNNTransform``: ``min_size``/``max_size``), so
    ``image_size`` is not used here."""
    return [A.HorizontalFlip(p=0.5)]


class RandomCropAbsoluteRange(BaseCrop):
    """mmdet's ``RandomCrop(crop_type='absolute_range', allow_negative_crop=True)``: a crop of height
    and width each drawn uniformly (integers) from [min(side, lo), min(side, hi)], at a uniform
    position; boxes left with no area are dropped (crops without any are allowed)."""

    def __init__(self, crop_range: Tuple[int, int] = (384, 600), p: float = 1.0) -> None:
        super().__init__(p=p)
        self.crop_range = tuple(int(v) for v in crop_range)

    def get_params_dependent_on_data(self, params: Dict[str, Any], data: Dict[str, Any]) -> Dict[str, Any]:
        height, width = params['shape'][:2]
        lo, hi = self.crop_range
        crop_h = self.py_random.randint(min(height, lo), min(height, hi))
        crop_w = self.py_random.randint(min(width, lo), min(width, hi))
        y0 = self.py_random.randint(0, height - crop_h)
        x0 = self.py_random.randint(0, width - crop_w)
        return {'crop_coords': (x0, y0, x0 + crop_w, y0 + crop_h)}

    def get_transform_init_args_names(self) -> Tuple[str, ...]:
        return ('crop_range',)


@register_preset('coco_detr')
def _coco_detr(image_size: Size = 800, short_sides: Sequence[int] = (400, 500, 600),
               crop_range: Tuple[int, int] = (384, 600)) -> List[Any]:
    """The DETR / Sparse R-CNN augmentation of the NAT, DiNAT and Swin Mask R-CNN 3x configs
    (mmdet's ``AutoAugment`` of two policies, after a horizontal flip): half of the images pass
    as they are, half are resized to a shorter side drawn from ``short_sides`` and cropped to a
    random size in ``crop_range`` (``RandomCropAbsoluteRange``). The final multi-scale resize (a
    shorter side of 480, 512, ..., 800, longer side at most 1333) is the detector's own: give it
    ``min_size: [480, 512, ..., 800]`` and ``max_size: 1333`` (torchvision draws one per batch in
    training). mmdet also caps the longer side at 1333 in the first resize, which matters only for
    images more than 2.2 times as wide as high. ``image_size`` is not used."""
    return [
        A.HorizontalFlip(p=0.5),
        A.OneOf([
            A.NoOp(p=1.0),
            A.Sequential([A.SmallestMaxSize(max_size=list(short_sides)), RandomCropAbsoluteRange(crop_range)], p=1.0),
        ], p=1.0),
    ]


@register_preset('coco_eval')
def _coco_eval(image_size: Size = 800) -> List[Any]:
    """No change: the detector resizes (``min_size=800, max_size=1333``) and maps boxes back."""
    return []


# ---------------------------------------------------------------------------------------------- volumes

def _dhw(size: Size) -> Tuple[int, int, int]:
    if isinstance(size, int):
        return size, size, size
    d, h, w = size
    return int(d), int(h), int(w)


@register_preset('volumes')
def _volumes(image_size: Size = 96, pos: float = 1.0, neg: float = 1.0, flip: float = 0.5,
             scale_intensity: float = 0.1, shift_intensity: float = 0.1) -> Any:
    """Training patches of (C, D, H, W) volumes with MONAI's dict transforms: padded to at least
    ``image_size``, a patch of ``image_size`` centred on a foreground voxel with odds ``pos : neg``
    against a background one (tumours are small: uniform crops would mostly miss them), a flip
    along each axis with ``flip``, intensities scaled by 1 +- ``scale_intensity`` and shifted by
    +- ``shift_intensity`` (absolute: for volumes normalised to about [0, 1]; the label untouched)."""
    from monai.transforms import (
        Compose,
        RandCropByPosNegLabeld,
        RandFlipd,
        RandScaleIntensityd,
        RandShiftIntensityd,
        SpatialPadd,
    )
    size = _dhw(image_size)
    keys = ['image', 'label']
    return Compose([
        SpatialPadd(keys, spatial_size=size),
        RandCropByPosNegLabeld(keys, label_key='label', spatial_size=size, pos=pos, neg=neg, num_samples=1),
        *(RandFlipd(keys, prob=flip, spatial_axis=axis) for axis in range(3)),
        RandScaleIntensityd('image', factors=scale_intensity, prob=1.0),
        RandShiftIntensityd('image', offsets=shift_intensity, prob=1.0),
    ])
