"""Dense-prediction heads and necks, NCHW in and out.

mmsegmentation's decode heads as the papers trained them on ADE20K (``UPerHead``, ``FCNHead``,
``FPNHead``), the FPN neck of mmseg / mmdet (with the transposed-conv levels SHViT's dense code adds
below its finest input) and ViTDet's simple feature pyramid for a plain ViT. Module and parameter
names are mmseg's and mmcv's (``ConvModule``'s ``conv`` / ``bn``, ``psp_modules``, ``lateral_convs``,
``fpn_convs``, ``fpn_bottleneck``, ``conv_seg``...), so the state dicts of the papers' released ADE20K
checkpoints load as they are; initialisation follows mmcv (Kaiming fan-out for conv-BN-ReLU, Xavier
for the FPN neck, N(0, 0.01) for the classifier). torchvision has an FPN, but neither mmseg's names
nor the transposed-conv levels, and no UPerNet / Semantic FPN head.
"""
from typing import List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d

__all__ = ['ConvModule', 'PPM', 'UPerHead', 'FCNHead', 'FPNHead', 'FPN', 'SimpleFeaturePyramid']


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize with ``align_corners=False``, the setting of every paper's config."""
    return F.interpolate(x, size=tuple(size), mode='bilinear', align_corners=False)


class ConvModule(nn.Module):
    """mmcv's ConvModule: conv, then optional BatchNorm (``bn``) and ReLU. NCHW.

    With a norm the conv has no bias (mmcv's ``bias='auto'``). Kaiming-normal fan-out weights, as mmcv
    initialises them; the norm starts at weight one, bias zero.
    """

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: int,
            padding: int = 0,
            dilation: int = 1,
            norm: bool = True,
            act: bool = True,
    ):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=not norm)
        self.bn = nn.BatchNorm2d(out_channels) if norm else None
        self.activate = nn.ReLU(inplace=True) if act else None
        nn.init.kaiming_normal_(self.conv.weight, mode='fan_out', nonlinearity='relu')
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.activate is not None:
            x = self.activate(x)
        return x


class _DecodeHead(nn.Module):
    """mmseg's BaseDecodeHead classifier: Dropout2d, then a 1x1 conv to the classes (``conv_seg``)."""

    def _init_classifier(self, channels: int, num_classes: int, dropout_ratio: float) -> None:
        if num_classes < 1:
            raise ValueError(f'a decode head needs num_classes >= 1, got {num_classes}')
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else None
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def cls_seg(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            x = self.dropout(x)
        return self.conv_seg(x)


class PPM(nn.ModuleList):
    """Pyramid pooling: average pools to each of ``pool_scales`` squares, ConvModule 1x1 each,
    upsampled back to the input's size. NCHW in, a list of NCHW maps out (mmseg's names)."""

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int, norm: bool = True):
        super().__init__([
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvModule(in_channels, channels, 1, norm=norm))
            for scale in pool_scales])

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return [_resize(ppm(x), x.shape[2:]) for ppm in self]


class UPerHead(_DecodeHead):
    """UPerNet's head (Xiao et al., 2018) as mmseg builds it, the decode head of the papers' ADE20K runs.

    Pyramid pooling (1, 2, 3, 6) on the coarsest map, an FPN top-down path over every level, 3x3
    convs, all levels upsampled to the finest and fused by a 3x3 conv, then Dropout2d and the 1x1
    classifier. Every conv is conv-BN-ReLU with ``channels`` outputs (512 in the papers).

    Input: a list of NCHW maps, finest first, with ``in_channels`` channels; output: logits
    ``(B, num_classes, h, w)`` at the finest map's size.
    """

    def __init__(
            self,
            in_channels: Sequence[int],
            num_classes: int,
            channels: int = 512,
            pool_scales: Sequence[int] = (1, 2, 3, 6),
            dropout_ratio: float = 0.1,
            norm: bool = True,
    ):
        super().__init__()
        self.in_channels = list(in_channels)
        self.psp_modules = PPM(pool_scales, self.in_channels[-1], channels, norm=norm)
        self.bottleneck = ConvModule(
            self.in_channels[-1] + len(pool_scales) * channels, channels, 3, padding=1, norm=norm)
        self.lateral_convs = nn.ModuleList([ConvModule(c, channels, 1, norm=norm) for c in self.in_channels[:-1]])
        self.fpn_convs = nn.ModuleList([
            ConvModule(channels, channels, 3, padding=1, norm=norm) for _ in self.in_channels[:-1]])
        self.fpn_bottleneck = ConvModule(len(self.in_channels) * channels, channels, 3, padding=1, norm=norm)
        self._init_classifier(channels, num_classes, dropout_ratio)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(inputs) != len(self.in_channels):
            raise ValueError(f'UPerHead expects {len(self.in_channels)} maps, got {len(inputs)}')
        top = inputs[-1]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        laterals.append(self.bottleneck(torch.cat([top, *self.psp_modules(top)], dim=1)))
        # top-down: each level gets the upsampled sum of the coarser ones
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[2:]
        outs = [outs[0]] + [_resize(x, size) for x in outs[1:]]
        return self.cls_seg(self.fpn_bottleneck(torch.cat(outs, dim=1)))


class FCNHead(_DecodeHead):
    """mmseg's FCNHead, the papers' auxiliary head: ``num_convs`` conv-BN-ReLU (3x3, ``channels``),
    optionally concatenated with the input and fused (``concat_input``), Dropout2d, 1x1 classifier.

    Input: one NCHW map with ``in_channels`` channels (or a list, of which ``in_index`` is taken);
    output: logits at that map's size.
    """

    def __init__(
            self,
            in_channels: int,
            num_classes: int,
            channels: int = 256,
            num_convs: int = 1,
            kernel_size: int = 3,
            concat_input: bool = False,
            dropout_ratio: float = 0.1,
            in_index: int = 2,
            norm: bool = True,
    ):
        super().__init__()
        if num_convs < 1:
            raise ValueError(f'FCNHead needs at least one conv, got num_convs={num_convs}')
        self.in_index = in_index
        self.convs = nn.Sequential(*[
            ConvModule(in_channels if i == 0 else channels, channels, kernel_size, padding=kernel_size // 2, norm=norm)
            for i in range(num_convs)])
        self.conv_cat = ConvModule(
            in_channels + channels, channels, kernel_size, padding=kernel_size // 2, norm=norm,
        ) if concat_input else None
        self._init_classifier(channels, num_classes, dropout_ratio)

    def forward(self, inputs) -> torch.Tensor:
        x = inputs[self.in_index] if isinstance(inputs, (list, tuple)) else inputs
        feats = self.convs(x)
        if self.conv_cat is not None:
            feats = self.conv_cat(torch.cat([x, feats], dim=1))
        return self.cls_seg(feats)


class FPNHead(_DecodeHead):
    """The Semantic FPN head (Kirillov et al., 2019) as mmseg builds it.

    Each level goes through 3x3 conv-BN-ReLU (``channels``, 128 in the papers) and 2x bilinear
    upsampling, once per octave above the finest stride (at least one conv), the levels are summed
    at the finest resolution, then Dropout2d and the 1x1 classifier.

    Input: a list of NCHW maps at ``feature_strides`` (finest first); output: logits at the finest
    map's size.
    """

    def __init__(
            self,
            in_channels: Sequence[int],
            num_classes: int,
            channels: int = 128,
            feature_strides: Sequence[int] = (4, 8, 16, 32),
            dropout_ratio: float = 0.1,
            norm: bool = True,
    ):
        super().__init__()
        if len(in_channels) != len(feature_strides):
            raise ValueError('FPNHead needs one stride per input level')
        if min(feature_strides) != feature_strides[0]:
            raise ValueError(f'FPNHead takes the finest level first, got strides {tuple(feature_strides)}')
        self.feature_strides = list(feature_strides)
        self.scale_heads = nn.ModuleList()
        for i, stride in enumerate(feature_strides):
            octaves = max(1, (stride // feature_strides[0]).bit_length() - 1)
            layers: List[nn.Module] = []
            for k in range(octaves):
                layers.append(ConvModule(in_channels[i] if k == 0 else channels, channels, 3, padding=1, norm=norm))
                if stride != feature_strides[0]:
                    layers.append(nn.Upsample(scale_factor=2, mode='bilinear', align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self._init_classifier(channels, num_classes, dropout_ratio)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(inputs) != len(self.scale_heads):
            raise ValueError(f'FPNHead expects {len(self.scale_heads)} maps, got {len(inputs)}')
        out = self.scale_heads[0](inputs[0])
        for head, x in zip(self.scale_heads[1:], inputs[1:]):
            # maps whose side is not a power-of-two multiple land on the finest size by a resize
            out = out + _resize(head(x), out.shape[2:])
        return self.cls_seg(out)


class FPN(nn.Module):
    """The FPN neck of mmseg / mmdet (Lin et al., 2017) with SHViT's transposed-conv levels.

    Lateral 1x1 convs to ``out_channels``, a top-down path (nearest upsampling to the finer map's
    size, added), a 3x3 conv per output level. ``num_extra_trans_convs`` adds levels below the finest
    input, as SHViT's dense neck (EfficientViTFPN) does: each a 2x2/2 transposed conv of the previous
    (finer) top-down map, then a 3x3 conv. Plain convs with bias, no norm: the papers' settings.

    Input: a list of NCHW maps, finest first; output: the list of maps, the transposed-conv levels
    first (finest first), then one per input level. ``out_indices`` picks the outputs to build and
    return; a 3x3 conv is only built for an input level that is returned.
    """

    def __init__(
            self,
            in_channels: Sequence[int],
            out_channels: int = 256,
            num_extra_trans_convs: int = 0,
            out_indices: Optional[Sequence[int]] = None,
    ):
        super().__init__()
        self.in_channels = list(in_channels)
        self.num_extra_trans_convs = num_extra_trans_convs
        num_outs = num_extra_trans_convs + len(self.in_channels)
        self.out_indices = list(range(num_outs)) if out_indices is None else list(out_indices)
        if not self.out_indices or any(not 0 <= i < num_outs for i in self.out_indices):
            raise ValueError(f'FPN out_indices must be in [0, {num_outs}), got {out_indices}')
        # every conv sits under `.conv`, as in mmcv's ConvModule (here without norm or activation)
        self.lateral_convs = nn.ModuleList([_ConvOnly(nn.Conv2d(c, out_channels, 1)) for c in self.in_channels])
        # an input level whose output is not taken needs no 3x3 conv; its lateral still feeds the finer levels
        self.fpn_convs = nn.ModuleList([
            _ConvOnly(nn.Conv2d(out_channels, out_channels, 3, padding=1))
            if num_extra_trans_convs + i in self.out_indices else nn.Identity()
            for i in range(len(self.in_channels))])
        self.extra_trans_convs = nn.ModuleList([
            _ConvOnly(nn.ConvTranspose2d(out_channels, out_channels, 2, stride=2))
            for _ in range(num_extra_trans_convs)])
        self.extra_fpn_convs = nn.ModuleList([
            _ConvOnly(nn.Conv2d(out_channels, out_channels, 3, padding=1)) for _ in range(num_extra_trans_convs)])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.ConvTranspose2d):
                # mmcv's default (msra) init of the transposed ConvModule
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                nn.init.zeros_(m.bias)

    def forward(self, inputs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        if len(inputs) != len(self.in_channels):
            raise ValueError(f'FPN expects {len(self.in_channels)} maps, got {len(inputs)}')
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        for i in range(len(laterals) - 1, 0, -1):
            coarser = F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode='nearest')
            laterals[i - 1] = laterals[i - 1] + coarser
        outs = []
        finer = laterals[0]
        for trans, conv in zip(self.extra_trans_convs, self.extra_fpn_convs):
            finer = trans(finer)
            outs.insert(0, conv(finer))
        outs += [conv(x) for conv, x in zip(self.fpn_convs, laterals)]
        return [outs[i] for i in self.out_indices]


class _ConvOnly(nn.Module):
    """A conv under the name ``conv``: mmcv's ConvModule without norm or activation."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid (Li et al., 2022): four levels from one stride-16 ViT map.

    Per level: x4 by two 2x2/2 transposed convs (LayerNorm and GELU between, channels halved twice),
    x2 by one (channels halved), x1 as is, x1/2 by 2x2 max pooling; then a 1x1 and a 3x3 conv to
    ``out_channels``, each without bias and followed by a channels-first LayerNorm (detectron2's
    ``norm='LN'``). Module names are detectron2's (``simfp_2`` .. ``simfp_5``).

    Input: one NCHW map ``(B, dim, h, w)`` (or a list of them, of which the last is taken); output:
    four maps at 4x, 2x, 1x and 1/2x its size.
    """

    def __init__(self, dim: int, out_channels: int = 256, scale_factors: Sequence[float] = (4., 2., 1., .5)):
        super().__init__()
        self.scale_factors = tuple(scale_factors)
        for i, scale in enumerate(self.scale_factors):
            if scale == 4.:
                layers = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), LayerNorm2d(dim // 2), nn.GELU(),
                          nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2)]
                width = dim // 4
            elif scale == 2.:
                layers, width = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)], dim // 2
            elif scale == 1.:
                layers, width = [], dim
            elif scale == .5:
                layers, width = [nn.MaxPool2d(2, stride=2)], dim
            else:
                raise ValueError(f'scale factor {scale} is not one of 4, 2, 1, 0.5')
            layers += [nn.Conv2d(width, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                       nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels)]
            self.add_module(f'simfp_{i + 2}', nn.Sequential(*layers))

    def forward(self, x: Union[torch.Tensor, Sequence[torch.Tensor]]) -> List[torch.Tensor]:
        if not isinstance(x, torch.Tensor):  # a backbone's list of intermediates: ViTDet reads the last
            x = x[-1]
        return [getattr(self, f'simfp_{i + 2}')(x) for i in range(len(self.scale_factors))]
