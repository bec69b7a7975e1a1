"""The catalogue: every registered ``az_*`` model, where its weights come from, what its paper reports."""
from .catalogue import ModelCard, list_models, model_card

__all__ = ['ModelCard', 'list_models', 'model_card']
