"""Semantic segmentation on any zoo backbone: the papers' UperNet and Semantic FPN, and smp's decoders.

::

    from attnzoo.zoo import create_segmentation_model
    model = create_segmentation_model('upernet', 'az_dinat_tiny', num_classes=150, pretrained_backbone=True)
    model.train(); out = model(images)   # {'out': (B, 150, H, W), 'aux': (B, 150, H, W)}
    model.eval(); logits = model(images)  # (B, 150, H, W)
    loss = ce(out['out'], y) + model.aux_loss_weight * ce(out['aux'], y)

Images are ``(B, C, H, W)`` floats normalised with the backbone's mean and std (timm's
``resolve_data_config`` of the backbone; the recipes' transforms do it), of any size at least the
backbone's minimum; logits come back at the input resolution.

Architectures (``arch``):

* ``'upernet'``: mmsegmentation's UPerHead as the papers trained it (channels 512, pyramid pooling
  1, 2, 3, 6, BN, dropout 0.1) with its FCNHead auxiliary head on the stride-16 level (channels 256,
  one conv, loss weight 0.4, ``model.aux_loss_weight``), on the backbone built with the family's
  ``'upernet'`` dense setting.
* ``'fpn'``: Semantic FPN (Kirillov et al.): mmseg's FPN neck (256 channels) and FPNHead (128
  channels), as LITv2, VAN and Agent-PVT report it; no auxiliary head unless asked for.
* ``'smp:<name>'``: a segmentation_models_pytorch architecture by smp's own name (``'smp:unet'``,
  ``'smp:unetplusplus'``, ``'smp:manet'``, ``'smp:linknet'``, ``'smp:fpn'``, ``'smp:pspnet'``,
  ``'smp:segformer'``, ``'smp:upernet'``, ``'smp:dpt'``), built by smp over the zoo backbone as its
  ``tu-`` encoder, for the families whose strides are 4-32 (all but SHViT and Agent-DeiT, which reach
  them only through a neck); ``'smp:dpt'``, smp's ViT decoder, also takes Agent-DeiT, a plain ViT.
  DeepLabV3, DeepLabV3+ and PAN need a dilated encoder, which none is.

The modules of ``'upernet'`` and ``'fpn'`` carry mmseg's names (``backbone``, ``neck``,
``decode_head``, ``auxiliary_head``), so the papers' released ADE20K checkpoints load with
``checkpoint=``, strictly (``load_segmentation_checkpoint``).
"""
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from attnzoo.backbones import CheckpointMismatchError, CheckpointReadError, family_of
from attnzoo.backbones._helpers import check_state_dict, unwrap_checkpoint
from attnzoo.blocks.dense import FPN, FCNHead, FPNHead, UPerHead

from .dense import DenseBackbone, create_dense_backbone, resolve_dense_setting

__all__ = [
    'EncoderDecoder', 'SmpSegmentationModel', 'create_segmentation_model', 'load_segmentation_checkpoint',
    'SEGMENTATION_ARCHS',
]

SEGMENTATION_ARCHS = ('upernet', 'fpn', 'smp:<arch>')
_SMP_PREFIX = 'smp:'
# the arguments of the heads; every other keyword goes to the backbone
_HEAD_KWARGS = ('channels', 'pool_scales', 'dropout_ratio', 'aux_channels', 'fpn_channels', 'aux_loss_weight')


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode='bilinear', align_corners=False)


class EncoderDecoder(nn.Module):
    """mmseg's EncoderDecoder: dense backbone, optional neck, decode head, optional auxiliary head.

    Input ``(B, C, H, W)``; output logits ``(B, num_classes, H, W)``, upsampled bilinearly from the
    head's stride-4 logits. In training mode with an auxiliary head it returns ``{'out': logits,
    'aux': aux_logits}`` (both at the input size), as torchvision's segmentation models do; the
    auxiliary loss is weighted by ``aux_loss_weight``.
    """

    def __init__(
            self,
            backbone: DenseBackbone,
            decode_head: nn.Module,
            neck: Optional[nn.Module] = None,
            auxiliary_head: Optional[nn.Module] = None,
            aux_loss_weight: float = 0.,
    ):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.aux_loss_weight = aux_loss_weight if auxiliary_head is not None else 0.
        self.attnzoo_cfg: Dict[str, Any] = {}

    @property
    def min_input_size(self) -> int:
        return self.backbone.min_input_size

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        size = x.shape[-2:]
        feats = self.backbone(x)
        if self.neck is not None:
            feats = self.neck(feats)
        out = _resize(self.decode_head(feats), size)
        if self.training and self.auxiliary_head is not None:
            return {'out': out, 'aux': _resize(self.auxiliary_head(feats), size)}
        return out


class SmpSegmentationModel(nn.Module):
    """An smp model (``self.model``) that takes any input size at least ``min_input_size``.

    smp's models take sides divisible by their output stride; this pads the input on the right and
    bottom (zeros, after normalisation) to the next multiple and crops the logits back, so the
    output is ``(B, num_classes, H, W)`` at the input size like the other architectures'.
    """

    def __init__(self, model: nn.Module, divisor: int, min_input_size: int):
        super().__init__()
        self.model = model
        self.divisor = divisor
        self.min_input_size = min_input_size
        self.aux_loss_weight = 0.
        self.attnzoo_cfg: Dict[str, Any] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(
                f'expects images (B, C, H, W) with H, W >= {self.min_input_size}, got shape {tuple(x.shape)}')
        H, W = x.shape[-2:]
        pad_h, pad_w = -H % self.divisor, -W % self.divisor
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.model(x)[..., :H, :W]


def create_segmentation_model(
        arch: str,
        backbone: str,
        num_classes: int,
        *,
        pretrained_backbone: bool = False,
        dense_cfg: Optional[str] = None,
        aux_head: Optional[bool] = None,
        checkpoint: Optional[Union[str, os.PathLike, Mapping[str, Any]]] = None,
        **kwargs,
) -> nn.Module:
    """A semantic segmentation model: ``arch`` (``'upernet'``, ``'fpn'``, ``'smp:<name>'``) on ``backbone``.

    Args:
        arch: the architecture (see the module docstring).
        backbone: a zoo (``az_*``) or timm model name, with or without a pretrained tag.
        num_classes: output classes (ADE20K: 150).
        pretrained_backbone: load the backbone's ImageNet weights.
        dense_cfg: the family's dense setting (``attnzoo.zoo.dense.DENSE_SETTINGS``); default: the
            one named after ``arch`` (``'upernet'`` / ``'fpn'``), or the family's default setting where
            it has none of that name; for smp architectures the classification settings.
        aux_head: the FCNHead auxiliary head on the stride-16 level; default the paper's (on for
            ``'upernet'``, off for ``'fpn'``; smp architectures have none).
        checkpoint: a checkpoint to load strictly, a path or a loaded dict: mmseg's layout
            (``backbone.*``, ``decode_head.*``, ``auxiliary_head.*``, ``neck.*`` under ``'state_dict'``)
            with the official backbone names, or this model's own state dict.
        **kwargs: head options ``channels`` (decode head width: 512 UperNet, 128 Semantic FPN),
            ``pool_scales``, ``dropout_ratio``, ``aux_channels`` (256), ``fpn_channels`` (FPN neck, 256),
            ``aux_loss_weight`` (0.4); ``in_chans``; for smp architectures smp's own arguments
            (``decoder_channels``, ...); every other keyword goes to the backbone
            (``drop_path_rate``, ``neck_channels``, ...).

    Returns:
        The model, with ``model.attnzoo_cfg`` (the arguments that rebuild it, for
        ``attnzoo.zoo.create_task_model``) and ``model.aux_loss_weight``.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f'num_classes must be a positive int, got {num_classes!r}')
    cfg = dict(task='segmentation', arch=arch, backbone=backbone, num_classes=num_classes, dense_cfg=dense_cfg,
               aux_head=aux_head, **kwargs)
    if arch.startswith(_SMP_PREFIX):
        if aux_head:
            raise ValueError('smp architectures have no auxiliary segmentation head; use aux_head=None')
        model = _create_smp(arch[len(_SMP_PREFIX):], backbone, num_classes, pretrained_backbone, dense_cfg, **kwargs)
    elif arch in ('upernet', 'fpn'):
        model = _create_mmseg(arch, backbone, num_classes, pretrained_backbone, dense_cfg, aux_head, **kwargs)
    else:
        raise ValueError(f"unknown segmentation arch {arch!r}: choose 'upernet', 'fpn' or 'smp:<smp arch>' "
                         f"(e.g. 'smp:unet', 'smp:deeplabv3plus', 'smp:segformer')")
    model.attnzoo_cfg = cfg
    if checkpoint is not None:
        load_segmentation_checkpoint(model, checkpoint)
    return model


def _create_mmseg(
        arch: str, backbone: str, num_classes: int, pretrained: bool, dense_cfg: Optional[str],
        aux_head: Optional[bool], **kwargs) -> EncoderDecoder:
    head_kwargs = {k: kwargs.pop(k) for k in _HEAD_KWARGS if k in kwargs}
    if dense_cfg is None and resolve_dense_setting(backbone, None)[1] is not None:
        dense_cfg = arch  # the family's setting for this head, or its default one
    encoder = create_dense_backbone(backbone, dense_cfg=dense_cfg, pretrained=pretrained, **kwargs)
    if encoder.strides != [4, 8, 16, 32]:
        raise ValueError(f'{arch} needs backbone levels at strides 4, 8, 16, 32, got {encoder.strides}')
    dropout = head_kwargs.get('dropout_ratio', 0.1)
    neck = None
    in_channels: List[int] = encoder.out_channels
    if arch == 'upernet':
        head = UPerHead(in_channels, num_classes, channels=head_kwargs.get('channels', 512),
                        pool_scales=head_kwargs.get('pool_scales', (1, 2, 3, 6)), dropout_ratio=dropout)
    else:
        fpn_channels = head_kwargs.get('fpn_channels', 256)
        neck = FPN(in_channels, fpn_channels)
        in_channels = [fpn_channels] * 4
        head = FPNHead(in_channels, num_classes, channels=head_kwargs.get('channels', 128), dropout_ratio=dropout)
    aux = None
    if aux_head if aux_head is not None else arch == 'upernet':
        aux = FCNHead(in_channels[2], num_classes, channels=head_kwargs.get('aux_channels', 256),
                      dropout_ratio=dropout, in_index=2)
    return EncoderDecoder(encoder, head, neck=neck, auxiliary_head=aux,
                          aux_loss_weight=head_kwargs.get('aux_loss_weight', 0.4))


def _create_smp(
        arch: str, backbone: str, num_classes: int, pretrained: bool, dense_cfg: Optional[str],
        **kwargs) -> SmpSegmentationModel:
    """smp's ``arch`` over the backbone as smp's own ``tu-`` (timm universal) encoder.

    A dense setting's backbone arguments are passed on to timm; where it adds output norms, timm's
    feature getter (which calls ``forward_intermediates``) extracts the features, so they apply.
    """
    import segmentation_models_pytorch as smp

    name, setting = resolve_dense_setting(backbone, dense_cfg)
    # DPT, smp's ViT decoder, reads a plain ViT's blocks at its one stride: Agent-DeiT needs no neck
    vit_for_dpt = arch == 'dpt' and setting is not None and setting.neck == 'simple_fpn'
    if setting is not None and setting.neck is not None and not vit_for_dpt:
        raise ValueError(
            f'smp architectures need encoder levels at strides 4-32; {backbone} reaches them only through '
            f"its neck: use arch 'upernet' or 'fpn'" + (" (or 'smp:dpt')" if setting.neck == 'simple_fpn' else ''))
    encoder_kwargs: Dict[str, Any] = {}
    if setting is not None:
        variant = backbone.split('.')[0].rsplit('_', 1)[-1]
        encoder_kwargs.update(setting.kwargs)
        if variant in setting.drop_path_rate:
            encoder_kwargs['drop_path_rate'] = setting.drop_path_rate[variant]
        if setting.kwargs.get('out_norms'):
            encoder_kwargs['feature_cls'] = 'getter'
    encoder_kwargs.update(kwargs)
    in_chans = encoder_kwargs.pop('in_chans', 3)
    if arch == 'fpn' and encoder_kwargs.get('encoder_depth', 5) < 5:
        # below depth 5 smp's FPN decoder reads the empty stride-2 level it adds to an encoder whose
        # levels start at stride 4, and fails (timm's ConvNeXt as a tu- encoder fails alike)
        raise ValueError(f"smp:fpn takes {backbone} at encoder_depth 5 only, got {encoder_kwargs['encoder_depth']}: "
                         "smp's FPN fails on encoders whose first level is at stride 4 below that depth")
    try:
        model = smp.create_model(
            arch, encoder_name=f'tu-{backbone}', encoder_weights=True if pretrained else None,
            in_channels=in_chans, classes=num_classes, **encoder_kwargs)
    except KeyError as e:
        raise ValueError(f'unknown smp architecture {arch!r}: {e}') from e
    except ValueError as e:
        if 'output_stride' not in str(e):
            raise
        # DeepLabV3(+) and PAN dilate their encoder's last stages (output stride 8 or 16)
        raise ValueError(f'smp:{arch} needs a dilated encoder, which {backbone} is not: {e}') from e
    inner = getattr(model.encoder.model, 'model', None)
    if inner is not None and getattr(inner, 'head', None) is not None:
        # the getter keeps the classifier module (DaViT's pool-norm head) though it never runs it
        inner.head = nn.Identity()
    min_size = getattr(model.encoder.model, 'min_input_size', None) or getattr(inner, 'min_input_size', 32)
    divisor = getattr(model, 'requires_divisible_input_shape', True) and model.encoder.output_stride or 1
    if arch == 'dpt':
        # DPT fuses a level it makes at twice the encoder's stride with one upsampled from it: the
        # token grid must be even (smp asks only for the stride, and fails at 80x112 with timm's ViTs too)
        divisor *= 2
        # it reads block outputs before the final norm and never the classifier: without them no
        # parameter is left without a gradient (DDP refuses those unless told to look for them)
        model.encoder.model.prune_intermediate_layers([len(model.encoder.model.feature_info) - 1], prune_norm=True)
    return SmpSegmentationModel(model, divisor, max(min_size, 32))


def _load(checkpoint: Union[str, os.PathLike, Mapping[str, Any]]) -> Dict[str, Any]:
    if isinstance(checkpoint, Mapping):
        return dict(checkpoint)
    path = os.fspath(checkpoint)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'segmentation checkpoint {path} does not exist')
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file
            return load_file(path)
        # weights only: the tensors, and mmseg's 'meta' of strings, numbers and lists
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise CheckpointReadError(
            f'segmentation checkpoint {path} could not be read as weights ({type(e).__name__}: {e}); a file '
            f'you trust that pickles other objects can be loaded with torch.load(path, weights_only=False) '
            f'and passed as a dict') from e


def load_segmentation_checkpoint(
        model: nn.Module, checkpoint: Union[str, os.PathLike, Mapping[str, Any]]) -> nn.Module:
    """Load a segmentation checkpoint into ``model`` strictly (in place; returns the model).

    Takes mmseg's layout (``{'state_dict': {...}, 'meta': {...}}``, or the bare state dict) whose
    ``backbone.*`` keys are the official backbone's (brought to ours by the family's checkpoint filter,
    as in ``timm.create_model(..., pretrained=True)``), or this model's own state dict (``backbone.body.*``).
    A checkpoint that does not fit raises ``CheckpointMismatchError`` naming every missing and
    unexpected key and every shape that differs, with the file it came from.
    """
    source = f'segmentation checkpoint {os.fspath(checkpoint) if not isinstance(checkpoint, Mapping) else "(dict)"}'
    state = unwrap_checkpoint(_load(checkpoint), keys=('state_dict', 'model'))
    state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}
    problems = []
    if isinstance(model, EncoderDecoder) and not any(k.startswith('backbone.body.') for k in state):
        state, problems = _official_backbone(model, state)
    try:
        check_state_dict(state, model, source, ignore_prefixes=('backbone.body.',) if problems else ())
    except CheckpointMismatchError as e:
        problems += str(e).split('\n')[1:]
    if problems:
        raise CheckpointMismatchError('\n'.join([f'{source} does not fit {type(model).__name__}:'] + problems))
    model.load_state_dict(state, strict=True)
    return model


def _official_backbone(model: EncoderDecoder, state: Dict[str, Any]):
    """mmseg's ``backbone.*`` in the official backbone's names to ours (``backbone.body.*``), through the
    family's checkpoint filter; and the lines saying why it does not fit, if it does not."""
    backbone = model.attnzoo_cfg.get('backbone', '')
    body = model.backbone.body
    official = {k[len('backbone.'):]: v for k, v in state.items() if k.startswith('backbone.')}
    state = {k: v for k, v in state.items() if not k.startswith('backbone.')}
    problems = []
    try:
        family = family_of(backbone)
    except KeyError:  # a timm model outside the zoo: its own names
        family = None
    if family is not None:
        had_out_norms = any(re.match(r'^(norm\d|out_norms\.\d)\.', k) for k in official)
        try:
            official = family.checkpoint_filter_fn(official, body)
        except CheckpointMismatchError as e:
            lines = str(e).split('\n')[1:]
            problems += [f'  backbone.* in the layout of {backbone}: ' + line.strip() for line in lines]
        # the filter gives an ImageNet checkpoint fresh output norms; a dense checkpoint must have its own
        if getattr(body, 'out_norms', None) is not None and not had_out_norms and not problems:
            names = [f'backbone.norm{k.split(".")[0]}.{k.split(".", 1)[1]}'
                     for k in body.out_norms.state_dict()]
            problems.append(f'  missing keys ({len(names)}): ' + ', '.join(names))
    state.update({f'backbone.body.{k}': v for k, v in official.items()})
    return state, problems
