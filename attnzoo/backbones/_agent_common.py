"""What the three Agent Attention family files share: their pretrained configuration."""
from typing import Any, Dict

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

__all__ = ['agent_cfg']

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
