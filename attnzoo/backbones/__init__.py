"""The backbone families, one file each; importing this package registers every ``az_*`` model with timm.

Every public module here is a family file and is imported (so registered) automatically. Each
defines ``paper_results`` (the paper's figures per registered model) and ``checkpoint_filter_fn``.
"""
import importlib
import pkgutil
from types import ModuleType

from ._helpers import (
    CheckpointMismatchError,
    CheckpointReadError,
    PretrainedWeightsNotFoundError,
)
from .davit import DaVit
from .shvit import SHViT

FAMILIES = {
    info.name: importlib.import_module(f'{__name__}.{info.name}')
    for info in pkgutil.iter_modules(__path__) if not info.name.startswith('_')
}


def family_of(model_name: str) -> ModuleType:
    """The family file that registers ``model_name`` (with or without a pretrained tag)."""
    arch = model_name.split('.')[0]
    for module in FAMILIES.values():
        if arch in module.paper_results:
            return module
    raise KeyError(f'{arch!r} is not a registered attnzoo model')


__all__ = [
    'FAMILIES', 'family_of', 'CheckpointMismatchError', 'CheckpointReadError', 'PretrainedWeightsNotFoundError',
    'DaVit', 'SHViT',
]
