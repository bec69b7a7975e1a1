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

from .sampling import EvalSampler, SeededDataset, TrainSampler
from .transforms import Preset, create_transform

__all__ = ['BaseDataModule', 'DigitsDataModule', 'ImageFolderDataModule']

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
        sampler = TrainSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.run_seed)
        if self.trainer is not None:  # a resumed run's epoch: Lightning sets it later, after workers have started
            sampler.set_epoch(self.trainer.current_epoch)
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
