"""Semantic segmentation folders in ADE20K's layout: a reader, and a writer of synthetic drawn-shape sets.

The layout is ADE20K's (ADEChallengeData2016), which mmsegmentation and most segmentation sets use::

    root/images/training/*.jpg        root/annotations/training/*.png
    root/images/validation/*.jpg      root/annotations/validation/*.png

An annotation has the image's file stem and holds one class index per pixel (8-bit grey or palette
PNG). ADE20K's index 0 is "other", which its benchmark ignores: ``reduce_zero_label=True`` maps 0 to
the ignore index 255 and 1..150 to 0..149, as mmseg does for ADE20K.

``SegmentationFolder`` yields ``(image, mask)``: ``image`` float32 ``(3, H, W)`` in [0, 1], ``mask``
int64 ``(H, W)`` with 255 where the loss and metrics ignore a pixel. Normalisation with the
backbone's mean and std is the model side's business (the recipes' transforms). A ``transform``
(albumentations-style) runs before the conversion to tensors, as ``transform(image=..., mask=...)``
on ``image`` (H, W, 3) uint8 and ``mask`` (H, W) int64.

``write_shapes_segmentation`` writes a small set of images of drawn shapes (``shapes.py``) in that
layout, with the background as class 0 and the shapes as 1..3, for demos and tests.
"""
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from .shapes import SHAPE_CLASSES, draw_shapes

__all__ = ['IGNORE_INDEX', 'SHAPES_SEGMENTATION_CLASSES', 'SegmentationFolder', 'write_shapes_segmentation']

PathLike = Union[str, os.PathLike]
IGNORE_INDEX = 255
# the classes of write_shapes_segmentation's sets, by label index
SHAPES_SEGMENTATION_CLASSES: Tuple[str, ...] = ('background',) + SHAPE_CLASSES
_SPLITS = ('training', 'validation')


class SegmentationFolder(Dataset):
    """One split of an ADE20K-layout folder: ``(image, mask)`` pairs (see the module docstring).

    Args:
        root: the folder holding ``images/`` and ``annotations/``.
        split: ``'training'`` or ``'validation'`` (any subfolder name present under both works).
        reduce_zero_label: map label 0 to the ignore index and shift the others down by one (ADE20K).
        transform: ``transform(image=..., mask=...) -> dict`` applied to the numpy arrays.
        img_suffix: the images' file suffix (ADE20K: ``.jpg``).
        seg_map_suffix: the annotations' file suffix (``.png``).
        classes: the class names, by label index after the reduction (optional; sets ``num_classes``).

    Raises FileNotFoundError for a missing folder, ValueError for a folder without images or with
    images lacking their annotation (naming them).
    """

    ignore_index = IGNORE_INDEX

    def __init__(
            self,
            root: PathLike,
            split: str = 'training',
            reduce_zero_label: bool = False,
            transform: Optional[Callable[..., Dict[str, Any]]] = None,
            img_suffix: str = '.jpg',
            seg_map_suffix: str = '.png',
            classes: Optional[Sequence[str]] = None,
    ):
        self.root = Path(root)
        self.split = split
        self.reduce_zero_label = reduce_zero_label
        self.transform = transform
        self.classes = tuple(classes) if classes is not None else None
        image_dir, ann_dir = self.root / 'images' / split, self.root / 'annotations' / split
        for folder in (image_dir, ann_dir):
            if not folder.is_dir():
                raise FileNotFoundError(
                    f'{folder} does not exist: an ADE20K-layout folder holds images/{split}/*{img_suffix} and '
                    f'annotations/{split}/*{seg_map_suffix}')
        images = sorted(p for p in image_dir.iterdir() if p.name.endswith(img_suffix))
        if not images:
            raise ValueError(f'{image_dir} holds no *{img_suffix} images')
        pairs, missing = [], []
        for image in images:
            ann = ann_dir / (image.name[:-len(img_suffix)] + seg_map_suffix)
            (pairs if ann.is_file() else missing).append((image, ann))
        if missing:
            names = ', '.join(str(a) for _, a in missing[:5]) + (' ...' if len(missing) > 5 else '')
            raise ValueError(f'{len(missing)} of {len(images)} images in {image_dir} have no annotation: {names}')
        self.samples: List[Tuple[Path, Path]] = pairs

    @property
    def num_classes(self) -> Optional[int]:
        return len(self.classes) if self.classes is not None else None

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> Dict[str, np.ndarray]:
        """The sample before the transform: ``image`` (H, W, 3) uint8, ``mask`` (H, W) int64."""
        image_path, ann_path = self.samples[index]
        with Image.open(image_path) as im:
            image = np.array(im.convert('RGB'))
        with Image.open(ann_path) as an:
            if an.mode not in ('L', 'P', 'I;16', 'I'):
                raise ValueError(f'{ann_path} is a {an.mode} image; annotations hold one class index per pixel '
                                 f'(8-bit grey or palette PNG)')
            mask = np.array(an).astype(np.int64)
        if mask.shape != image.shape[:2]:
            raise ValueError(f'{ann_path} is {mask.shape[1]}x{mask.shape[0]} but its image {image_path} is '
                             f'{image.shape[1]}x{image.shape[0]}')
        if self.reduce_zero_label:
            # ADE20K's 0 ("other") is ignored, 1..150 become 0..149; 255 stays ignored
            ignored = (mask == 0) | (mask == IGNORE_INDEX)
            mask = np.where(ignored, IGNORE_INDEX, mask - 1)
        return {'image': image, 'mask': mask}

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        sample = self.read(index)
        if self.transform is not None:
            sample = self.transform(**sample)
        image, mask = np.asarray(sample['image']), np.asarray(sample['mask'])
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f'the transform must return image as (H, W, 3) uint8, got {image.dtype} {image.shape}')
        if mask.shape != image.shape[:2]:
            raise ValueError(f'the transform returned mask {mask.shape} for image {image.shape}')
        image_t = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255)
        return image_t, torch.from_numpy(np.ascontiguousarray(mask.astype(np.int64)))


def write_shapes_segmentation(
        root: PathLike,
        num_train: int = 16,
        num_val: int = 4,
        size: Tuple[int, int] = (64, 96),
        seed: int = 0,
        max_shapes: int = 3,
        progress: bool = False,
) -> Path:
    """Write a synthetic ADE20K-layout set of drawn shapes under ``root``; returns ``root``.

    ``num_train`` and ``num_val`` images of ``size`` (H, W) as JPEG (quality 95), with PNG
    annotations: 0 background, 1 rectangle, 2 ellipse, 3 triangle (``SHAPES_SEGMENTATION_CLASSES``;
    read it with ``reduce_zero_label=False``). The same seed writes the same set.
    """
    root = Path(root)
    height, width = size
    rng = np.random.default_rng(seed)
    for split, count in zip(_SPLITS, (num_train, num_val)):
        image_dir, ann_dir = root / 'images' / split, root / 'annotations' / split
        image_dir.mkdir(parents=True, exist_ok=True)
        ann_dir.mkdir(parents=True, exist_ok=True)
        for i in tqdm(range(count), desc=f'shapes {split}', disable=not progress):
            image, shapes = draw_shapes(rng, height, width, max_shapes=max_shapes)
            mask = np.zeros((height, width), dtype=np.uint8)
            for shape in shapes:
                mask[shape.mask] = shape.label
            name = f'shapes_{split}_{i:05d}'
            Image.fromarray(image).save(image_dir / f'{name}.jpg', quality=95)
            Image.fromarray(mask).save(ann_dir / f'{name}.png')
    return root
