"""Classification data: scikit-learn's digits as an embedded set, and image folders in ImageNet layout.

Both yield ``(image, label)`` as torchvision's classification datasets do:

- ``image``: float32 ``(3, H, W)`` in [0, 1]. Normalisation by the model's mean and std is the
  recipe's business (``ClassificationTask`` normalises with the model's ``pretrained_cfg``).
- ``label``: int64 scalar tensor, the class index.

A ``transform`` (an albumentations-style callable) is applied as ``sample = transform(image=...)``
to the ``image`` (H, W, 3) uint8 before the conversion to a tensor.

scikit-learn is imported only where the digits are loaded.
"""
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

__all__ = ['DIGITS_SPLITS', 'DigitsDataset', 'ImageFolderDataset', 'IMAGE_EXTENSIONS']

PathLike = Union[str, os.PathLike]
Transform = Callable[..., Dict[str, Any]]

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')

# the fixed split of the 1797 digits: per class, 70 % train, 10 % val, 20 % test (held out)
DIGITS_SPLITS = ('train', 'val', 'test')
_DIGITS_FRACTIONS = (0.7, 0.1)
_DIGITS_SPLIT_SEED = 0


def _to_sample(image: np.ndarray, label: int, transform: Optional[Transform]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Apply the albumentations-style ``transform`` to an (H, W, 3) uint8 image and convert to tensors."""
    if transform is not None:
        image = transform(image=image)['image']
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f'the transform must keep the image (H, W, 3) uint8, got {image.dtype} {image.shape}')
    tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255)
    return tensor, torch.tensor(label, dtype=torch.int64)


class DigitsDataset(Dataset):
    """scikit-learn's handwritten digits (1797 images of 8x8 pixels, 10 classes, shipped inside
    scikit-learn, so nothing is downloaded), upscaled to ``image_size`` and split once and for all.

    The split is stratified and fixed (a seeded permutation per class): ``'train'`` 70 % (1258
    images), ``'val'`` 10 % (179), ``'test'`` 20 % (360). ``'test'`` is the held-out split:
    nothing of a recipe looks at it during fit. The 17 grey levels (0..16) are scaled to 0..255
    and repeated over 3 channels; images are upscaled bicubically, because the zoo's models
    downsample 32-fold and want more than 8 pixels.

    Args:
        split: ``'train'``, ``'val'`` or ``'test'``.
        image_size: side of the square images produced (at least 8).
        transform: albumentations-style callable on ``image`` (H, W, 3) uint8.
    """

    classes: Tuple[str, ...] = tuple(str(i) for i in range(10))

    def __init__(self, split: str = 'train', image_size: int = 32, transform: Optional[Transform] = None) -> None:
        if split not in DIGITS_SPLITS:
            raise ValueError(f'digits split must be one of {DIGITS_SPLITS}, got {split!r}')
        if image_size < 8:
            raise ValueError(f'image_size must be at least the digits\' 8 pixels, got {image_size}')
        from sklearn.datasets import load_digits
        digits = load_digits()
        index = self.split_indices(digits.target)[split]
        self.split = split
        self.transform = transform
        self.targets: List[int] = digits.target[index].tolist()
        grey = (digits.images[index] * (255 / 16)).round().astype(np.uint8)
        if image_size != 8:
            grey = np.stack([
                np.asarray(Image.fromarray(g).resize((image_size, image_size), Image.BICUBIC)) for g in grey])
        self.images = np.repeat(grey[..., None], 3, axis=-1)  # (N, S, S, 3) uint8

    @staticmethod
    def split_indices(targets: np.ndarray) -> Dict[str, np.ndarray]:
        """The fixed stratified split of the digits' indices into ``train``, ``val`` and ``test``."""
        rng = np.random.default_rng(_DIGITS_SPLIT_SEED)
        parts: Dict[str, List[np.ndarray]] = {s: [] for s in DIGITS_SPLITS}
        for c in np.unique(targets):
            idx = rng.permutation(np.flatnonzero(targets == c))
            n_train = int(round(_DIGITS_FRACTIONS[0] * len(idx)))
            n_val = int(round(_DIGITS_FRACTIONS[1] * len(idx)))
            parts['train'].append(idx[:n_train])
            parts['val'].append(idx[n_train:n_train + n_val])
            parts['test'].append(idx[n_train + n_val:])
        return {s: np.sort(np.concatenate(p)) for s, p in parts.items()}

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return _to_sample(self.images[index], self.targets[index], self.transform)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


class ImageFolderDataset(Dataset):
    """Images in class folders, ImageNet's layout: ``root/<class>/<image>``.

    For ImageNet itself ``root`` is ``.../train`` or ``.../val`` with the validation images moved
    into their synset folders (the layout torchvision and timm read). Classes are the sorted folder
    names. Raises FileNotFoundError or ValueError, naming the folder, for a missing ``root``, a
    folder without class folders (a flat folder of images, such as ImageNet's validation images as
    distributed, is recognised and explained), class folders without images, or ``classes`` given
    that do not match the folders found (a validation folder must have the training classes).

    Args:
        root: the folder holding one folder per class.
        transform: albumentations-style callable on ``image`` (H, W, 3) uint8.
        classes: the expected class names in label order (e.g. the training split's); ``None`` takes
            the folders found.
    """

    def __init__(
            self,
            root: PathLike,
            transform: Optional[Transform] = None,
            classes: Optional[List[str]] = None,
    ) -> None:
        self.root = Path(root)
        self.transform = transform
        found = self.find_classes(self.root)
        if classes is not None and list(classes) != found:
            missing = sorted(set(classes) - set(found))
            extra = sorted(set(found) - set(classes))
            raise ValueError(
                f'image folder {self.root} has other classes than expected: missing {missing[:5]}'
                f'{"..." if len(missing) > 5 else ""}, unexpected {extra[:5]}{"..." if len(extra) > 5 else ""}')
        self.classes: List[str] = found
        self.samples: List[Tuple[str, int]] = []
        empty = []
        for label, name in enumerate(found):
            files = sorted(
                os.path.join(dirpath, f)
                for dirpath, _, filenames in os.walk(self.root / name, followlinks=True)
                for f in filenames if _is_image(f))
            if not files:
                empty.append(name)
            self.samples.extend((f, label) for f in files)
        if empty:
            raise ValueError(
                f'image folder {self.root}: {len(empty)} class folders hold no images '
                f'({", ".join(empty[:5])}{"..." if len(empty) > 5 else ""}); extensions read: {IMAGE_EXTENSIONS}')
        self.targets = [label for _, label in self.samples]

    @staticmethod
    def find_classes(root: PathLike) -> List[str]:
        """The sorted class folders of ``root``; a clear error when there are none."""
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f'image folder {root} does not exist')
        entries = list(os.scandir(root))
        found = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith('.'))
        if not found:
            n_images = sum(1 for e in entries if e.is_file() and _is_image(e.name))
            hint = (f' It holds {n_images} images directly: move them into one folder per class (for '
                    'ImageNet\'s validation images, e.g. with the synset labels of its devkit).') if n_images else ''
            raise ValueError(f'image folder {root} has no class folders.{hint}')
        return found

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as im:
                image = np.asarray(im.convert('RGB'))
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f'cannot read image {path}: {e}') from e
        return _to_sample(image, label, self.transform)
