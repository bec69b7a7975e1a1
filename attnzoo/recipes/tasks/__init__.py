"""The recipes' LightningModules, one per problem (torchgeo's trainers are the model of shape)."""
from .base import BaseTask, EmaConfig, OptimizerConfig, SchedulerConfig
from .classification import ClassificationTask, MixupConfig

__all__ = ['BaseTask', 'ClassificationTask', 'EmaConfig', 'MixupConfig', 'OptimizerConfig', 'SchedulerConfig']
