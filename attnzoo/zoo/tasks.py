"""Rebuild any task model (segmentation, detection, medical) from the arguments it carries.

Every model the task builders return carries ``model.attnzoo_cfg``: the JSON-serialisable arguments
that rebuild it, ``{'task': ..., 'arch': ..., 'backbone': ..., 'num_classes': ..., ...}``, without its
weights. The Hub's ``config.json`` of a task model stores this dict; ``create_task_model`` turns it
back into the model.
"""
import importlib
import os
from typing import Any, Callable, Dict, Mapping

import torch.nn as nn
from timm.models import load_state_dict

from attnzoo.backbones._helpers import check_state_dict, raise_read_failure

__all__ = ['TASK_BUILDERS', 'create_task_model', 'load_task_checkpoint', 'model_state_from', 'read_checkpoint']

# task -> (module under attnzoo.zoo, builder); imported on use, since the dense builders pull in
# smp/torchvision detection pieces that ``import attnzoo`` must not load
TASK_BUILDERS: Dict[str, str] = {
    'segmentation': 'segmentation:create_segmentation_model',
    'detection': 'detection:create_detection_model',
    'medical': 'medical:create_medical_model',
}

# never part of a rebuild: weights travel separately (a stray one would download or load twice)
_WEIGHT_ARGS = ('pretrained', 'pretrained_backbone', 'checkpoint', 'checkpoint_path')


def _builder(task: str) -> Callable[..., nn.Module]:
    try:
        module, fn = TASK_BUILDERS[task].split(':')
    except KeyError:
        raise ValueError(f'unknown task {task!r} in attnzoo_cfg; known tasks: {", ".join(TASK_BUILDERS)}') from None
    return getattr(importlib.import_module(f'attnzoo.zoo.{module}'), fn)


def create_task_model(cfg: Mapping[str, Any]) -> nn.Module:
    """The task model described by ``cfg`` (a model's ``attnzoo_cfg``), randomly initialised.

    Dispatches on ``cfg['task']`` to ``create_segmentation_model``, ``create_detection_model`` or
    ``create_medical_model`` with every other entry as a keyword argument. The backbone is built
    without pretrained weights: the caller loads the whole model's weights afterwards.
    """
    if 'task' not in cfg:
        raise ValueError(f'attnzoo_cfg has no "task" entry (one of {", ".join(TASK_BUILDERS)}): {dict(cfg)}')
    kwargs = {k: v for k, v in cfg.items() if k != 'task' and k not in _WEIGHT_ARGS}
    return _builder(cfg['task'])(**kwargs)


# where a training checkpoint keeps the model: at the top (a bare state dict) or under the attribute
# of the module that trained it (the recipes' LightningModules hold it as ``model`` and its EMA copy
# as ``model_ema.module``)
_CHECKPOINT_PREFIXES = ('', 'model.', 'net.', 'module.')
_EMA_PREFIXES = ('model_ema.module.', 'model_ema.', 'ema.')


def model_state_from(state_dict: Mapping[str, Any], model: nn.Module, use_ema: bool = False) -> Dict[str, Any]:
    """The entries of a training checkpoint's state dict that are ``model``'s: the whole dict when its
    keys are the model's, else those under the first prefix (``model.``, ``net.``, ``module.``; with
    ``use_ema`` the EMA copy's, ``model_ema.module.``) that holds every key of the model, prefix
    stripped. Where no prefix fits, the dict comes back unchanged for the caller's checks to explain."""
    expected = set(model.state_dict())
    for prefix in _EMA_PREFIXES if use_ema else _CHECKPOINT_PREFIXES:
        found = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if expected <= set(found):
            # the model's own entries; a training module's others (losses, metrics, EMA) stay behind
            return {k: v for k, v in found.items() if k in expected} if prefix else found
    return dict(state_dict)


def read_checkpoint(path: str, use_ema: bool = False) -> Dict[str, Any]:
    """The state dict in the file ``path`` as timm's ``load_state_dict`` reads it (a bare state dict,
    or under ``state_dict``/``model``, EMA weights with ``use_ema``; ``module.`` prefixes removed).
    Missing file: FileNotFoundError; damaged or not a checkpoint: CheckpointReadError."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint {path} does not exist')
    try:
        return load_state_dict(path, use_ema=use_ema)
    except Exception as e:
        raise_read_failure(e, f'checkpoint {path}', 'save its state dict alone')
        raise


def load_task_checkpoint(model: nn.Module, path: str, use_ema: bool = False) -> None:
    """Load a trained task model's weights strictly from ``path``: a state dict, a training checkpoint
    (``state_dict``/``model`` keys) or a Lightning checkpoint of the recipes (``model.`` keys, the EMA
    copy with ``use_ema``). Missing file: FileNotFoundError; damaged: CheckpointReadError; weights
    that do not fit: CheckpointMismatchError naming every key and shape that differs."""
    state_dict = model_state_from(read_checkpoint(path, use_ema), model, use_ema)
    check_state_dict(state_dict, model, source=f'checkpoint {path}')
    model.load_state_dict(state_dict)
