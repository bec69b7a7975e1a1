"""torchvision's detectors on zoo backbones: Faster R-CNN, Mask R-CNN, RetinaNet and FCOS with an FPN.

``create_detection_model`` returns torchvision's detector itself (``FasterRCNN``, ``MaskRCNN``,
``RetinaNet``, ``FCOS``), so its training interface (a list of images and of targets in, a loss dict
out), its eval output (a list of dicts of ``boxes``, ``labels``, ``scores`` and ``masks``) and every
tool written for torchvision's detectors work unchanged. What torchvision lacks, this module adds,
in small pieces joined by constructors as torchvision's own detection package is:

- ``DenseBackboneWithFPN``: torchvision's ``BackboneWithFPN`` for a zoo dense backbone
  (``attnzoo.zoo.dense.create_dense_backbone``, NCHW maps at strides 4, 8, 16, 32) instead of a
  ResNet read through ``IntermediateLayerGetter``; the FPN and its extra levels are torchvision's.
- the levels each detector takes, as torchvision's builders and the papers' mmdet configs do:
  the R-CNNs C2-C5 and a max-pooled P6 (``LastLevelMaxPool``, strides 4-64), RetinaNet C3-C5 and
  P6/P7 from C5 (``P6P7FromInput``, strides 8-128), FCOS C3-C5 and P6/P7 from P5;
- anchors derived from those strides (R-CNN 8x stride, RetinaNet 4x stride at three octave
  scales, FCOS one point per location of side the stride: torchvision's defaults for these
  strides), RoIAlign over the FPN levels by name, and the transform padding batches to a multiple
  of the backbone's largest stride;
- ``freeze_stages`` and frozen batch norm as torchvision's ResNet backbones have them;
- ``load_detection_checkpoint``: the backbone of the papers' mmdet checkpoints, or a whole
  detector saved by attnzoo.

Labels follow torchvision: ``num_classes`` counts the background, labels are 1..num_classes-1
(``attnzoo.recipes.data.coco.CocoDetection`` gives them and its ``num_classes``).
"""
import json
import os
import re
import warnings
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import freeze_batch_norm_2d
from timm.models import resolve_pretrained_cfg
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from attnzoo.backbones import CheckpointMismatchError, family_of
from attnzoo.backbones._helpers import check_state_dict, raise_read_failure, unwrap_checkpoint

from .dense import create_dense_backbone
from .tasks import model_state_from

__all__ = [
    'DETECTION_ARCHS', 'DenseBackboneWithFPN', 'create_detection_backbone', 'create_detection_model',
    'freeze_stages', 'load_detection_checkpoint',
]

DETECTION_ARCHS: Tuple[str, ...] = ('faster_rcnn', 'mask_rcnn', 'retinanet', 'fcos')
_RCNN = ('faster_rcnn', 'mask_rcnn')


class DenseBackboneWithFPN(nn.Module):
    """A dense backbone and torchvision's ``FeaturePyramidNetwork`` over the levels ``in_levels``.

    ``body`` maps ``(B, C, H, W)`` to a list of NCHW maps with attributes ``out_channels`` and
    ``strides`` (``create_dense_backbone``); the FPN takes the maps ``in_levels`` of that list and
    adds ``extra_blocks``' levels. The output is torchvision's: an ordered dict of NCHW maps with
    ``out_channels`` channels, named ``'0', '1', ...`` for the backbone's levels, then the extra
    block's names (``'pool'``, or ``'p6', 'p7'``). ``featmap_names`` and ``strides`` list them.
    """

    def __init__(
            self,
            body: nn.Module,
            in_levels: Sequence[int],
            out_channels: int,
            extra_blocks: ExtraFPNBlock,
            extra_names: Sequence[str],
    ) -> None:
        super().__init__()
        self.body = body
        self.in_levels = list(in_levels)
        self.fpn = FeaturePyramidNetwork(
            in_channels_list=[body.out_channels[i] for i in self.in_levels],
            out_channels=out_channels,
            extra_blocks=extra_blocks,
        )
        self.out_channels = out_channels  # what torchvision's detectors read
        self.featmap_names: List[str] = [str(i) for i in range(len(self.in_levels))] + list(extra_names)
        top = body.strides[self.in_levels[-1]]
        self.strides: List[int] = [body.strides[i] for i in self.in_levels] + [
            top * 2 ** (k + 1) for k in range(len(extra_names))]  # each extra level halves the last

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        feats = self.body(x)
        return self.fpn(OrderedDict((str(k), feats[i]) for k, i in enumerate(self.in_levels)))


def _stage_groups(body: nn.Module) -> List[List[str]]:
    """A dense backbone's parameter names as [stem, stage 1, ..., stage S], the stages of its timm
    model (``body.body``) as its ``feature_info`` lists them; the stem is what the timm model registers
    before its first stage. Parameters in no group (norms after the stages, the neck) stay trainable."""
    info = body.body.feature_info
    info = getattr(info, 'info', info)  # timm's features_only wrappers keep the list in a FeatureInfo
    # a features_only wrapper flattens 'stages.0' to 'stages_0'
    stages = [tuple(f'body.{name}.' for name in {f['module'], f['module'].replace('.', '_')}) for f in info]
    groups: List[List[str]] = [[] for _ in range(len(stages) + 1)]
    seen_stage = False
    for name, _ in body.named_parameters():
        index = next((i for i, s in enumerate(stages) if name.startswith(s)), None)
        if index is not None:
            groups[index + 1].append(name)
            seen_stage = True
        elif not seen_stage and name.startswith('body.'):
            groups[0].append(name)
    return groups


def freeze_stages(body: nn.Module, trainable_stages: Optional[int]) -> int:
    """Freeze all but the last ``trainable_stages`` of [stem, stage 1, ..., stage S] of a dense
    backbone, as torchvision's ``trainable_layers`` does for a ResNet's [conv1, layer1..layer4]: 0
    freezes them all, S + 1 (or None) trains all. A neck and norms after the stages stay trainable.
    Returns the number resolved."""
    groups = _stage_groups(body)
    if trainable_stages is None:
        return len(groups)
    if not 0 <= trainable_stages <= len(groups):
        raise ValueError(
            f'trainable_stages must be between 0 and {len(groups)} (stem + {len(groups) - 1} stages), '
            f'got {trainable_stages}')
    if not all(groups[1:]):
        raise ValueError(f'the stages of {type(body.body).__name__} cannot be told apart by name; '
                         'trainable_stages needs a zoo backbone')
    frozen = {n for g in groups[:len(groups) - trainable_stages] for n in g}
    for name, p in body.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    return trainable_stages


def _levels(arch: str, body: nn.Module, out_channels: int) -> Tuple[List[int], ExtraFPNBlock, List[str]]:
    """The backbone levels an architecture takes, its extra FPN block and that block's level names."""
    n = len(body.strides)
    if arch in _RCNN:
        return list(range(n)), LastLevelMaxPool(), ['pool']
    # RetinaNet and FCOS start at stride 8; RetinaNet's P6 comes from C5 ('on_input' in mmdet, as
    # torchvision's v2 builder), FCOS's from P5 (the FCOS paper, 'on_output')
    levels = [i for i in range(n) if body.strides[i] >= 8]
    if arch == 'retinanet':
        return levels, P6P7FromInput(body.out_channels[levels[-1]], out_channels), ['p6', 'p7']
    # FCOS: torchvision's block on P5 is mmdet's 'on_output' with relu_before_extra_convs
    return levels, LastLevelP6P7(out_channels, out_channels), ['p6', 'p7']


class P6P7FromInput(ExtraFPNBlock):
    """RetinaNet's P6 and P7 as the papers' mmdet configs build them (``add_extra_convs='on_input'``,
    no ReLU before the extra convs): ``P6 = conv3x3/2(C5)``, ``P7 = conv3x3/2(P6)``. torchvision's
    ``LastLevelP6P7`` differs twice: a ReLU before P7's conv, and P6 from P5 where C5 is as wide as
    the FPN. Same parameter names (``p6``, ``p7``) and init as torchvision's."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)
        for conv in (self.p6, self.p7):
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.constant_(conv.bias, 0)

    def forward(self, p: List[torch.Tensor], c: List[torch.Tensor],
                names: List[str]) -> Tuple[List[torch.Tensor], List[str]]:
        p6 = self.p6(c[-1])
        return p + [p6, self.p7(p6)], names + ['p6', 'p7']


def _anchor_generator(arch: str, strides: Sequence[int]) -> AnchorGenerator:
    if arch in _RCNN:
        return AnchorGenerator(tuple((8 * s,) for s in strides), ((0.5, 1.0, 2.0),) * len(strides))
    if arch == 'retinanet':  # three octave scales per level, 4x the stride at the first
        sizes = tuple(tuple(int(4 * s * 2 ** (k / 3)) for k in range(3)) for s in strides)
        return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(strides))
    # FCOS: one point per location; a box of the stride's side centred there
    return AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))


def create_detection_backbone(
        arch: str,
        backbone: str,
        *,
        pretrained_backbone: bool = False,
        dense_cfg: Optional[str] = None,
        trainable_stages: Optional[int] = None,
        frozen_bn: Optional[bool] = None,
        fpn_channels: int = 256,
) -> DenseBackboneWithFPN:
    """The dense backbone ``backbone`` with the FPN and extra levels that ``arch`` takes.

    ``frozen_bn`` turns every BatchNorm2d of the backbone into torchvision's FrozenBatchNorm2d
    (None: when it starts from pretrained weights, as torchvision's builders do);
    ``trainable_stages`` see ``freeze_stages`` (None: all train, as the papers' mmdet configs).
    The detector's ``attnzoo_cfg`` records both as resolved.
    """
    if arch not in DETECTION_ARCHS:
        raise ValueError(f'unknown detection arch {arch!r}; choose one of {", ".join(DETECTION_ARCHS)}')
    body = create_dense_backbone(backbone, dense_cfg=dense_cfg, pretrained=pretrained_backbone)
    if frozen_bn if frozen_bn is not None else pretrained_backbone:
        body = freeze_batch_norm_2d(body)
    freeze_stages(body, trainable_stages)
    levels, extra, extra_names = _levels(arch, body, fpn_channels)
    return DenseBackboneWithFPN(body, levels, fpn_channels, extra, extra_names)


def _is_mmdet(state_dict: Mapping[str, Any]) -> bool:
    """An mmdet checkpoint: ``backbone.*`` beside ``neck.*``/heads, none of torchvision's
    ``backbone.body``/``backbone.fpn`` keys."""
    return any(k.startswith('backbone.') for k in state_dict) and not any(
        k.startswith(('backbone.body.', 'backbone.fpn.')) for k in state_dict)


def _read_checkpoint(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'detection checkpoint {path} does not exist')
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file
            return load_file(path)
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        # an mmcv checkpoint whose meta holds more than plain values: unpickling it can run code
        raise_read_failure(e, f'detection checkpoint {path}', 'pass its state dict')
        raise
    return unwrap_checkpoint(checkpoint, keys=('state_dict', 'model'))


def _load_mmdet_backbone(model: nn.Module, state_dict: Mapping[str, Any], source: str) -> None:
    """The ``backbone.*`` part of an mmdet state dict, in the official backbone's names, into the
    detector's backbone (the timm model inside the dense backbone), through the family's filter."""
    body = model.backbone.body.body
    sd = {k[len('backbone.'):]: v for k, v in state_dict.items() if k.startswith('backbone.')}
    if not any(k.endswith('.num_batches_tracked') for k in body.state_dict()):
        # frozen batch norm keeps no step count (torchvision's FrozenBatchNorm2d drops it too)
        sd = {k: v for k, v in sd.items() if not k.endswith('.num_batches_tracked')}
    try:
        family = family_of(getattr(model, 'attnzoo_cfg', {}).get('backbone', ''))
    except KeyError:  # a timm model outside the zoo: the checkpoint has its own names
        family = None
    if family is not None:
        had_out_norms = any(re.match(r'^(norm\d|out_norms\.\d)\.', k) for k in sd)
        sd = family.checkpoint_filter_fn(sd, body)
        # the filter gives an ImageNet checkpoint fresh output norms; a dense checkpoint has its own
        if getattr(body, 'out_norms', None) is not None and not had_out_norms:
            missing = [f'norm{k}' for k in body.out_norms.state_dict()]
            raise CheckpointMismatchError(
                f'backbone of mmdet {source} does not fit {type(body).__name__}: missing keys '
                f'({len(missing)}): ' + ', '.join(missing))
    check_state_dict(sd, body, source=f'backbone of mmdet {source}')
    body.load_state_dict(sd)
    rest = sorted({k.split('.')[0] for k in state_dict if not k.startswith('backbone.')})
    if rest:
        # mmdet's neck and heads are laid out otherwise than torchvision's (background last, 80
        # classes, aligned RoIAlign...): said, so no one takes the detector for the paper's
        warnings.warn(f'mmdet {source}: only the backbone was loaded; its {", ".join(rest)} '
                      f'({sum(not k.startswith("backbone.") for k in state_dict)} tensors) stay as built, '
                      'to be trained', stacklevel=3)


def load_detection_checkpoint(
        model: nn.Module, checkpoint: Union[str, os.PathLike, Mapping[str, torch.Tensor]]) -> str:
    """Load a checkpoint (a path, or a state dict) into a detector of ``create_detection_model``.

    Two layouts are told apart by their keys. The papers' mmdet checkpoints
    (``{'state_dict': {'backbone.*', 'neck.*', 'rpn_head.*', ...}}``): the ``backbone.*`` part goes
    through the family's ``checkpoint_filter_fn`` (the official key layout to ours) into the
    detector's backbone; mmdet's neck and heads are not torchvision's and stay as built. A whole
    detector saved by attnzoo (torchvision's keys ``backbone.body.*``, ``backbone.fpn.*``, ``rpn.*``,
    ``roi_heads.*``, ``head.*``; a state dict, a training or Lightning checkpoint, ``.safetensors``)
    loads strictly, whether its batch norms were frozen or not. Raises FileNotFoundError,
    CheckpointReadError for unreadable files, and CheckpointMismatchError naming every key and shape
    that does not fit. Returns what was loaded: ``'backbone'`` or ``'detector'``.
    """
    is_path = isinstance(checkpoint, (str, os.PathLike))
    # a mapping in memory as a file would hold it: mmdet's {'meta', 'state_dict'} unwrapped alike
    state_dict = (_read_checkpoint(checkpoint) if is_path
                  else unwrap_checkpoint(dict(checkpoint), keys=('state_dict', 'model')))
    source = f'checkpoint {os.fspath(checkpoint)}' if is_path else 'checkpoint'
    if _is_mmdet(state_dict):
        _load_mmdet_backbone(model, state_dict, source)
        return 'backbone'
    # a Lightning checkpoint of the recipes holds the detector under `model.`
    state_dict = _match_batch_norm_counters(model_state_from(state_dict, model), model)
    check_state_dict(state_dict, model, source=source)
    model.load_state_dict(state_dict)
    return 'detector'


def _match_batch_norm_counters(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """A detector saved with trainable batch norms loads into frozen ones and the other way round:
    only ``num_batches_tracked`` differs between the two (FrozenBatchNorm2d keeps no count), and a
    norm with a momentum never reads it. Counts the model has no buffer for are dropped; a count it
    expects but the file lacks (saved frozen) starts at zero."""
    expected = model.state_dict()
    out = {k: v for k, v in state_dict.items() if not (k.endswith('.num_batches_tracked') and k not in expected)}
    for key, value in expected.items():
        prefix = key[:-len('num_batches_tracked')]
        if key.endswith('.num_batches_tracked') and key not in out and prefix + 'running_mean' in out:
            out[key] = torch.zeros_like(value)
    return out


def create_detection_model(
        arch: str,
        backbone: str,
        num_classes: int,
        *,
        pretrained_backbone: bool = False,
        dense_cfg: Optional[str] = None,
        trainable_stages: Optional[int] = None,
        frozen_bn: Optional[bool] = None,
        checkpoint: Optional[Union[str, os.PathLike]] = None,
        fpn_channels: int = 256,
        representation_size: Optional[int] = None,
        mask_head_channels: Optional[int] = None,
        **detector_kwargs: Any,
) -> nn.Module:
    """A torchvision detector (``arch``: 'faster_rcnn', 'mask_rcnn', 'retinanet', 'fcos') on the zoo
    backbone ``backbone`` (any name ``create_dense_backbone`` takes, e.g. 'az_dinat_mini').

    Args:
        num_classes: classes including the background (COCO: 81 for 80 categories, or 91 in
            torchvision's id layout).
        pretrained_backbone: start the backbone from its published ImageNet weights.
        dense_cfg: the family's dense settings by name ('maskrcnn', ...; see ``attnzoo.zoo.dense``).
        trainable_stages: how many of [stem, stages...] train, counted from the last (torchvision's
            ``trainable_backbone_layers``); None trains all, as the papers' mmdet configs.
        frozen_bn: BatchNorm2d of the backbone as torchvision's FrozenBatchNorm2d; None: frozen when
            the backbone starts from trained weights (``pretrained_backbone`` or ``checkpoint``).
        checkpoint: a file loaded by ``load_detection_checkpoint``: a whole detector saved by
            attnzoo, or a paper's mmdet checkpoint whose ``backbone.*`` part is loaded.
        fpn_channels: the FPN's width (also the RPN's, the RetinaNet/FCOS heads' and the RoI heads' input).
        representation_size: the width of the R-CNN box head's two fully connected layers
            (torchvision's 1024 when None).
        mask_head_channels: the width of Mask R-CNN's four mask convs and its predictor
            (torchvision's 256 when None).
        **detector_kwargs: passed to torchvision's class (``min_size``, ``max_size``,
            ``rpn_post_nms_top_n_train``, ``box_score_thresh``, ``score_thresh``, ...). They must be
            JSON values: ``model.attnzoo_cfg`` records them to rebuild the model; compose custom
            modules with ``create_detection_backbone`` and torchvision's classes directly.

    The image transform inside normalises with the backbone's mean and std and pads each batch to a
    multiple of the backbone's largest stride (``size_divisible``); inputs are images in [0, 1].
    ``model.attnzoo_cfg`` holds the arguments that rebuild the model (weights travel separately).
    """
    if arch not in DETECTION_ARCHS:
        raise ValueError(f'unknown detection arch {arch!r}; choose one of {", ".join(DETECTION_ARCHS)}')
    if num_classes < 2:
        raise ValueError(f'num_classes counts the background too and must be at least 2, got {num_classes}')
    if representation_size is not None and arch not in _RCNN:
        raise ValueError(f'representation_size sizes the R-CNN box head; {arch} has none')
    if mask_head_channels is not None and arch != 'mask_rcnn':
        raise ValueError(f'mask_head_channels sizes the Mask R-CNN mask head; {arch} has none')
    modules = sorted(k for k, v in detector_kwargs.items() if isinstance(v, nn.Module))
    try:
        json.dumps(detector_kwargs)
    except TypeError as e:
        raise TypeError(
            f'detector_kwargs must be JSON values to be recorded in attnzoo_cfg ({", ".join(modules) or e}); '
            'build custom heads on create_detection_backbone with torchvision\'s classes') from e
    if frozen_bn is None:
        frozen_bn = pretrained_backbone or checkpoint is not None

    features = create_detection_backbone(
        arch, backbone, pretrained_backbone=pretrained_backbone, dense_cfg=dense_cfg,
        trainable_stages=trainable_stages, frozen_bn=frozen_bn, fpn_channels=fpn_channels)
    if trainable_stages is None:
        trainable_stages = len(_stage_groups(features.body))

    min_size = detector_kwargs.get('min_size', 800)  # torchvision's default
    smallest = min(min_size) if isinstance(min_size, (list, tuple)) else min_size
    if smallest < features.body.min_input_size:
        raise ValueError(f'min_size {min_size} resizes images below the {features.body.min_input_size} pixels '
                         f'{backbone} needs')
    pretrained_cfg = resolve_pretrained_cfg(backbone.split('.')[0])
    kwargs: Dict[str, Any] = dict(
        image_mean=list(pretrained_cfg.mean), image_std=list(pretrained_cfg.std),
        size_divisible=max(features.body.strides))
    kwargs.update(detector_kwargs)
    anchors = _anchor_generator(arch, features.strides)
    if arch in _RCNN:
        names = features.featmap_names[:len(features.in_levels)]  # RoIs pool from the backbone's levels, not P6
        rep = representation_size or 1024
        kwargs.update(
            rpn_anchor_generator=anchors,
            box_roi_pool=MultiScaleRoIAlign(featmap_names=names, output_size=7, sampling_ratio=2),
            box_head=TwoMLPHead(fpn_channels * 7 ** 2, rep),
            box_predictor=FastRCNNPredictor(rep, num_classes),
        )
        if arch == 'faster_rcnn':
            model = FasterRCNN(features, None, **kwargs)
        else:
            width = mask_head_channels or 256
            kwargs.update(
                mask_roi_pool=MultiScaleRoIAlign(featmap_names=names, output_size=14, sampling_ratio=2),
                mask_head=MaskRCNNHeads(fpn_channels, [width] * 4, 1),
                mask_predictor=MaskRCNNPredictor(width, width, num_classes),
            )
            model = MaskRCNN(features, None, **kwargs)
    elif arch == 'retinanet':
        model = RetinaNet(features, num_classes, anchor_generator=anchors, **kwargs)
    else:
        model = FCOS(features, num_classes, anchor_generator=anchors, **kwargs)

    cfg: Dict[str, Any] = dict(
        task='detection', arch=arch, backbone=backbone, num_classes=num_classes, dense_cfg=dense_cfg,
        trainable_stages=trainable_stages, frozen_bn=frozen_bn, fpn_channels=fpn_channels)
    if representation_size is not None:
        cfg['representation_size'] = representation_size
    if mask_head_channels is not None:
        cfg['mask_head_channels'] = mask_head_channels
    cfg.update(detector_kwargs)
    model.attnzoo_cfg = cfg
    if checkpoint is not None:
        load_detection_checkpoint(model, checkpoint)
    return model

