"""The papers' dense settings by name, and the dense backbone built with them.

Every family's paper reports segmentation and detection results with a backbone built slightly
differently from the classification one: DiNAT dilates its blocks to the larger maps, NAT, DiNAT,
DaViT, LITv2 and Agent-Swin normalise every stage output, Agent-Swin and Agent-PVT pool more agents,
SHViT (strides 16, 32, 64) reaches stride 4 through a neck with transposed convs. ``DENSE_SETTINGS``
holds those settings as the official dense code and configs state them, each naming its config file,
and ``create_dense_backbone`` builds any zoo backbone (or timm model) as a list of NCHW maps at
strides 4, 8, 16 and 32, the input that the segmentation, detection and medical heads share::

    from attnzoo.zoo import create_dense_backbone
    backbone = create_dense_backbone('az_dinat_tiny', dense_cfg='upernet', pretrained=True)
    features = backbone(images)        # [(B, 64, H/4, W/4), (B, 128, H/8, W/8), ...]
    backbone.out_channels, backbone.strides, backbone.min_input_size

The settings change no parameter of the classification model (they add output norms, which start at
weight one and bias zero as in the official code), so ``pretrained=True`` loads the ImageNet weights.
Plain ViTs (Agent-DeiT, stride 16) go through ViTDet's simple feature pyramid, which no official
code of the family fixes.
"""
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn

from attnzoo.blocks.dense import FPN, SimpleFeaturePyramid

__all__ = ['DenseSetting', 'DENSE_SETTINGS', 'DenseBackbone', 'create_dense_backbone', 'resolve_dense_setting']

_NAT_REPO = 'SHI-Labs/Neighborhood-Attention-Transformer'
_AGENT_REPO = 'LeapLabTHU/Agent-Attention'
_VAN_REPO = 'Visual-Attention-Network/VAN-Segmentation'
_AGENT_SWIN_SHAPES = ((9, 9), (12, 12), (14, 14), (7, 7))
_AGENT_PVT_SHAPES = ((12, 12), (16, 16), (28, 28), (28, 28))


@dataclass(frozen=True)
class DenseSetting:
    """One official dense setting of a family.

    ``config``: the official config file (``owner/repo: path``, ``{v}`` the variant), None where the
    family has no dense code, and ``config_variants`` the variants whose file is named otherwise;
    ``kwargs``: the backbone constructor arguments it sets for every
    variant; ``drop_path_rate``: the stochastic depth each variant's config states; ``neck``: the
    neck that brings the family to strides 4-32 (``'shvit_fpn'``, ``'simple_fpn'``); ``norm_eval``:
    the backbone's batch norms stay in eval mode while training, as that code's ``train()`` keeps them.
    """
    config: Optional[str]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    drop_path_rate: Mapping[str, float] = field(default_factory=dict)
    neck: Optional[str] = None
    norm_eval: bool = False
    config_variants: Mapping[str, str] = field(default_factory=dict)

    def config_file(self, variant: str) -> Optional[str]:
        """The official config file of ``variant``, None without official dense code."""
        if self.config is None:
            return None
        return self.config.replace('{v}', variant) if variant not in self.config_variants else \
            self.config.split(': ')[0] + ': ' + self.config_variants[variant]


def _nat(config: str, dpr: Mapping[str, float], variants: Optional[Mapping[str, str]] = None, **kwargs) -> DenseSetting:
    return DenseSetting(f'{_NAT_REPO}: {config}', dict(out_norms=True, **kwargs), dpr, config_variants=variants or {})


# Per family, the settings of its official dense code by name. A name a family lacks falls back to
# its `default` entry (the setting its dense code shares across tasks); `None` means the
# classification settings, with the neck a family needs for strides 4-32.
DENSE_SETTINGS: Dict[str, Dict[str, DenseSetting]] = {
    'nat': {
        'upernet': _nat('segmentation/configs/nat/upernet_nat_{v}_512x512_160k_ade20k.py',
                        dict(mini=.2, tiny=.3, small=.5, base=.5)),
        'maskrcnn': _nat('detection/configs/nat/mask_rcnn_nat_{v}_3x_coco.py', dict(mini=.2, tiny=.2, small=.35)),
        'cascade_maskrcnn': _nat('detection/configs/nat/cascade_mask_rcnn_nat_{v}_3x_coco.py',
                                 dict(mini=.2, tiny=.3, small=.3, base=.5)),
    },
    'dinat': {
        # dilations: attnzoo.backbones.nat.DINAT_DILATIONS, copied from these configs
        'upernet': _nat('segmentation/configs/dinat/upernet_dinat_{v}_512x512_160k_ade20k.py',
                        dict(mini=.2, tiny=.3, small=.5, base=.5, large=.3), dilations='upernet',
                        variants=dict(large='segmentation/configs/dinat/upernet_dinat_large_640x640_160k_ade20k.py')),
        'maskrcnn': _nat('detection/configs/dinat/mask_rcnn_dinat_{v}_3x_coco.py', dict(mini=.2, tiny=.2, small=.35),
                         dilations='maskrcnn'),
        'cascade_maskrcnn': _nat('detection/configs/dinat/cascade_mask_rcnn_dinat_{v}_3x_coco.py',
                                 dict(mini=.2, tiny=.3, small=.5, base=.6, large=.6), dilations='maskrcnn'),
    },
    'davit': {
        # the repository configures DaViT-T only; its backbone code adds norm0..norm3
        'upernet': DenseSetting('dingmyu/davit: mmseg/configs/upernet_davit_512x512_160k_ade20k.py',
                                dict(out_norms=True), dict(tiny=.3)),
        'maskrcnn': DenseSetting('dingmyu/davit: mmdet/configs/davit_maskrcnn_1x_coco.py',
                                 dict(out_norms=True), dict(tiny=.1)),
        'retinanet': DenseSetting('dingmyu/davit: mmdet/configs/davit_retinanet_1x_coco.py',
                                  dict(out_norms=True), dict(tiny=.1)),
    },
    'litv2': {
        # local_ws [0, 0, 2, 1]: the HiLo windows of stages 3-4 (stages 1-2 have no attention)
        'fpn': DenseSetting('ziplab/LITv2: segmentation/configs/litv2/litv2_{v}_fpn_r50_512x512_80k_ade20k.py',
                            dict(out_norms=True, window_sizes=(None, None, 2, 1)), dict(s=.2, m=.2, b=.3)),
        'retinanet': DenseSetting('ziplab/LITv2: detection/configs/litv2/retinanet_litv2_{v}_fpn_1x_coco.py',
                                  dict(out_norms=True, window_sizes=(None, None, 2, 1)), dict(s=.2, m=.2, b=.3)),
        'maskrcnn': DenseSetting('ziplab/LITv2: detection/configs/litv2/mask_rcnn_litv2_{v}_fpn_1x_coco.py',
                                 dict(out_norms=True, window_sizes=(None, None, 2, 1)), dict(s=.2, m=.2, b=.3)),
        # the authors' variants with 4x4 Hi-Fi windows in stage 3 (local_ws [0, 0, 4, 1])
        'retinanet_ws4': DenseSetting(
            'ziplab/LITv2: detection/configs/litv2/retinanet_litv2_{v}_fpn_1x_coco_ws_4.py',
            dict(out_norms=True, window_sizes=(None, None, 4, 1)), dict(s=.2, m=.2, b=.3)),
        'maskrcnn_ws4': DenseSetting(
            'ziplab/LITv2: detection/configs/litv2/mask_rcnn_litv2_{v}_fpn_1x_coco_ws_4.py',
            dict(out_norms=True, window_sizes=(None, None, 4, 1)), dict(s=.2, m=.2, b=.3)),
    },
    'van': {
        # VAN's stages end in their own LayerNorms already; the dense code's (van.py) have nn.LayerNorm's
        # eps 1e-5 where the classification code's have 1e-6
        'upernet': DenseSetting(
            f'{_VAN_REPO}: configs/upernet/1k_pretrained/upernet_van_{{v}}_512x512_160k_ade20k.py',
            dict(norm_eps=1e-5), dict(b0=.1, b1=.1, b2=.1, b3=.3)),
        'fpn': DenseSetting(f'{_VAN_REPO}: configs/sem_fpn/fpn_van_{{v}}_ade20k_40k.py', dict(norm_eps=1e-5),
                            dict(b0=.2, b1=.2, b2=.2, b3=.3)),
    },
    'shvit': {
        # EfficientViTFPN with two transposed-conv levels (strides 4, 8) below the three stages; BN frozen
        'maskrcnn': DenseSetting('ysj9909/SHViT: downstream/configs/mask_rcnn_shvit_s4_fpn_1x_coco.py',
                                 neck='shvit_fpn', norm_eval=True),
    },
    'stvit': {
        # the paper reports dense results, but no dense code was published: the classification backbone
        'default': DenseSetting(None),
    },
    'agent_swin': {
        # global agent attention in the A blocks (window 56) with 9x9, 12x12, 14x14, 7x7 agents; Swin
        # blocks pad small maps instead of shrinking their window; norm0..norm3
        'upernet': DenseSetting(
            f'{_AGENT_REPO}: downstream/segmentation/configs/agent_swin/upernet_agent_swin_{{v}}_9-12-14-7.py',
            dict(out_norms=True, clamp_window=False, downstream_agent_shapes=_AGENT_SWIN_SHAPES),
            dict(t=.3, s=.3, b=.5)),
        'maskrcnn': DenseSetting(
            f'{_AGENT_REPO}: downstream/detection/configs/agent_swin/agent_swin_{{v}}_mrcnn_1x_9-12-14-7.py',
            dict(out_norms=True, clamp_window=False, downstream_agent_shapes=_AGENT_SWIN_SHAPES), dict(t=.1, s=.1)),
        'cascade_maskrcnn': DenseSetting(
            f'{_AGENT_REPO}: downstream/detection/configs/agent_swin/agent_swin_{{v}}_crcnn_1x_9-12-14-7.py',
            dict(out_norms=True, clamp_window=False, downstream_agent_shapes=_AGENT_SWIN_SHAPES),
            dict(t=.1, s=.1, b=.4), config_variants={
                v: f'downstream/detection/configs/agent_swin/agent_swin_{v}_crcnn_3x_9-12-14-7.py' for v in 'sb'}),
    },
    'agent_pvt': {
        # every block agent attention over the whole map with 12x12, 16x16, 28x28, 28x28 agents
        'fpn': DenseSetting(
            f'{_AGENT_REPO}: downstream/segmentation/configs/agent_pvt/fpn_agent_pvt_{{v}}_12-16-28-28.py',
            dict(downstream_agent_shapes=_AGENT_PVT_SHAPES), dict(t=.1, s=.1, m=.2, l=.1)),
        'retinanet': DenseSetting(
            f'{_AGENT_REPO}: downstream/detection/configs/agent_pvt/agent_pvt_{{v}}_rtn_1x_12-16-28-28.py',
            dict(downstream_agent_shapes=_AGENT_PVT_SHAPES), dict(t=.1, s=.1, m=.2, l=.3)),
        'maskrcnn': DenseSetting(
            f'{_AGENT_REPO}: downstream/detection/configs/agent_pvt/agent_pvt_{{v}}_mrcnn_1x_12-16-28-28.py',
            dict(downstream_agent_shapes=_AGENT_PVT_SHAPES), dict(t=.1, s=.2, m=.1, l=.2)),
    },
    'agent_deit': {
        # no official dense code: ViTDet's simple feature pyramid over the last block
        'default': DenseSetting(None, neck='simple_fpn'),
    },
}

# The setting a family uses for a task name it has no config for (its settings agree but for stochastic depth).
_DEFAULT = dict(nat='upernet', dinat='upernet', davit='upernet', litv2='fpn', van='upernet', shvit='maskrcnn',
                stvit='default', agent_swin='upernet', agent_pvt='fpn', agent_deit='default')
# Families that need a neck even with the classification settings.
_CLASSIFICATION = dict(shvit=DenseSetting(None, neck='shvit_fpn'), agent_deit=DenseSetting(None, neck='simple_fpn'))
_ZOO_NAME = re.compile(r'^az_(agent_swin|agent_pvt|agent_deit|nat|dinat|davit|litv2|van|shvit|stvit)_([a-z0-9]+)$')


def resolve_dense_setting(backbone: str, dense_cfg: Optional[str]) -> Tuple[Optional[str], Optional[DenseSetting]]:
    """The official setting ``dense_cfg`` names for ``backbone``: ``(name used, setting)``.

    A task name the family has no config for (e.g. ``'retinanet'`` for VAN) takes the family's
    default setting, and the name used says which; ``None`` is the classification setting (plus the
    neck SHViT and Agent-DeiT need). A timm model outside the zoo has no settings: ``(None, None)``.
    """
    m = _ZOO_NAME.match(backbone.split('.')[0])
    if m is None:
        if dense_cfg is not None:
            raise ValueError(f'{backbone!r} is not a zoo backbone: dense settings exist for az_* models only')
        return None, None
    family = m.group(1)
    if dense_cfg is None:
        return None, _CLASSIFICATION.get(family, DenseSetting(None))
    settings = DENSE_SETTINGS[family]
    if not isinstance(dense_cfg, str) or not re.fullmatch(r'[a-z0-9_]+', dense_cfg):
        raise ValueError(f'dense_cfg must be a setting name such as {sorted(settings)}, got {dense_cfg!r}')
    name = dense_cfg if dense_cfg in settings else _DEFAULT[family]
    return name, settings[name]


class DenseBackbone(nn.Module):
    """A backbone for dense heads: image ``(B, in_chans, H, W)`` to a list of NCHW maps, finest first.

    ``body`` is the timm model, pruned to the stages used (no classifier, no final norm); ``neck``
    (SHViT's FPN, ViTDet's pyramid) maps its outputs to strides 4-32 where the family needs one.
    Each map's side is about the input's divided by its stride (padding families round up).

    Attributes: ``out_channels`` and ``strides`` (one per map), ``min_input_size`` (the smallest H
    and W accepted), ``dense_cfg`` (the official setting used, None for classification settings),
    ``dense_config_file`` (its official config file) and ``norm_eval`` (batch norms of the body
    kept in eval mode while training, as the official dense code of SHViT does).
    """

    def __init__(
            self,
            body: nn.Module,
            body_indices: Sequence[int],
            out_channels: Sequence[int],
            strides: Sequence[int],
            min_input_size: int,
            neck: Optional[nn.Module] = None,
            dense_cfg: Optional[str] = None,
            dense_config_file: Optional[str] = None,
            norm_eval: bool = False,
    ):
        super().__init__()
        self.body = body
        self.neck = neck
        self.body_indices = list(body_indices)
        self.out_channels: List[int] = list(out_channels)
        self.strides: List[int] = list(strides)
        self.min_input_size = min_input_size
        self.in_chans = body.in_chans if hasattr(body, 'in_chans') else None
        self.dense_cfg = dense_cfg
        self.dense_config_file = dense_config_file
        self.norm_eval = norm_eval

    def train(self, mode: bool = True) -> 'DenseBackbone':
        super().train(mode)
        if mode and self.norm_eval:
            for m in self.body.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        if x.dim() != 4 or (self.in_chans is not None and x.shape[1] != self.in_chans):
            raise ValueError(
                f'the dense backbone expects images (B, {self.in_chans}, H, W), got shape {tuple(x.shape)}')
        if min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(
                f'the dense backbone needs H and W of at least {self.min_input_size}, got shape {tuple(x.shape)}')
        if hasattr(self.body, 'forward_intermediates'):
            feats = self.body.forward_intermediates(x, indices=self.body_indices, intermediates_only=True)
        else:  # a timm features_only wrapper
            feats = self.body(x)
        return list(self.neck(feats)) if self.neck is not None else list(feats)


def _drop_unused_head(body: nn.Module) -> None:
    """Replace the classifier head left after pruning (e.g. DaViT's pool-norm head) by the identity:
    ``forward_intermediates`` never uses it, and unused parameters upset DDP and weight decay groups."""
    head = getattr(body, 'head', None)
    if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
        body.head = nn.Identity()


def create_dense_backbone(
        backbone: str,
        *,
        dense_cfg: Optional[str] = None,
        pretrained: bool = False,
        in_chans: int = 3,
        out_indices: Optional[Sequence[int]] = None,
        **kwargs,
) -> DenseBackbone:
    """Build ``backbone`` (a zoo ``az_*`` name or any timm model) for dense heads.

    Args:
        backbone: the model name, with or without a pretrained tag (``'az_dinat_tiny.shi_in1k'``).
        dense_cfg: an official dense setting of the family (``'upernet'``, ``'fpn'``, ``'maskrcnn'``,
            ``'cascade_maskrcnn'``, ``'retinanet'``; see ``DENSE_SETTINGS``); a task name the family
            has no config for takes the family's default setting; None keeps the classification
            settings.
        pretrained: load the backbone's ImageNet weights (the dense settings change no parameter;
            output norms they add start at weight one, bias zero).
        in_chans: input channels.
        out_indices: which of the levels at strides 4, 8, 16, 32 to return (default all four);
            SHViT's neck also has a level at stride 64 (index 4).
        **kwargs: passed to the backbone's constructor; they override the setting's (e.g.
            ``drop_path_rate=0.``); ``neck_channels`` sets the width of SHViT's / ViTDet's neck (256).

    Returns:
        A ``DenseBackbone``: ``(B, in_chans, H, W)`` to a list of NCHW maps at ``.strides``.
    """
    name, setting = resolve_dense_setting(backbone, dense_cfg)
    neck_channels = kwargs.pop('neck_channels', 256)
    if setting is None:
        return _timm_dense_backbone(backbone, pretrained, in_chans, out_indices, kwargs)
    variant = _ZOO_NAME.match(backbone.split('.')[0]).group(2)
    model_kwargs: Dict[str, Any] = dict(setting.kwargs)
    if variant in setting.drop_path_rate:
        model_kwargs['drop_path_rate'] = setting.drop_path_rate[variant]
    model_kwargs.update(kwargs)
    config_file = setting.config_file(variant)
    body = timm.create_model(backbone, pretrained=pretrained, in_chans=in_chans, num_classes=0, **model_kwargs)
    info = body.feature_info
    if setting.neck is None:
        indices = list(range(4)) if out_indices is None else list(out_indices)
        reductions = [f['reduction'] for f in info]
        if reductions != [4, 8, 16, 32]:
            raise ValueError(f'{backbone} has strides {reductions}; a dense backbone needs 4, 8, 16, 32')
        _check_indices(indices, 4, backbone)
        body.prune_intermediate_layers(indices, prune_norm=True, prune_head=True)
        _drop_unused_head(body)
        return DenseBackbone(
            body, indices, [info[i]['num_chs'] for i in indices], [reductions[i] for i in indices],
            body.min_input_size, dense_cfg=name, dense_config_file=config_file, norm_eval=setting.norm_eval)
    if setting.neck == 'shvit_fpn':
        # three stages at 16, 32, 64; two transposed convs add 8 and 4 (the Mask R-CNN neck's setting)
        indices = list(range(4)) if out_indices is None else list(out_indices)
        _check_indices(indices, 5, backbone)
        body.prune_intermediate_layers(3, prune_norm=True, prune_head=True)
        _drop_unused_head(body)
        neck = FPN([f['num_chs'] for f in info], neck_channels, num_extra_trans_convs=2, out_indices=indices)
        strides = [(4, 8, 16, 32, 64)[i] for i in indices]
        return DenseBackbone(
            body, [0, 1, 2], [neck_channels] * len(indices), strides, body.min_input_size, neck=neck,
            dense_cfg=name, dense_config_file=config_file, norm_eval=setting.norm_eval)
    if setting.neck == 'simple_fpn':
        # the last block's patch tokens at stride 16 (no final norm: ViTDet reads the plain block output)
        indices = list(range(4)) if out_indices is None else list(out_indices)
        _check_indices(indices, 4, backbone)
        last = len(info) - 1
        body.prune_intermediate_layers([last], prune_norm=True, prune_head=True)
        _drop_unused_head(body)
        # the last block's bias of the class token's query only shapes the class token's output, which
        # the pyramid does not read: frozen, so that no trainable parameter is left without a gradient
        ca_bias = getattr(body.blocks[last].attn, 'ca_bias', None)
        if ca_bias is not None:
            ca_bias.requires_grad_(False)
        scales = [(4., 2., 1., .5)[i] for i in indices]
        neck = SimpleFeaturePyramid(info[last]['num_chs'], neck_channels, scales)
        stride = info[last]['reduction']
        return DenseBackbone(
            body, [last], [neck_channels] * len(indices), [int(stride / s) for s in scales],
            # the stride-32 level max-pools the stride-16 map, which needs two tokens a side
            max(body.min_input_size, 2 * stride), neck=neck, dense_cfg=name, dense_config_file=config_file)
    raise AssertionError(f'unknown neck {setting.neck!r} for {backbone}')


def _check_indices(indices: Sequence[int], num_levels: int, backbone: str) -> None:
    if not indices or len(set(indices)) != len(indices) or list(indices) != sorted(indices) \
            or not all(0 <= i < num_levels for i in indices):
        raise ValueError(
            f'out_indices for {backbone} must be increasing level indices in [0, {num_levels}), got {indices}')


def _timm_dense_backbone(
        backbone: str, pretrained: bool, in_chans: int, out_indices: Optional[Sequence[int]],
        kwargs: Dict[str, Any]) -> DenseBackbone:
    """A timm model outside the zoo, through timm's feature extraction: its levels at strides 4-32."""
    probe = timm.create_model(backbone, pretrained=False, features_only=True, **kwargs)
    reductions = probe.feature_info.reduction()
    levels = [reductions.index(s) for s in (4, 8, 16, 32) if s in reductions]
    if len(levels) != 4:
        raise ValueError(f'{backbone} has feature strides {reductions}; a dense backbone needs 4, 8, 16 and 32')
    indices = list(range(4)) if out_indices is None else list(out_indices)
    _check_indices(indices, 4, backbone)
    taken = [probe.feature_info.out_indices[levels[i]] for i in indices]
    body = timm.create_model(
        backbone, pretrained=pretrained, in_chans=in_chans, features_only=True, out_indices=taken, **kwargs)
    body.in_chans = in_chans
    return DenseBackbone(
        body, indices, body.feature_info.channels(), [(4, 8, 16, 32)[i] for i in indices],
        min_input_size=32, dense_cfg=None)
