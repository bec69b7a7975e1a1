"""What the zoo holds: registered names, pretrained sources and licenses, the papers' figures."""
from dataclasses import dataclass
from typing import List, Optional, Tuple

import timm

from attnzoo.backbones import family_of

__all__ = ['ModelCard', 'list_models', 'model_card']


def list_models(pattern: str = '*', pretrained: bool = False) -> List[str]:
    """Registered zoo model names matching a glob ``pattern`` (``az_`` is implied), sorted.

    With ``pretrained=True`` the names carry their pretrained tags (``az_davit_tiny.msft_in1k``).
    """
    if not pattern.startswith('az_'):
        pattern = 'az_' + pattern
    return timm.list_models(pattern, pretrained=pretrained)


@dataclass(frozen=True)
class ModelCard:
    """One model's facts: family, default input, weight source and license, and the paper's figures."""
    name: str
    family: str
    input_size: Tuple[int, int, int]
    weights: Optional[str]
    license: Optional[str]
    paper_params: Optional[float]
    paper_gflops: Optional[float]
    paper_top1: Optional[float]
    notes: Tuple[str, ...] = ()


def model_card(name: str) -> ModelCard:
    """The card of a registered model (``az_davit_tiny`` or with a tag, ``az_davit_tiny.msft_in1k``)."""
    arch = name.split('.')[0]
    family = family_of(arch)
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise KeyError(f'no pretrained config for {name!r}')
    if cfg.hf_hub_id:
        weights = f'hf-hub:{cfg.hf_hub_id}' + (f'/{cfg.hf_hub_filename}' if cfg.hf_hub_filename else '')
    elif cfg.url:
        weights = cfg.url
    else:  # published without a direct download: the notes say where and how
        weights = 'manual download, see notes' if cfg.notes else None
    paper = family.paper_results[arch]
    return ModelCard(
        name=arch, family=family.__name__.rsplit('.', 1)[-1], input_size=tuple(cfg.input_size),
        weights=weights, license=cfg.license,
        paper_params=paper['params'], paper_gflops=paper['gflops'], paper_top1=paper['top1'],
        notes=tuple(cfg.notes or ()))
