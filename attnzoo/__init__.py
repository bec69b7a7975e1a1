"""attnzoo: attention vision backbones as timm models, with fused kernels and a CPU reference.

``import attnzoo`` registers every ``az_*`` model with timm::

    import attnzoo, timm
    model = timm.create_model('az_davit_tiny', pretrained=True)
"""
from . import backbones, kernels, zoo
from .backbones import CheckpointMismatchError, CheckpointReadError, PretrainedWeightsNotFoundError
from .kernels import use_kernels
from .zoo import list_models, model_card

__version__ = '0.1.0'

__all__ = [
    '__version__', 'backbones', 'kernels', 'zoo', 'list_models', 'model_card', 'use_kernels',
    'CheckpointMismatchError', 'CheckpointReadError', 'PretrainedWeightsNotFoundError',
]
