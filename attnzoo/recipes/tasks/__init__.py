"""The recipes' LightningModules, one per problem (torchgeo's trainers are the model of shape)."""
from .base import BaseTask, EmaConfig, OptimizerConfig, SchedulerConfig
from .classification import ClassificationTask, MixupConfig
from .detection import DetectionTask
from .medical import MedicalSegmentationTask
from .segmentation import SegmentationTask

__all__ = [
    'BaseTask', 'ClassificationTask', 'DetectionTask', 'EmaConfig', 'MedicalSegmentationTask', 'MixupConfig',
    'OptimizerConfig', 'SchedulerConfig', 'SegmentationTask',
]
