"""What the three Agent Attention family files share: their pretrained configuration, and fitting
checkpoints stored at another training size or agent count to the model."""
import math
from typing import Any, Callable, Dict, Mapping, Tuple

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed

from attnzoo.blocks.agent import resize_agent_bias

__all__ = ['agent_cfg', 'resize_pos_embed', 'resize_to_model']

_TSINGHUA = 'https://cloud.tsinghua.edu.cn/f/{}/?dl=1'


def agent_cfg(file_id: str, file_name: str, model_name: str, **kwargs) -> Dict[str, Any]:
    """A pretrained cfg for weights the authors publish on Tsinghua Cloud under ``file_id``.

    Their links carry no file name, so timm cannot cache them: the cfg has no URL and its notes say
    where the file is and how to convert it. The repository has no LICENSE file and states no
    license for code or weights.
    """
    link = _TSINGHUA.format(file_id)
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        # the authors evaluate on a 256x256 resize (aspect not kept) centre-cropped to 224
        'crop_pct': 0.875, 'crop_mode': 'squash', 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head',
        'license': 'unknown', 'paper_ids': 'arXiv:2312.08874',
        'paper_name': 'Agent Attention: On the Integration of Softmax and Linear Attention',
        'origin_url': 'https://github.com/LeapLabTHU/Agent-Attention',
        'notes': (
            f'The authors publish {file_name} on Tsinghua Cloud ({link}), a link without a file name that '
            f'timm cannot download into its cache.',
            f'Download it, then run: python scripts/convert_checkpoint.py {model_name} {file_name} '
            f'{model_name}.safetensors',
        ),
        **kwargs,
    }


def resize_pos_embed(value: torch.Tensor, shape: Tuple[int, ...], num_prefix_tokens: int = 0) -> torch.Tensor:
    """A stored ``(1, P + h*h, C)`` position embedding resized to ``shape`` (``P`` prefix tokens kept,
    the grid square too), bilinearly and without antialiasing: the interpolation the models apply in
    their forward pass at other sizes, so a checkpoint resized once gives the same outputs."""
    old, new = (math.isqrt(n - num_prefix_tokens) for n in (value.shape[1], shape[1]))
    if old * old + num_prefix_tokens != value.shape[1] or new * new + num_prefix_tokens != shape[1]:
        raise ValueError(f'cannot resize a position embedding of shape {tuple(value.shape)} to {tuple(shape)}')
    return resample_abs_pos_embed(
        value, [new, new], [old, old], num_prefix_tokens=num_prefix_tokens, interpolation='bilinear', antialias=False)


def resize_to_model(
        state_dict: Dict[str, torch.Tensor],
        model: nn.Module,
        resizers: Mapping[str, Callable[[torch.Tensor, Tuple[int, ...]], torch.Tensor]],
) -> Dict[str, torch.Tensor]:
    """Resize, in place, every tensor whose shape differs from the model's: agent attention biases,
    and the family's other grids by parameter name (a key's last part) through ``resizers``. Anything
    else that differs is left for ``check_state_dict`` to name."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    for k, v in state_dict.items():
        if k not in expected or tuple(v.shape) == tuple(expected[k]):
            continue
        name = k.rsplit('.', 1)[-1]
        try:
            if name in resizers:
                state_dict[k] = resizers[name](v, tuple(expected[k]))
            elif name.endswith('_bias') and '.attn.' in k:
                state_dict[k] = resize_agent_bias(k, v, tuple(expected[k]))
        except ValueError:
            # not a grid at another size (another variant's head count): a mismatch, which
            # check_state_dict names with all the others
            continue
    return state_dict
