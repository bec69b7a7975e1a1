"""LightningDataModules over the datasets of ``attnzoo.recipes.data``, with augmentation presets by name.

Every data module draws its batches through :mod:`attnzoo.recipes.sampling`: the training order
is a function of (seed, epoch) and each sample's augmentation a function of (seed, epoch, index),
so runs reproduce with any number of workers, resume exactly at epoch boundaries, and shard under
DDP as interleaved slices of the single-process order (Lightning keeps these samplers: they are
``DistributedSampler``s). Evaluation splits are sharded without padding, so dataset-level metrics
synced over processes equal the single-process ones.

The seed is ``seed`` or, when None, the run's ``seed_everything`` (``PL_GLOBAL_SEED``).
"""
import os
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset

from .data.coco import collate_detection
from .sampling import EvalSampler, SeededDataset, TrainSampler
from .transforms import Preset, create_transform

__all__ = [
    'BaseDataModule', 'CocoDataModule', 'DigitsDataModule', 'ImageFolderDataModule', 'SegmentationFolderDataModule',
    'ShapesCocoDataModule', 'ShapesSegmentationDataModule', 'SyntheticVolumesDataModule', 'VolumeDataModule',
    'cache_dir',
]

Size = Union[int, List[int]]


class BaseDataModule(pl.LightningDataModule):
    """Splits, presets and loaders; subclasses say how to build a split (``build_dataset``).

    Args:
        batch_size: samples per batch and process in training.
        eval_batch_size: per batch in validation, test and predict (default ``batch_size``).
        num_workers: DataLoader worker processes.
        image_size: the size the presets produce (int or [H, W]; patch size for volumes).
        train_preset: augmentation preset of the training split (``attnzoo.recipes.transforms``).
        eval_preset: preset of the other splits (None: no transform).
        train_preset_kwargs: arguments of the training preset's builder.
        eval_preset_kwargs: arguments of the evaluation preset's builder.
        predict_split: the split ``predict`` runs on.
        seed: seed of order and augmentation (None: the run's ``seed_everything``).
        pin_memory: DataLoader's ``pin_memory``.
    """

    #: the presets move boxes with the images (detection)
    boxes: bool = False
    #: DataLoader's collate function (None: torch's default)
    collate_fn: Optional[Callable[[List[Any]], Any]] = None

    def __init__(
            self,
            batch_size: int = 32,
            eval_batch_size: Optional[int] = None,
            num_workers: int = 0,
            image_size: Size = 224,
            train_preset: Optional[str] = None,
            eval_preset: Optional[str] = None,
            train_preset_kwargs: Optional[Dict[str, Any]] = None,
            eval_preset_kwargs: Optional[Dict[str, Any]] = None,
            predict_split: str = 'test',
            seed: Optional[int] = None,
            pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.train_preset = train_preset
        self.eval_preset = eval_preset
        self.train_preset_kwargs = train_preset_kwargs or {}
        self.eval_preset_kwargs = eval_preset_kwargs or {}
        self.predict_split = predict_split
        self.seed = seed
        self.pin_memory = pin_memory
        self.datasets: Dict[str, Dataset] = {}

    # ------------------------------------------------------------------------------------------ datasets

    def build_dataset(self, split: str, transform: Optional[Preset]) -> Dataset:
        """The dataset of ``split`` with ``transform`` (its ``transform`` attribute is reseeded per sample)."""
        raise NotImplementedError

    @property
    def run_seed(self) -> int:
        return self.seed if self.seed is not None else int(os.environ.get('PL_GLOBAL_SEED', 0))

    def _preset(self, train: bool) -> Optional[Preset]:
        name = self.train_preset if train else self.eval_preset
        if name is None:
            return None
        kwargs = self.train_preset_kwargs if train else self.eval_preset_kwargs
        return create_transform(name, image_size=self.image_size, seed=self.run_seed, boxes=self.boxes, **kwargs)

    def dataset(self, split: str) -> Dataset:
        """The dataset of ``split`` (built once), with the training preset for 'train', else the evaluation one."""
        if split not in self.datasets:
            self.datasets[split] = self.build_dataset(split, self._preset(train=split == 'train'))
        return self.datasets[split]

    def setup(self, stage: str) -> None:
        needed = {'fit': ['train', 'val'], 'validate': ['val'], 'test': ['test'], 'predict': [self.predict_split]}
        for split in needed[stage]:
            self.dataset(split)

    @property
    def predict_dataset(self) -> Dataset:
        return self.dataset(self.predict_split)

    # ------------------------------------------------------------------------------------------ loaders

    def _replicas(self) -> Tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _loader(self, dataset: Dataset, sampler: Any, batch_size: int, drop_last: bool) -> DataLoader:
        return DataLoader(
            SeededDataset(dataset, self.run_seed), batch_size=batch_size, sampler=sampler, drop_last=drop_last,
            num_workers=self.num_workers, collate_fn=self.collate_fn, pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset('train')
        world, rank = self._replicas()
        trainer = self.trainer
        # the epoch asked of the trainer when each epoch's iteration starts: a resumed run's, which
        # Lightning's own set_epoch gives one ahead after a step budget
        sampler = TrainSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.run_seed,
                               current_epoch=(lambda: trainer.current_epoch) if trainer is not None else None)
        if len(sampler) < self.batch_size:
            raise ValueError(f'the training split has {len(sampler)} samples per process, fewer than a batch '
                             f'({self.batch_size}): lower data.init_args.batch_size')
        # full batches only, as timm trains: mixup pairs samples, batch norm needs more than one
        return self._loader(dataset, sampler, self.batch_size, drop_last=True)

    def _eval_loader(self, split: str) -> DataLoader:
        dataset = self.dataset(split)
        world, rank = self._replicas()
        return self._loader(dataset, EvalSampler(dataset, world, rank), self.eval_batch_size, drop_last=False)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader('val')

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader('test')

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.predict_split)


# ---------------------------------------------------------------------------------------------- classification

class DigitsDataModule(BaseDataModule):
    """scikit-learn's digits (embedded, no download): 1258 training, 179 validation and 360
    held-out test images of 10 classes, upscaled to ``image_size`` (see ``DigitsDataset``)."""

    classes = tuple(str(i) for i in range(10))
    num_classes = 10

    def __init__(self, image_size: int = 32, batch_size: int = 64, train_preset: Optional[str] = 'digits',
                 eval_preset: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(batch_size=batch_size, image_size=image_size, train_preset=train_preset,
                         eval_preset=eval_preset, **kwargs)

    def build_dataset(self, split: str, transform: Optional[Preset]) -> Dataset:
        from .data.classification import DigitsDataset
        return DigitsDataset(split, image_size=self.image_size, transform=transform)


class ImageFolderDataModule(BaseDataModule):
    """Class folders in ImageNet's layout: ``root/<train_dir>/<class>/*`` and ``root/<val_dir>/<class>/*``
    (and ``test_dir``, default the validation folder). The classes are the training folder's; the
    other folders must hold the same ones (a clear error names the difference).

    Presets: timm's ImageNet training pipeline and its resize + centre-crop evaluation
    (``crop_pct`` through ``eval_preset_kwargs``).
    """

    def __init__(self, root: str, train_dir: str = 'train', val_dir: str = 'val', test_dir: Optional[str] = None,
                 image_size: int = 224, train_preset: Optional[str] = 'imagenet',
                 eval_preset: Optional[str] = 'imagenet_eval', **kwargs: Any) -> None:
        super().__init__(image_size=image_size, train_preset=train_preset, eval_preset=eval_preset, **kwargs)
        self.root = root
        self.dirs = {'train': train_dir, 'val': val_dir, 'test': test_dir or val_dir}
        self._classes: Optional[List[str]] = None

    @property
    def classes(self) -> List[str]:
        if self._classes is None:
            from .data.classification import ImageFolderDataset
            self._classes = ImageFolderDataset.find_classes(os.path.join(self.root, self.dirs['train']))
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def build_dataset(self, split: str, transform: Optional[Preset]) -> Dataset:
        from .data.classification import ImageFolderDataset
        if split not in self.dirs:
            raise ValueError(f'split {split!r} is not one of {sorted(self.dirs)}')
        return ImageFolderDataset(os.path.join(self.root, self.dirs[split]), transform=transform, classes=self.classes)


# ---------------------------------------------------------------------------------------------- embedded sets

def cache_dir(name: str) -> str:
    """Where an embedded synthetic set is written: ``$ATTNZOO_CACHE/<name>`` (default
    ``~/.cache/attnzoo/<name>``), the name carrying every argument that changes its files."""
    root = os.environ.get('ATTNZOO_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'attnzoo')
    return os.path.join(root, name)


def _write_once(root: str, write: Callable[[str], Any]) -> None:
    """Write a set into ``root`` unless it is there: into a temporary sibling, then renamed, so
    processes of a DDP run (or runs side by side) never read a half-written set."""
    if os.path.isdir(root):
        return
    import shutil
    import tempfile
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix='.writing-', dir=parent)
    try:
        write(tmp)
        os.rename(tmp, root)
    except OSError:
        if not os.path.isdir(root):  # not another writer winning the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- segmentation

class SegmentationFolderDataModule(BaseDataModule):
    """Semantic segmentation folders in ADE20K's layout (``root/images/<split>/*.jpg``,
    ``root/annotations/<split>/*.png``; see ``attnzoo.recipes.data.segmentation``).

    Batches are ``(image, mask)``: float32 (B, 3, H, W) in [0, 1] and int64 (B, H, W), 255 ignored.
    Presets: mmseg's ADE20K pipeline (random rescale 0.5-2x, 512x512 crop padded with the ignore
    index, flip, photometric distortion) and its evaluation resize (shorter side 512, ratio kept:
    images differ in size, so evaluate with ``eval_batch_size: 1``).

    Args:
        root: the folder holding ``images/`` and ``annotations/``.
        reduce_zero_label: ADE20K's label shift (0 ignored, 1..150 to 0..149).
        num_classes: classes after the shift (ADE20K: 150); None: ``len(classes)``.
        classes: class names by label, for the figures.
        splits: the folder of each split (default training, validation, and validation for test).
        img_suffix: the images' suffix (ADE20K: ``.jpg``).
        seg_map_suffix: the annotations' suffix.
    """

    def __init__(self, root: str, reduce_zero_label: bool = False, num_classes: Optional[int] = None,
                 classes: Optional[List[str]] = None, splits: Optional[Dict[str, str]] = None,
                 img_suffix: str = '.jpg', seg_map_suffix: str = '.png', image_size: Size = 512,
                 train_preset: Optional[str] = 'ade20k', eval_preset: Optional[str] = 'ade20k_eval',
                 **kwargs: Any) -> None:
        super().__init__(image_size=image_size, train_preset=train_preset, eval_preset=eval_preset, **kwargs)
        self.root = root
        self.reduce_zero_label = reduce_zero_label
        self.classes = list(classes) if classes is not None else None
        if num_classes is not None and self.classes is not None and num_classes != len(self.classes):
            raise ValueError(f'num_classes {num_classes} but {len(self.classes)} class names')
        self.num_classes = num_classes if num_classes is not None else (len(self.classes) if self.classes else None)
        self.splits = {'train': 'training', 'val': 'validation', 'test': 'validation', **(splits or {})}
        self.img_suffix = img_suffix
        self.seg_map_suffix = seg_map_suffix

    def build_dataset(self, split: str, transform: Optional[Preset]) -> Dataset:
        from .data.segmentation import SegmentationFolder
        if split not in self.splits:
            raise ValueError(f'split {split!r} is not one of {sorted(self.splits)}')
        return SegmentationFolder(self.root, self.splits[split], reduce_zero_label=self.reduce_zero_label,
                                  transform=transform, img_suffix=self.img_suffix,
                                  seg_map_suffix=self.seg_map_suffix, classes=self.classes)


class ShapesSegmentationDataModule(SegmentationFolderDataModule):
    """The embedded drawn-shapes segmentation set (``write_shapes_segmentation``: background,
    rectangle, ellipse, triangle), written once into a cache folder (``cache_dir``) or ``root``.
    ``size`` is the images' (H, W); the 'shapes' preset crops, flips and colour-jitters training
    images to ``image_size``; validation and test (the same held-out images) are left as drawn."""

    def __init__(self, root: Optional[str] = None, num_train: int = 64, num_val: int = 16,
                 size: Tuple[int, int] = (64, 96), data_seed: int = 0, image_size: Size = (64, 96),
                 train_preset: Optional[str] = 'shapes', eval_preset: Optional[str] = None, **kwargs: Any) -> None:
        from .data.segmentation import SHAPES_SEGMENTATION_CLASSES
        h, w = size
        name = f'shapes_segmentation-{num_train}-{num_val}-{h}x{w}-seed{data_seed}'
        super().__init__(root or cache_dir(name), classes=list(SHAPES_SEGMENTATION_CLASSES), img_suffix='.jpg',
                         image_size=image_size, train_preset=train_preset, eval_preset=eval_preset, **kwargs)
        self.write_args = dict(num_train=num_train, num_val=num_val, size=(h, w), seed=data_seed)

    def prepare_data(self) -> None:
        from .data.segmentation import write_shapes_segmentation
        _write_once(self.root, lambda tmp: write_shapes_segmentation(tmp, **self.write_args))

    def setup(self, stage: str) -> None:
        self.prepare_data()  # used without a trainer, or on a node whose local rank 0 has not written it
        super().setup(stage)


# ---------------------------------------------------------------------------------------------- detection

class CocoDataModule(BaseDataModule):
    """COCO json + image folders (``attnzoo.recipes.data.coco.CocoDetection``), batched for
    torchvision's detectors: ``(images, targets)``, lists (images float32 (3, H, W) in [0, 1] of any
    size; targets with ``boxes`` x0, y0, x1, y1, ``labels`` 1..K, ``masks`` with ``masks=True``).

    Albumentations presets move boxes (``BboxParams(format='coco')``) and masks with the images;
    the detector resizes (``min_size``/``max_size`` of the model). Training leaves out images
    without annotations, as torchvision's reference does; evaluation keeps every image.

    Args:
        root: prefix of the paths below (COCO: the folder holding ``train2017/``, ``annotations/``).
        train_images, train_ann, val_images, val_ann: folders and jsons of the splits.
        test_images, test_ann: the test split (default: the validation one).
        masks: read instance masks (Mask R-CNN).
    """

    boxes = True
    collate_fn = staticmethod(collate_detection)

    def __init__(self, root: str = '', train_images: str = 'train2017',
                 train_ann: str = 'annotations/instances_train2017.json', val_images: str = 'val2017',
                 val_ann: str = 'annotations/instances_val2017.json', test_images: Optional[str] = None,
                 test_ann: Optional[str] = None, masks: bool = False, image_size: Size = 800,
                 train_preset: Optional[str] = 'coco', eval_preset: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(image_size=image_size, train_preset=train_preset, eval_preset=eval_preset, **kwargs)
        self.root = root
        self.files = {'train': (train_images, train_ann), 'val': (val_images, val_ann),
                      'test': (test_images or val_images, test_ann or val_ann)}
        self.masks = masks

    @property
    def classes(self) -> List[str]:
        """Names by label, ``classes[0]`` the background."""
        return list(self.dataset('val').classes)

    @property
    def num_classes(self) -> int:
        """Categories + background: what torchvision's detectors take."""
        return self.dataset('val').num_classes

    def build_dataset(self, split: str, transform: Optional[Preset]) -> Dataset:
        from .data.coco import CocoDetection
        if split not in self.files:
            raise ValueError(f'split {split!r} is not one of {sorted(self.files)}')
        images, ann = (os.path.join(self.root, p) for p in self.files[split])
        return CocoDetection(images, ann, transform=transform, masks=self.masks, skip_empty=split == 'train')


class ShapesCocoDataModule(CocoDataModule):
    """The embedded drawn-shapes COCO set (``write_shapes_coco``: rectangles, ellipses, triangles
    with exact polygons), written once into a cache folder (``cache_dir``) or ``root``:
    ``num_train`` training and ``num_val`` held-out images (validation and test) of ``size`` (H, W).
    The 'shapes' preset crops, flips and colour-jitters training images to ``image_size``, boxes and
    masks in step."""

    def __init__(self, root: Optional[str] = None, num_train: int = 64, num_val: int = 16,
                 size: Tuple[int, int] = (96, 96), data_seed: int = 0, max_shapes: int = 3,
                 image_size: Size = (96, 96), train_preset: Optional[str] = 'shapes',
                 eval_preset: Optional[str] = None, **kwargs: Any) -> None:
        h, w = size
        root = root or cache_dir(f'shapes_coco-{num_train}-{num_val}-{h}x{w}-max{max_shapes}-seed{data_seed}')
        super().__init__(root, train_images='train', train_ann='annotations/instances_train.json', val_images='val',
                         val_ann='annotations/instances_val.json', image_size=image_size, train_preset=train_preset,
                         eval_preset=eval_preset, **kwargs)
        self.write_args = dict(splits={'train': num_train, 'val': num_val}, image_size=(h, w), seed=data_seed,
                               max_shapes=max_shapes)

    def prepare_data(self) -> None:
        from .data.coco import write_shapes_coco
        _write_once(self.root, lambda tmp: write_shapes_coco(tmp, **self.write_args))

    def setup(self, stage: str) -> None:
        self.prepare_data()
        super().setup(stage)


# ---------------------------------------------------------------------------------------------- volumes

class VolumeDataModule(BaseDataModule):
    """NIfTI volumes in the Decathlon layout (``root/imagesTr``, ``root/labelsTr``; see
    ``attnzoo.recipes.data.volumes``), split by case name.

    Batches are dicts: ``image`` float32 (B, C, D, H, W), ``label`` int64 (B, D, H, W), ``spacing``
    (B, 3) mm, ``affine`` (B, 4, 4), ``case`` (names). Training draws ``image_size`` patches (the
    'volumes' preset: crops centred on foreground or background voxels half the time each, flips,
    intensity jitter); evaluation takes whole volumes, one per batch unless they share a size (the
    task segments them with sliding windows).

    Args:
        root: the Decathlon-layout folder.
        val_cases: the validation cases' names (default: the last ``val_fraction`` of the sorted names).
        test_cases: the test cases' names (default: the validation cases).
        val_fraction: share of cases held out when ``val_cases`` is not given.
        ras: reorient every case to RAS when read (MONAI's ``Orientation('RAS')``), for datasets
            whose cases are stored in different orientations.
    """

    def __init__(self, root: str, val_cases: Optional[List[str]] = None, test_cases: Optional[List[str]] = None,
                 val_fraction: float = 0.2, image_size: Size = 96, batch_size: int = 2, eval_batch_size: int = 1,
                 train_preset: Optional[str] = 'volumes', eval_preset: Optional[str] = None, ras: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(image_size=image_size, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         train_preset=train_preset, eval_preset=eval_preset, **kwargs)
        self.root = root
        self.val_cases = list(val_cases) if val_cases is not None else None
        self.test_cases = list(test_cases) if test_cases is not None else None
        self.val_fraction = val_fraction
        self.ras = ras

    def cases(self) -> Dict[str, List[str]]:
        """The case names of each split; training is every case not held out."""
        from .data.volumes import VolumeDataset
        names = [name for name, _, _ in VolumeDataset(self.root).samples]
        val = self.val_cases
        if val is None:
            k = max(1, round(self.val_fraction * len(names)))
            val = names[-k:]
        test = self.test_cases if self.test_cases is not None else val
        train = [n for n in names if n not in set(val) | set(test)]
        if not train:
            raise ValueError(f'{self.root}: every one of its {len(names)} cases is held out; none is left to train on')
        return {'train': train, 'val': val, 'test': test}

    def build_dataset(self, split: str, transform: Optional[Preset]) -> Dataset:
        from .data.volumes import VolumeDataset
        cases = self.cases()
        if split not in cases:
            raise ValueError(f'split {split!r} is not one of {sorted(cases)}')
        return VolumeDataset(self.root, cases=cases[split], transform=transform, ras=self.ras)


class SyntheticVolumesDataModule(VolumeDataModule):
    """The embedded synthetic tumour volumes (``write_synthetic_volumes``: bright ellipsoids in noise,
    one label), ``num_cases`` of ``shape`` written once into a cache folder (``cache_dir``) or
    ``root``; the last ``num_val`` cases are held out (validation and test)."""

    def __init__(self, root: Optional[str] = None, num_cases: int = 12, num_val: int = 3,
                 shape: Tuple[int, int, int] = (32, 32, 32), spacing: Tuple[float, float, float] = (1., 1., 1.5),
                 data_seed: int = 0, min_radius: float = 0.12, max_radius: float = 0.25, **kwargs: Any) -> None:
        d, h, w = shape
        name = (f'synthetic_volumes-{num_cases}-{d}x{h}x{w}-{"x".join(str(s) for s in spacing)}'
                f'-r{min_radius}-{max_radius}-seed{data_seed}')
        val = [f'case_{i:03d}' for i in range(num_cases - num_val, num_cases)]
        super().__init__(root or cache_dir(name), val_cases=val, **kwargs)
        self.write_args = dict(num_cases=num_cases, shape=(d, h, w), spacing=tuple(spacing), seed=data_seed,
                               min_radius=min_radius, max_radius=max_radius)

    def prepare_data(self) -> None:
        from .data.volumes import write_synthetic_volumes
        _write_once(self.root, lambda tmp: write_synthetic_volumes(tmp, **self.write_args))

    def setup(self, stage: str) -> None:
        self.prepare_data()
        super().setup(stage)
