"""Medical models: attention-gated and dual-attention U-Nets (2D and 3D) and MEDUSA (classification).

``create_medical_model(arch, backbone=None, *, spatial_dims=2, in_chans=1, num_classes=2,
deep_supervision=True, multiscale_input=True, attention_guiding=False, **kwargs)`` builds:

``'agunet'`` / ``'daunet'``: the U-Nets of "Meningioma segmentation in T1-weighted MRI leveraging
global context and attention mechanisms" (Bouget et al. 2021, arXiv 2101.07715). The paper's
sentences and figures each part follows, with its published Keras code
(github.com/dbouget/mri_brain_tumor_segmentation, ``src/Models/UNet``):

* Backbone: "a U-Net architecture used as backbone", five levels of widths
  ``PAPER_CHANNELS = (16, 32, 128, 256, 256)``; each level is a "Conv3D block" (two 3x3x3 conv,
  batch norm, ReLU, spatial dropout), levels joined by 2x2x2 max pooling; the decoder mirrors the
  widths (256, 128, 32, 16), each level an "UpConv3D block" (transposed conv, batch norm, ReLU)
  concatenated with the skip and followed by a Conv3D block.
* AGUNet, "Attention-gated U-Net": an attention gate on every skip, gated by the up-convolved
  coarser decoder level, inner width half the level's (``blocks.medical.AttentionGate``,
  ``fusion='concat'`` as the paper's figure and code).
* DAUNet, "Dual Attention U-Net": PAM and CAM at the bottleneck (``DualAttentionBottleneck``).
  The paper's DAUNet (figure 2 and its code) has no attention gates on its skips, so
  ``attention_gates`` defaults to True for AGUNet and False for DAUNet; pass it to combine both.
* "multi-scale input": the input average-pooled to every level below the first, a 3x3x3 conv
  with ReLU on it (the level's width), concatenated with the max-pooled features entering the
  level (figure 1 shows it at every lower level, the bottleneck included; the published code
  leaves the bottleneck's out, 1.8M parameters fewer at the paper's widths).
* "deep supervision": a 1x1 conv to the classes on every decoder level; the paper sums one loss
  per level against the ground truth downsampled to that level. In training the model returns
  the list of logits, highest resolution first, each at its level's resolution: the input
  ``monai.losses.DeepSupervisionLoss`` takes (``weight_mode='same'`` sums the levels as the
  paper does; MONAI's default 'exp' halves each coarser level's weight). In eval it returns
  the full-resolution logits.
* "attention guiding" (figure 2, DAUNet): the bottleneck's output (after PAM/CAM where present)
  brought to every decoder level and concatenated there (``GuidanceUpsample``).
* "each concept can be seamlessly disabled for ablation studies": ``deep_supervision``,
  ``multiscale_input``, ``attention_guiding``, ``attention_gates`` and (for DAUNet)
  ``dual_attention`` switch each part on or off.

Where this differs from the paper's code: logits, not softmax, come out (the losses take
logits); the decoder normalises and activates the up-convolved maps before concatenation in
both architectures (the AGUNet's order; the paper's DAUNet code applies that batch norm and ReLU
after concatenation, to the skip and guide channels too); guidance is interpolated and convolved
rather than transposed-convolved with a stride larger than its kernel (see ``blocks.medical``).

3D (``spatial_dims=3``) uses the paper's plain conv encoder; 2D uses it too when ``backbone`` is
None, and otherwise a zoo backbone built by ``attnzoo.zoo.dense.create_dense_backbone`` (maps at
strides 4, 8, 16, 32) below two plain conv levels at strides 1 and 2 on the image (as UNETR takes
its full-resolution skip from convolutions on the input), so the decoder reaches full resolution
with skips all the way. With multi-scale input, each backbone level is concatenated with a conv of
the image average-pooled to its stride. Any input of at least ``model.min_input_size`` per
spatial axis works: it is zero-padded at the end of every axis to ``model.size_divisor`` and the
outputs cropped back. Inputs are channels-first, ``(B, in_chans, H, W)`` or ``(B, in_chans, D, H,
W)``, normalised by the caller (z-scored volumes, or the backbone's pretraining mean and std).

``'medusa'``: see ``MEDUSA``.
"""
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from attnzoo.blocks.medical import (
    AttentionGate,
    ConvBlock,
    ConvNormAct,
    DualAttentionBottleneck,
    GuidanceUpsample,
    UpConvBlock,
    avg_pool,
    conv_type,
)

from .dense import create_dense_backbone

__all__ = [
    'PAPER_CHANNELS', 'ConvEncoder', 'BackboneEncoder', 'DecoderLevel', 'AttentionUNet', 'MEDUSA',
    'create_medical_model',
]

# the meningioma paper's U-Net: five levels and their widths, bottleneck last
PAPER_CHANNELS: Tuple[int, ...] = (16, 32, 128, 256, 256)

_ARCHS = ('agunet', 'daunet', 'medusa')


def _max_pool(x: torch.Tensor) -> torch.Tensor:
    return (F.max_pool2d, F.max_pool3d)[x.dim() - 4](x, 2)


class ConvEncoder(nn.Module):
    """The paper's plain conv encoder: level i at stride 2**i, ``channels[i]`` wide, the last the bottleneck.

    Level 0 is a ConvBlock on the input; level i > 0 max-pools level i - 1 and, with
    ``multiscale_input``, concatenates a 3x3(x3) conv + ReLU of the input average-pooled by 2**i
    before its ConvBlock. ``forward`` maps ``(B, in_chans, *S)``, S divisible by 2**(levels - 1),
    to the list of the levels' maps, finest first.
    """

    def __init__(
            self,
            spatial_dims: int,
            in_chans: int,
            channels: Sequence[int] = PAPER_CHANNELS,
            multiscale_input: bool = True,
            drop_rate: float = 0.,
    ):
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f'the encoder needs at least two levels, got channels={tuple(channels)}')
        self.multiscale_input = multiscale_input
        self.pyramid = nn.ModuleList(
            [ConvNormAct(spatial_dims, in_chans, c, norm=False) for c in channels[1:]] if multiscale_input else [])
        levels = [ConvBlock(spatial_dims, in_chans, channels[0], drop_rate)]
        for prev, c in zip(channels[:-1], channels[1:]):
            levels.append(ConvBlock(spatial_dims, prev + (c if multiscale_input else 0), c, drop_rate))
        self.levels = nn.ModuleList(levels)
        self.out_channels: List[int] = list(channels)
        self.strides: List[int] = [2 ** i for i in range(len(channels))]
        self.min_padded_size = 1

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        feats = [self.levels[0](x)]
        pooled = x
        for i, level in enumerate(self.levels[1:]):
            h = _max_pool(feats[-1])
            if self.multiscale_input:
                pooled = avg_pool(pooled, 2)
                h = torch.cat([self.pyramid[i](pooled), h], 1)
            feats.append(level(h))
        return feats


class BackboneEncoder(nn.Module):
    """A 2D dense backbone (strides 4, 8, 16, 32) below two plain conv levels (strides 1, 2).

    The plain levels are the ``ConvEncoder``'s first two, ``stem_channels`` wide (the stride-2
    level with its multi-scale input); the backbone sees the image itself. With
    ``multiscale_input``, each backbone map is concatenated with a 3x3 conv + ReLU
    (``pyramid_channels`` wide) of the image average-pooled to the map's stride. ``forward`` maps
    ``(B, in_chans, H, W)``, H and W divisible by 32, to six maps, finest first.
    """

    def __init__(
            self,
            backbone: nn.Module,
            in_chans: int,
            stem_channels: Sequence[int] = (16, 32),
            multiscale_input: bool = True,
            pyramid_channels: int = 32,
            drop_rate: float = 0.,
    ):
        super().__init__()
        if list(backbone.strides) != [4, 8, 16, 32]:
            raise ValueError(f'the dense backbone must give strides 4, 8, 16, 32, got {list(backbone.strides)}')
        if len(stem_channels) != 2:
            raise ValueError(f'stem_channels are the widths at strides 1 and 2, got {tuple(stem_channels)}')
        self.stem = ConvEncoder(2, in_chans, stem_channels, multiscale_input, drop_rate)
        self.backbone = backbone
        self.multiscale_input = multiscale_input
        self.pyramid = nn.ModuleList(
            [ConvNormAct(2, in_chans, pyramid_channels, norm=False) for _ in backbone.strides]
            if multiscale_input else [])
        extra = pyramid_channels if multiscale_input else 0
        self.out_channels: List[int] = list(stem_channels) + [c + extra for c in backbone.out_channels]
        self.strides: List[int] = [1, 2] + list(backbone.strides)
        # inputs are padded to whole stride-32 cells, and never below what the backbone accepts
        self.min_padded_size = math.ceil(backbone.min_input_size / 32) * 32

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        feats = self.stem(x)
        for i, (f, stride) in enumerate(zip(self.backbone(x), self.backbone.strides)):
            if self.multiscale_input:
                f = torch.cat([self.pyramid[i](avg_pool(x, stride, 2)), f], 1)
            feats.append(f)
        return feats


class DecoderLevel(nn.Module):
    """One decoder level: up-convolve the coarser level, gate the skip, add guidance, ConvBlock.

    ``forward(x, skip, guide)``: ``x`` the coarser decoder level ``(B, in_channels, *s)``,
    ``skip`` ``(B, skip_channels, *2s)`` (or None at a level without one), ``guide`` the
    bottleneck's maps for attention guiding (or None); output ``(B, out_channels, *2s)``.
    """

    def __init__(
            self,
            spatial_dims: int,
            in_channels: int,
            skip_channels: int,
            out_channels: int,
            attention_gate: bool = True,
            gate_fusion: str = 'concat',
            guide_channels: int = 0,
            drop_rate: float = 0.,
    ):
        super().__init__()
        self.up = UpConvBlock(spatial_dims, in_channels, out_channels)
        self.gate = AttentionGate(
            spatial_dims, out_channels, skip_channels, max(out_channels // 2, 1), gate_fusion,
        ) if attention_gate and skip_channels else None
        self.guide = GuidanceUpsample(spatial_dims, guide_channels, out_channels) if guide_channels else None
        cat_channels = out_channels * (2 if guide_channels else 1) + skip_channels
        self.block = ConvBlock(spatial_dims, cat_channels, out_channels, drop_rate)

    def forward(
            self,
            x: torch.Tensor,
            skip: Optional[torch.Tensor] = None,
            guide: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        up = self.up(x)
        parts = [up]
        if skip is not None:
            parts.append(self.gate(up, skip) if self.gate is not None else skip)
        if self.guide is not None:
            parts.append(self.guide(guide, up.shape[2:]))
        return self.block(torch.cat(parts, 1))


def _pad_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Zero-pad the spatial axes of ``x`` at their end to ``size``."""
    pad: List[int] = []
    for have, want in zip(reversed(x.shape[2:]), reversed(size)):
        pad += [0, want - have]
    return F.pad(x, pad) if any(pad) else x


class AttentionUNet(nn.Module):
    """The AGUNet / DAUNet: an encoder, an optional dual-attention bottleneck, a gated decoder.

    ``encoder`` gives maps at strides 1, 2, 4, ... (``out_channels``, ``strides``), the last the
    bottleneck. ``decoder_channels`` are the decoder levels' widths, coarsest first, one per
    encoder level but the bottleneck. ``forward`` maps ``(B, in_chans, *S)`` to logits ``(B,
    num_classes, *S)``; in training with ``deep_supervision`` to the list of every decoder level's
    logits, highest resolution first, level k ``(B, num_classes, *ceil(S / 2**k))``.
    """

    def __init__(
            self,
            encoder: nn.Module,
            *,
            spatial_dims: int,
            in_chans: int,
            num_classes: int,
            decoder_channels: Optional[Sequence[int]] = None,
            attention_gates: bool = True,
            gate_fusion: str = 'concat',
            dual_attention: bool = False,
            attention_guiding: bool = False,
            deep_supervision: bool = True,
            drop_rate: float = 0.,
            attention_drop_rate: float = 0.5,
            min_input_size: int = 1,
            size_divisor: int = 1,
    ):
        super().__init__()
        enc_channels = list(encoder.out_channels)
        if list(encoder.strides) != [2 ** i for i in range(len(enc_channels))]:
            raise ValueError(f'encoder strides must be 1, 2, 4, ..., got {list(encoder.strides)}')
        if decoder_channels is None:
            decoder_channels = enc_channels[-2::-1]
        decoder_channels = list(decoder_channels)
        if len(decoder_channels) != len(enc_channels) - 1:
            raise ValueError(
                f'decoder_channels needs one width per encoder level but the bottleneck '
                f'({len(enc_channels) - 1}), got {tuple(decoder_channels)}')
        if num_classes < 1:
            raise ValueError(f'num_classes must be at least 1, got {num_classes}')
        self.spatial_dims = spatial_dims
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.deep_supervision = deep_supervision
        self.min_input_size = min_input_size
        self.size_divisor = size_divisor
        self.encoder = encoder
        bottom = enc_channels[-1]
        self.bottleneck = DualAttentionBottleneck(
            spatial_dims, bottom, attention_drop_rate) if dual_attention else nn.Identity()
        levels = []
        prev = bottom
        for skip, width in zip(enc_channels[-2::-1], decoder_channels):
            levels.append(DecoderLevel(
                spatial_dims, prev, skip, width, attention_gates, gate_fusion,
                bottom if attention_guiding else 0, drop_rate))
            prev = width
        self.decoder = nn.ModuleList(levels)
        conv = conv_type(spatial_dims)
        # one head per decoder level with deep supervision, coarsest first like the decoder
        head_widths = decoder_channels if deep_supervision else decoder_channels[-1:]
        self.heads = nn.ModuleList([conv(w, num_classes, 1) for w in head_widths])
        self.decoder_strides: List[int] = list(encoder.strides[-2::-1])

    def _check(self, x: torch.Tensor) -> None:
        name = type(self).__name__
        axes = ('D', 'H', 'W')[3 - self.spatial_dims:]
        layout = f"(B, {self.in_chans}, {', '.join(axes)})"
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(f'{name} expects {layout}, got a {x.dim()}-D tensor of shape {tuple(x.shape)}')
        if x.shape[1] != self.in_chans:
            raise ValueError(f'{name} expects {self.in_chans} input channels, {layout}, got shape {tuple(x.shape)}')
        if not x.is_floating_point():
            raise TypeError(f'{name} expects a floating-point input, got {x.dtype}')
        if min(x.shape[2:]) < self.min_input_size:
            raise ValueError(
                f"{name} needs {', '.join(axes)} of at least {self.min_input_size}, got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        self._check(x)
        size = x.shape[2:]
        d = self.size_divisor
        x = _pad_to(x, [max(math.ceil(s / d) * d, self.encoder.min_padded_size) for s in size])
        feats = self.encoder(x)
        bottom = self.bottleneck(feats[-1])
        h = bottom
        outs = []
        for level, skip in zip(self.decoder, feats[-2::-1]):
            h = level(h, skip, bottom)
            outs.append(h)
        if not (self.training and self.deep_supervision):
            return self._crop(self.heads[-1](outs[-1]), size, 1)
        logits = [self._crop(head(o), size, s) for head, o, s in zip(self.heads, outs, self.decoder_strides)]
        return logits[::-1]

    @staticmethod
    def _crop(y: torch.Tensor, size: Sequence[int], stride: int) -> torch.Tensor:
        return y[(Ellipsis, *[slice(0, math.ceil(s / stride)) for s in size])]


class MEDUSA(nn.Module):
    """MEDUSA-style classifier: one self-attention body whose multi-scale heads gate a backbone's stages.

    After "MEDUSA: Multi-scale Encoder-Decoder Self-Attention Deep Neural Network Architecture for
    Medical Image Analysis" (Aboutalebi et al. 2021, arXiv 2110.06063), whose architecture code is
    not public. What is built, and the sentences of the paper's abstract each part follows:

    * "a single, unified self-attention mechanism with significantly higher capacity": one body,
      ``self.body``, a plain conv U-Net (``ConvEncoder`` and gate-free ``DecoderLevel``s, widths
      ``body_channels``, finest first) over the image in grayscale (the luma of an RGB input,
      ITU-R 601 weights as torchvision's ``rgb_to_grayscale``; a one-channel input as is).
    * "multi-scale encoder-decoder self-attention": the body is an encoder-decoder and its maps are
      taken at several scales: at each stage's stride, the decoder level of that stride (the
      bottleneck at the coarsest; a stage coarser than the body's bottleneck takes the
      bottleneck).
    * "multiple attention heads feeding into different scales in the network architecture" /
      "single body, multi-scale heads": one head per backbone stage, ``self.heads[i]`` (3x3 conv,
      batch norm, ReLU, 1x1 conv to one channel), whose sigmoid map, resized to the stage's output,
      gates that output before the next stage takes it.
    * "explicit global context amongst selective attention at different levels of
      representational abstractions while still enabling differing local attention context at
      individual levels": the body is shared by all heads (the global context), each head has its
      own convolution (its local context), and the gated maps are the backbone's own stages.

    Choices of this implementation, not from the paper: the gate is residual, ``h * (1 + a)``
    with ``a`` in (0, 1) (the attention residual learning of Wang et al., "Residual Attention
    Network", CVPR 2017), so a pretrained backbone keeps its features where the attention is
    low; the heads' maps are single-channel (spatial attention); the body's depth and widths.

    ``backbone``: a staged timm classifier (every ``attnzoo`` family but Agent-DeiT, whose single
    scale has no stages to gate): its stem, its ``stages`` (NCHW in and out), its head.
    ``forward``: ``(B, in_chans, H, W)`` to logits ``(B, num_classes)``.
    """

    def __init__(
            self,
            backbone: nn.Module,
            *,
            in_chans: int,
            body_channels: Sequence[int] = (16, 32, 64, 128, 256, 256),
            multiscale_input: bool = True,
            drop_rate: float = 0.,
    ):
        super().__init__()
        if not all(hasattr(backbone, a) for a in ('stages', '_stem', '_head_features', 'forward_head')):
            raise ValueError(
                f'MEDUSA gates the stages of a staged backbone; {type(backbone).__name__} has no stages to gate')
        self.backbone = backbone
        self.in_chans = in_chans
        self.num_classes = backbone.num_classes
        self.stage_strides = [int(info['reduction']) for info in backbone.feature_info]
        encoder = ConvEncoder(2, 1, body_channels, multiscale_input, drop_rate)
        self.body_strides = encoder.strides
        # the decoder runs from the bottleneck down to the finest stage's stride, no finer
        finest = min(self.stage_strides)
        self.body_decoder = nn.ModuleList()
        prev = body_channels[-1]
        for skip, stride in zip(body_channels[-2::-1], encoder.strides[-2::-1]):
            if stride < finest:
                break
            self.body_decoder.append(DecoderLevel(2, prev, skip, skip, attention_gate=False, drop_rate=drop_rate))
            prev = skip
        self.body_encoder = encoder
        widths = {s: c for s, c in zip(encoder.strides, body_channels)}
        self.heads = nn.ModuleList([
            nn.Sequential(ConvNormAct(2, widths[self._body_stride(s)], widths[self._body_stride(s)]),
                          nn.Conv2d(widths[self._body_stride(s)], 1, 1))
            for s in self.stage_strides])
        self.size_divisor = encoder.strides[-1]

    def _body_stride(self, stage_stride: int) -> int:
        """The body level feeding the head of a stage at ``stage_stride``: the same stride, or the bottleneck."""
        return min(stage_stride, self.body_strides[-1])

    def _grayscale(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_chans == 3:
            w = x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            return (x * w).sum(1, keepdim=True)
        return x.mean(1, keepdim=True)

    def attention_maps(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The heads' sigmoid maps, one per stage, ``(B, 1, ceil(H / s), ceil(W / s))`` at the body's stride s."""
        size = x.shape[2:]
        d = self.size_divisor
        g = _pad_to(self._grayscale(x), [math.ceil(s / d) * d for s in size])
        feats = self.body_encoder(g)
        by_stride = {self.body_strides[-1]: feats[-1]}
        h = feats[-1]
        for level, skip, stride in zip(self.body_decoder, feats[-2::-1], self.body_strides[-2::-1]):
            h = level(h, skip)
            by_stride[stride] = h
        maps = []
        for head, stage_stride in zip(self.heads, self.stage_strides):
            s = self._body_stride(stage_stride)
            maps.append(AttentionUNet._crop(torch.sigmoid(head(by_stride[s])), size, s))
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f'MEDUSA expects (B, {self.in_chans}, H, W), got shape {tuple(x.shape)}')
        maps = self.attention_maps(x)
        h = self.backbone._stem(x)
        for stage, a in zip(self.backbone.stages, maps):
            h = stage(h)
            if a.shape[2:] != h.shape[2:]:
                a = F.interpolate(a, size=h.shape[2:], mode='bilinear', align_corners=False)
            h = h * (1 + a)
        return self.backbone.forward_head(self.backbone._head_features(h))


def _build_unet(
        arch: str,
        backbone: Optional[str],
        spatial_dims: int,
        in_chans: int,
        num_classes: int,
        deep_supervision: bool,
        multiscale_input: bool,
        attention_guiding: bool,
        *,
        channels: Optional[Sequence[int]] = None,
        decoder_channels: Optional[Sequence[int]] = None,
        stem_channels: Sequence[int] = (16, 32),
        pyramid_channels: int = 32,
        attention_gates: Optional[bool] = None,
        gate_fusion: str = 'concat',
        dual_attention: Optional[bool] = None,
        drop_rate: float = 0.,
        attention_drop_rate: float = 0.5,
        dense_cfg: Optional[str] = None,
        pretrained_backbone: bool = False,
        backbone_kwargs: Optional[Dict[str, Any]] = None,
) -> AttentionUNet:
    if attention_gates is None:
        attention_gates = arch == 'agunet'
    if dual_attention is None:
        dual_attention = arch == 'daunet'
    if backbone is None:
        channels = PAPER_CHANNELS if channels is None else tuple(channels)
        encoder = ConvEncoder(spatial_dims, in_chans, channels, multiscale_input, drop_rate)
        divisor = 2 ** (len(channels) - 1)
        min_size = divisor
    else:
        if spatial_dims != 2:
            raise ValueError(f'zoo backbones are 2D; a 3D {arch} takes backbone=None (the paper\'s conv encoder)')
        if channels is not None:
            raise ValueError('channels sets the plain conv encoder; with a backbone, set stem_channels')
        dense = create_dense_backbone(
            backbone, dense_cfg=dense_cfg, pretrained=pretrained_backbone, in_chans=in_chans,
            **(backbone_kwargs or {}))
        encoder = BackboneEncoder(dense, in_chans, stem_channels, multiscale_input, pyramid_channels, drop_rate)
        divisor, min_size = 32, 32
        if decoder_channels is None:
            decoder_channels = (256, 128, 64) + tuple(stem_channels[::-1])
    return AttentionUNet(
        encoder, spatial_dims=spatial_dims, in_chans=in_chans, num_classes=num_classes,
        decoder_channels=decoder_channels, attention_gates=attention_gates, gate_fusion=gate_fusion,
        dual_attention=dual_attention, attention_guiding=attention_guiding, deep_supervision=deep_supervision,
        drop_rate=drop_rate, attention_drop_rate=attention_drop_rate, min_input_size=min_size,
        size_divisor=divisor)


def _build_medusa(
        backbone: Optional[str],
        spatial_dims: int,
        in_chans: int,
        num_classes: int,
        multiscale_input: bool,
        attention_guiding: bool,
        *,
        body_channels: Sequence[int] = (16, 32, 64, 128, 256, 256),
        drop_rate: float = 0.,
        pretrained_backbone: bool = False,
        backbone_kwargs: Optional[Dict[str, Any]] = None,
) -> MEDUSA:
    if backbone is None:
        raise ValueError("'medusa' gates the stages of a zoo backbone: name one, e.g. backbone='az_van_b0'")
    if spatial_dims != 2:
        raise ValueError(f"'medusa' is a 2D classifier, got spatial_dims={spatial_dims}")
    if attention_guiding:
        raise ValueError("attention_guiding belongs to the U-Nets; 'medusa' has no decoder to guide")
    model = timm.create_model(
        backbone, pretrained=pretrained_backbone, num_classes=num_classes, in_chans=in_chans,
        **(backbone_kwargs or {}))
    return MEDUSA(
        model, in_chans=in_chans, body_channels=body_channels, multiscale_input=multiscale_input,
        drop_rate=drop_rate)


def create_medical_model(
        arch: str,
        backbone: Optional[str] = None,
        *,
        spatial_dims: int = 2,
        in_chans: int = 1,
        num_classes: int = 2,
        deep_supervision: bool = True,
        multiscale_input: bool = True,
        attention_guiding: bool = False,
        **kwargs: Any,
) -> nn.Module:
    """Build a medical model by name; ``model.attnzoo_cfg`` holds the arguments that rebuild it.

    ``arch``: 'agunet' or 'daunet' (segmentation U-Nets, 2D or 3D) or 'medusa' (2D classifier).
    ``backbone``: a zoo (or timm) model name: the 2D U-Nets' encoder (None: the paper's plain conv
    encoder, the only one in 3D), MEDUSA's gated classifier (required). ``in_chans``: image
    channels; 3-channel pretrained weights are adapted to it as timm does. ``num_classes``:
    segmentation classes (background included) or classes of the classifier.

    U-Net switches (see the module docstring): ``deep_supervision``, ``multiscale_input``,
    ``attention_guiding``; and in ``kwargs``: ``attention_gates`` (default: on for 'agunet', off
    for 'daunet'), ``dual_attention`` (default: on for 'daunet' only), ``gate_fusion``
    ('concat' | 'add'), ``channels`` (plain encoder widths, default ``PAPER_CHANNELS``),
    ``decoder_channels`` (coarsest first), ``stem_channels`` and ``pyramid_channels`` (with a
    backbone), ``drop_rate`` (spatial dropout in conv blocks), ``attention_drop_rate`` (0.5, the
    dual-attention bottleneck), ``dense_cfg``, ``pretrained_backbone``, ``backbone_kwargs``.
    MEDUSA takes ``multiscale_input`` (for its attention body), ``body_channels``, ``drop_rate``,
    ``pretrained_backbone``, ``backbone_kwargs``; a classifier has one output, so
    ``deep_supervision`` does not apply to it.
    """
    arch = arch.lower()
    if arch not in _ARCHS:
        raise ValueError(f'unknown medical arch {arch!r}; choose one of {_ARCHS}')
    if spatial_dims not in (2, 3):
        raise ValueError(f'spatial_dims must be 2 or 3, got {spatial_dims}')
    if arch == 'medusa':
        model = _build_medusa(backbone, spatial_dims, in_chans, num_classes, multiscale_input, attention_guiding,
                              **kwargs)
        switches = dict(multiscale_input=multiscale_input)
    else:
        model = _build_unet(arch, backbone, spatial_dims, in_chans, num_classes, deep_supervision,
                            multiscale_input, attention_guiding, **kwargs)
        switches = dict(deep_supervision=deep_supervision, multiscale_input=multiscale_input,
                        attention_guiding=attention_guiding)
    cfg: Dict[str, Any] = dict(
        task='medical', arch=arch, backbone=backbone, num_classes=num_classes, spatial_dims=spatial_dims,
        in_chans=in_chans, **switches)
    cfg.update({k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()
                if k not in ('pretrained_backbone', 'checkpoint')})
    model.attnzoo_cfg = cfg
    return model
