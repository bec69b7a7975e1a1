"""The backbone families, one file each; importing this package registers every ``az_*`` model with timm."""
from . import davit, shvit
from ._helpers import (
    CheckpointMismatchError,
    CheckpointReadError,
    PretrainedWeightsNotFoundError,
)
from .davit import DaVit
from .shvit import SHViT

FAMILIES = {'davit': davit, 'shvit': shvit}

__all__ = [
    'FAMILIES', 'CheckpointMismatchError', 'CheckpointReadError', 'PretrainedWeightsNotFoundError', 'DaVit', 'SHViT',
]
