"""nn.Modules shared by the backbones and the task heads: attention blocks, MLPs, stems, downsamplers and
the medical U-Nets' blocks (attention gates, PAM/CAM)."""
from .agent import AgentAttention, AgentBlock, ShiftedWindowAttention, ShiftedWindowBlock, SwinPatchMerging
from .conv import ConvNorm, ConvPosEnc, DepthwiseConv2d, NormLinear, Residual
from .dual_attention import ChannelAttention, ChannelBlock, DualAttentionBlock, SpatialBlock, WindowAttention
from .hilo import DeformableConv2d, DeformableDownsample, DWConvMlp, DWConvMlpBlock, HiLoAttention, HiLoBlock
from .lka import DWConvMlp2d, LargeKernelAttention, LKABlock, LKASpatialAttention
from .medical import (
    AttentionGate,
    ChannelAttentionModule,
    ConvBlock,
    DualAttentionBottleneck,
    GuidanceUpsample,
    PositionAttentionModule,
    UpConvBlock,
)
from .neighborhood import ConvNormDownsample, DoubleConvStem, NeighborhoodAttention2d, NeighborhoodAttentionBlock
from .norm import PreNorm
from .single_head import ConvFFN, SingleHeadAttention, SingleHeadBlock
from .stems import ConvNormStem, NormConvDownsample, PatchMerging, PatchStem
from .super_token import ResidualDWMlp, SuperTokenAttention, SuperTokenBlock

__all__ = [
    'AgentAttention', 'AgentBlock', 'ShiftedWindowAttention', 'ShiftedWindowBlock', 'SwinPatchMerging',
    'ConvNorm', 'ConvPosEnc', 'DepthwiseConv2d', 'NormLinear', 'Residual',
    'ChannelAttention', 'ChannelBlock', 'DualAttentionBlock', 'SpatialBlock', 'WindowAttention',
    'DeformableConv2d', 'DeformableDownsample', 'DWConvMlp', 'DWConvMlpBlock', 'HiLoAttention', 'HiLoBlock',
    'DWConvMlp2d', 'LargeKernelAttention', 'LKABlock', 'LKASpatialAttention',
    'AttentionGate', 'ChannelAttentionModule', 'ConvBlock', 'DualAttentionBottleneck', 'GuidanceUpsample',
    'PositionAttentionModule', 'UpConvBlock',
    'PreNorm',
    'ConvNormDownsample', 'DoubleConvStem', 'NeighborhoodAttention2d', 'NeighborhoodAttentionBlock',
    'ConvFFN', 'SingleHeadAttention', 'SingleHeadBlock',
    'ConvNormStem', 'NormConvDownsample', 'PatchMerging', 'PatchStem',
    'ResidualDWMlp', 'SuperTokenAttention', 'SuperTokenBlock',
]
