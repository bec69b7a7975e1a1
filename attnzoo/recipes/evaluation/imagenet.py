"""ImageNet-style classification evaluation with timm's ``validate.py`` numbers.

The model, data configuration, dataset, loader and accuracy are timm's own
(``create_model``, ``resolve_data_config``, ``create_dataset``, ``create_loader``,
``timm.utils.accuracy`` averaged by ``AverageMeter``), called as ``validate.py`` calls them, so the
top-1/top-5 printed here are the ones ``validate.py`` prints for the same model, weights and folder.
What this adds: several models in one call, checkpoints in the authors' layouts for zoo models
(through the family's checkpoint filter), and clear errors where ``validate.py`` would skip bad
images or fail on a class-count mismatch deep in the loop.
"""
import fnmatch
import os
import tarfile
import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
from timm.data import RealLabelsImagenet, create_dataset, create_loader, resolve_data_config
from timm.layers import apply_test_time_pool
from timm.models import parse_model_name, split_model_name_tag
from timm.utils import AverageMeter, accuracy, random_seed, reparameterize_model
from torch.utils.data import Dataset
from tqdm import tqdm

from attnzoo.backbones import family_of
from attnzoo.backbones._helpers import check_state_dict
from attnzoo.zoo.tasks import model_state_from, read_checkpoint

from .common import ClassCountMismatchError, DatasetError, EvaluationError, unwrap_worker_error

__all__ = [
    'ClassificationResult', 'create_classifier', 'create_eval_dataset', 'evaluate_classifier',
    'expand_model_names', 'is_wildcard', 'load_classifier_checkpoint',
]

_WILDCARD = ('*', '?', '[')


def is_wildcard(name: str) -> bool:
    """Whether a model name is a pattern (``validate.py``'s bulk mode), not one model."""
    return any(c in name for c in _WILDCARD)


def expand_model_names(names: Sequence[str]) -> List[str]:
    """Model names to evaluate, in order: wildcards expand to the pretrained tags they match (as in
    ``validate.py``), ``hf-hub:``/``local-dir:`` names and registered names pass through.

    Raises EvaluationError for a name that is not a model and a wildcard that matches none.
    """
    out: List[str] = []
    for name in names:
        source, _ = parse_model_name(name)
        if source is None and is_wildcard(name):
            matched = timm.list_models(name, pretrained=True)
            if not matched:
                raise EvaluationError(f'no pretrained model matches {name!r}')
            out.extend(matched)
        elif source is None and not timm.is_model(split_model_name_tag(name)[0]):
            close = fnmatch.filter(timm.list_models(), f'*{split_model_name_tag(name)[0]}*')[:5]
            hint = f' (similar: {", ".join(close)})' if close else ''
            raise EvaluationError(f'unknown model {name!r}{hint}')
        else:
            out.append(name)
    return list(dict.fromkeys(out))


def load_classifier_checkpoint(model: nn.Module, path: str, use_ema: bool = False) -> None:
    """Load a checkpoint as ``validate.py``'s ``load_checkpoint`` does, strictly, with clear errors.

    The file may be a bare state dict, a training checkpoint (``state_dict``/``model`` keys, EMA
    weights with ``use_ema``) or a Lightning checkpoint of ``attnzoo-train`` (``model.`` keys, the
    EMA copy's ``model_ema.module.`` with ``use_ema``). For a zoo model the family's checkpoint filter
    runs first, so the authors' own layouts load too. A missing file raises FileNotFoundError, a damaged one
    CheckpointReadError, one that does not fit CheckpointMismatchError naming every key and shape.
    """
    state_dict = read_checkpoint(path, use_ema)
    state_dict = model_state_from(state_dict, model, use_ema)
    arch = getattr(model, 'pretrained_cfg', {}).get('architecture', '')
    try:
        family = family_of(arch)
    except KeyError:
        family = None
    if family is not None:
        state_dict = family.checkpoint_filter_fn(state_dict, model)
    # the filters let a classifier of another size through (pretrained weights may get a new head);
    # an evaluation needs every tensor, the head included
    check_state_dict(state_dict, model, source=f'checkpoint {path}')
    model.load_state_dict(state_dict)


def create_classifier(
        name: str,
        pretrained: bool = False,
        checkpoint: Optional[str] = None,
        num_classes: Optional[int] = None,
        in_chans: Optional[int] = None,
        use_ema: bool = False,
        **model_kwargs: Any,
) -> nn.Module:
    """``timm.create_model`` as ``validate.py`` calls it, then the checkpoint, if any, loaded strictly."""
    model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans,
                              **model_kwargs)
    if checkpoint:
        load_classifier_checkpoint(model, checkpoint, use_ema=use_ema)
    return model


class _StrictImages(Dataset):
    """A timm ImageDataset that raises on an unreadable image instead of silently using the next one.

    timm's dataset logs a warning and substitutes the following sample, which counts that sample
    twice and gives a number no one can reproduce; one retry (timm's ``_max_retries``) turns the
    substitution into an error, which this wrapper words with the file's name.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        dataset._max_retries = 1

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        try:
            return self.dataset[index]
        except RuntimeError as e:
            raise DatasetError(
                f'cannot read image {self.dataset.filename(index, absolute=True)}: not an image or damaged') from e

    def __getattr__(self, name: str) -> Any:
        # timm's loader reads ``transform`` and friends off the dataset it is handed
        if name == 'dataset':
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == 'dataset':
            object.__setattr__(self, name, value)
        else:
            setattr(self.dataset, name, value)


def create_eval_dataset(
        root: str,
        split: str = 'validation',
        class_map: str = '',
        input_img_mode: str = 'RGB',
) -> Dataset:
    """timm's folder-or-tar dataset of ``root`` (an ImageNet-layout folder, its parent with a
    ``val``/``validation`` subfolder, or a ``.tar``), checked: DatasetError if it is missing, is
    not a folder or a tar, or holds no images."""
    if not os.path.exists(root):
        raise DatasetError(f'dataset {root} does not exist')
    if os.path.isfile(root):
        if os.path.splitext(root)[1] != '.tar':
            raise DatasetError(f'dataset {root} is a file but not a .tar; give an ImageNet-layout folder or a tar')
        if not tarfile.is_tarfile(root):
            raise DatasetError(f'dataset {root} is not a readable tar file')
    if class_map and not os.path.isfile(class_map) and not os.path.isfile(os.path.join(root, class_map)):
        raise DatasetError(f'class map {class_map} does not exist')
    no_images = (f'no images in {root}: expected an ImageNet-layout folder (one subfolder of images per class) '
                 'or a tar of one')
    try:
        dataset = create_dataset('', root=root, split=split, class_map=class_map, input_img_mode=input_img_mode)
    except (OSError, RuntimeError, AssertionError, ValueError, tarfile.TarError) as e:
        # timm's folder reader refuses an empty folder ("Found 0 images"), its tar reader fails to unpack none
        if 'Found 0 images' in str(e) or (os.path.isfile(root) and not _tar_has_files(root)):
            raise DatasetError(no_images) from e
        raise DatasetError(f'cannot read dataset {root}: {e}') from e
    if len(dataset) == 0:
        raise DatasetError(no_images)
    return _StrictImages(dataset)


def _tar_has_files(path: str) -> bool:
    with tarfile.open(path) as tf:
        return any(member.isfile() for member in tf)


def _empty_class_folders(dataset: Dataset, class_to_idx: Dict[str, int]) -> List[str]:
    """Subfolders of a folder dataset's class level that its reader found no image in."""
    folder = Path(getattr(dataset.reader, 'root', ''))
    if not folder.is_dir():  # a tar
        return []
    return sorted(child.name for child in folder.iterdir()
                  if child.is_dir() and not child.name.startswith('.') and child.name not in class_to_idx)


def _check_classes(dataset: Dataset, model: nn.Module, name: str, root: str, class_map: str,
                   labels_subset: Optional[List[int]] = None) -> None:
    num_classes = getattr(model, 'num_classes', None)
    if not num_classes:
        raise ClassCountMismatchError(f'{name} has no classifier (num_classes={num_classes}); it cannot be evaluated')
    # timm's folder reader calls it class_to_idx, its tar reader class_name_to_idx
    class_to_idx = getattr(dataset.reader, 'class_to_idx', None) or getattr(dataset.reader, 'class_name_to_idx', {})
    if labels_subset is not None:
        # the scored outputs are the subset's, in the folder's class order
        if any(not 0 <= i < num_classes for i in labels_subset):
            raise ClassCountMismatchError(f'valid labels reach outside the {num_classes} classes {name} predicts')
        num_classes = len(labels_subset)
    if class_map:
        # a class map may name more classes than the folder holds (a subset of ImageNet): only its
        # indices have to be within the model's outputs
        top = max(class_to_idx.values()) + 1
        if top > num_classes:
            raise ClassCountMismatchError(
                f'class map {class_map} uses indices up to {top - 1}, but {name} predicts {num_classes} classes')
    elif len(class_to_idx) != num_classes:
        # timm's reader skips a class folder without images, which shifts every later class's index
        empty = _empty_class_folders(dataset, class_to_idx)
        if empty:
            raise DatasetError(f'{root}: class folders without images: {", ".join(empty[:5])}; every class folder '
                               'needs its images, or the classes after an empty one get the wrong indices')
        raise ClassCountMismatchError(
            f'{root} has {len(class_to_idx)} classes (subfolders) but {name} predicts {num_classes}: pass '
            f'--class-map FILE to map folder names to the model\'s class indices, or --num-classes '
            f'{len(class_to_idx)} with a --checkpoint trained on these classes')


@dataclass
class ClassificationResult:
    """One model's evaluation: ``validate.py``'s result columns plus the images seen and the rate."""
    model: str
    top1: float
    top5: float
    param_count: float
    img_size: int
    crop_pct: float
    interpolation: str
    images: int
    images_per_sec: float
    checkpoint: Optional[str] = None
    data_config: Dict[str, Any] = field(default_factory=dict)

    @property
    def top1_err(self) -> float:
        return round(100 - self.top1, 4)

    @property
    def top5_err(self) -> float:
        return round(100 - self.top5, 4)

    def validate_row(self) -> 'OrderedDict[str, Any]':
        """The row ``validate.py`` writes for a model, same columns in the same order (its
        ``checkpoint`` column belongs to its folder-of-checkpoints mode, which this has not)."""
        return OrderedDict(
            model=self.model, top1=self.top1, top1_err=self.top1_err, top5=self.top5, top5_err=self.top5_err,
            param_count=self.param_count, img_size=self.img_size, crop_pct=self.crop_pct,
            interpolation=self.interpolation)


def evaluate_classifier(
        name: str,
        root: str,
        *,
        pretrained: Optional[bool] = None,
        checkpoint: Optional[str] = None,
        use_ema: bool = False,
        num_classes: Optional[int] = None,
        data_args: Optional[Dict[str, Any]] = None,
        use_train_size: bool = False,
        split: str = 'validation',
        class_map: str = '',
        batch_size: int = 256,
        workers: int = 4,
        device: Union[str, torch.device, None] = None,
        amp: bool = False,
        amp_dtype: str = 'float16',
        channels_last: bool = False,
        prefetcher: bool = True,
        pin_memory: bool = False,
        progress: bool = True,
        seed: int = 42,
        in_chans: Optional[int] = None,
        global_pool: Optional[str] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        reparam: bool = False,
        test_pool: bool = False,
        crop_border_pixels: Optional[int] = None,
        valid_labels: str = '',
        real_labels: str = '',
) -> ClassificationResult:
    """Evaluate classifier ``name`` on the images under ``root`` as timm's ``validate.py`` does.

    ``pretrained`` defaults to ``validate.py``'s rule: the published weights unless a ``checkpoint``
    is given. ``data_args`` are ``validate.py``'s data flags as a dict (``img_size``, ``input_size``
    (C, H, W), ``crop_pct``, ``crop_mode``, ``interpolation``, ``mean``, ``std``), resolved against the
    model's pretrained_cfg by ``timm.data.resolve_data_config``. Images are (B, C, H, W) float tensors
    normalised by the loader (timm's prefetcher, or the transform with ``prefetcher=False``). The
    random generators are seeded with ``seed`` before the model is built, as ``validate.py`` does
    (a head built anew for ``num_classes`` is then the same from run to run).

    ``validate.py``'s model and scoring options: ``in_chans``, ``global_pool`` and ``model_kwargs``
    go to ``timm.create_model``; ``reparam`` fuses the model (``reparameterize_model``);
    ``test_pool`` applies timm's test-time pooling where the input is larger than the model's
    (crop 1.0 then); ``crop_border_pixels`` goes to the loader; ``valid_labels`` is a file of the
    output indices to score, one per line, in the folder's class order (a subset of the model's
    classes); ``real_labels`` is ImageNet-ReaL's ``real.json``, whose top-1/top-5 then replace the
    folder labels' (the file names must be ImageNet's validation names).

    Raises DatasetError, ClassCountMismatchError, CheckpointMismatchError, CheckpointReadError,
    PretrainedWeightsNotFoundError or FileNotFoundError with a message that says what to fix.
    """
    data_args = {k: v for k, v in (data_args or {}).items() if v is not None and v != ''}
    if pretrained is None:
        pretrained = not checkpoint
    if amp and amp_dtype not in ('float16', 'bfloat16'):
        raise ValueError(f'amp dtype must be float16 or bfloat16, got {amp_dtype!r}')
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if in_chans is None:
        in_chans = data_args['input_size'][0] if data_args.get('input_size') else None
    labels_subset = None
    if valid_labels:
        try:
            labels_subset = [int(line) for line in Path(valid_labels).read_text().split()]
        except FileNotFoundError:
            raise DatasetError(f'valid labels file {valid_labels} does not exist') from None
        except ValueError as e:
            raise DatasetError(f'valid labels file {valid_labels} must hold one class index per line: {e}') from None

    # the dataset first: a wrong path should not cost a model download
    dataset = create_eval_dataset(root, split=split, class_map=class_map,
                                  input_img_mode='RGB' if (in_chans or 3) == 3 else 'L')
    random_seed(seed)
    extra = dict(model_kwargs or {}, **({'global_pool': global_pool} if global_pool is not None else {}))
    model = create_classifier(name, pretrained=pretrained, checkpoint=checkpoint, num_classes=num_classes,
                              in_chans=in_chans, use_ema=use_ema, **extra)
    if reparam:
        model = reparameterize_model(model)
    _check_classes(dataset, model, name, root, class_map, labels_subset)
    param_count = sum(p.numel() for p in model.parameters())
    data_config = resolve_data_config(data_args, model=model, use_test_size=not use_train_size)
    test_time_pool = False
    if test_pool:
        model, test_time_pool = apply_test_time_pool(model, data_config)
    crop_pct = 1.0 if test_time_pool else data_config['crop_pct']
    real = None
    if real_labels:
        if not os.path.isfile(real_labels):
            raise DatasetError(f'ImageNet-ReaL labels file {real_labels} does not exist')
        real = RealLabelsImagenet(dataset.filenames(basename=True), real_json=real_labels)

    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    autocast = (torch.autocast(device_type=device.type, dtype=getattr(torch, amp_dtype)) if amp
                else nullcontext())
    loader = create_loader(
        dataset, input_size=data_config['input_size'], batch_size=batch_size, use_prefetcher=prefetcher,
        interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
        num_workers=workers, crop_pct=crop_pct, crop_mode=data_config['crop_mode'],
        crop_border_pixels=crop_border_pixels, pin_memory=pin_memory, device=device)

    top1, top5 = AverageMeter(), AverageMeter()
    with torch.inference_mode():
        # one warm-up batch, as validate.py runs, so the rate measures steady state
        warm = torch.randn((min(batch_size, len(dataset)),) + tuple(data_config['input_size']), device=device)
        if channels_last:
            warm = warm.contiguous(memory_format=torch.channels_last)
        with autocast:
            model(warm)
        start = time.perf_counter()
        bar = tqdm(loader, desc=name, unit='batch', disable=not progress, leave=False)
        try:
            for images, target in bar:
                if not prefetcher:
                    images, target = images.to(device), target.to(device)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with autocast:
                    output = model(images)
                    if labels_subset is not None:
                        output = output[:, labels_subset]
                if real is not None:
                    real.add_result(output)
                # accuracy and its running mean exactly as validate.py computes them (per batch in
                # float32, averaged weighted by batch size), so the rounded numbers agree to the digit
                acc1, acc5 = accuracy(output.detach(), target, topk=(1, 5))
                top1.update(acc1.item(), output.shape[0])
                top5.update(acc5.item(), output.shape[0])
                bar.set_postfix(top1=f'{top1.avg:.2f}', top5=f'{top5.avg:.2f}')
        except DatasetError as e:
            raise DatasetError(unwrap_worker_error(e)) from None
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start

    # ImageNet-ReaL's accuracies replace the folder labels', as in validate.py
    acc1, acc5 = (real.get_accuracy(k=1), real.get_accuracy(k=5)) if real is not None else (top1.avg, top5.avg)
    return ClassificationResult(
        model=name, top1=round(acc1, 4), top5=round(acc5, 4), param_count=round(param_count / 1e6, 2),
        img_size=data_config['input_size'][-1], crop_pct=crop_pct,
        interpolation=data_config['interpolation'], images=top1.count,
        images_per_sec=top1.count / elapsed if elapsed > 0 else float('nan'),
        checkpoint=checkpoint or None, data_config=dict(data_config))
