"""Task models rebuilt from their arguments, and the model's part of a training checkpoint."""
import pytest
import torch

from attnzoo.zoo import create_task_model
from attnzoo.zoo.tasks import model_state_from


def test_model_state_from_takes_the_model_or_its_ema_copy():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    sd = model.state_dict()
    lightning = {**{f'model.{k}': v for k, v in sd.items()}, **{f'model_ema.module.{k}': v + 1 for k, v in sd.items()},
                 'criterion.weight': torch.ones(2)}
    assert model_state_from(sd, model) == sd
    assert model_state_from(lightning, model).keys() == sd.keys()
    assert all(torch.equal(model_state_from(lightning, model)[k], v) for k, v in sd.items())
    assert all(torch.equal(model_state_from(lightning, model, use_ema=True)[k], v + 1) for k, v in sd.items())
    other = {'0.weight': torch.zeros(5, 5)}  # no prefix fits: handed back for the caller's checks to explain
    assert model_state_from(other, model) == other


def test_create_task_model_names_what_it_cannot_build():
    with pytest.raises(ValueError, match='no "task" entry'):
        create_task_model({'arch': 'upernet'})
    with pytest.raises(ValueError, match="unknown task 'depth'"):
        create_task_model({'task': 'depth', 'arch': 'dpt'})
