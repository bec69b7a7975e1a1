"""The catalogue: every registered ``az_*`` model, where its weights come from, what its paper reports;
Hub I/O (save, push, load with model cards), the task builders and the rebuild of task models from
their arguments."""
from .catalogue import ModelCard, list_models, model_card
from .dense import create_dense_backbone
from .detection import create_detection_model
from .hub import eval_results_from, from_pretrained, make_model_card, push_to_hub, save_pretrained
from .medical import create_medical_model
from .segmentation import create_segmentation_model
from .tasks import create_task_model

__all__ = [
    'ModelCard', 'list_models', 'model_card',
    'create_task_model', 'eval_results_from', 'from_pretrained', 'make_model_card', 'push_to_hub', 'save_pretrained',
    'create_dense_backbone', 'create_detection_model', 'create_medical_model', 'create_segmentation_model',
]
