"""nn.Modules shared by the backbones: attention blocks, MLPs, stems and downsamplers."""
from .agent import AgentAttention, AgentBlock, ShiftedWindowAttention, ShiftedWindowBlock, SwinPatchMerging
from .conv import ConvNorm, ConvPosEnc, NormLinear, Residual
from .dual_attention import ChannelAttention, ChannelBlock, DualAttentionBlock, SpatialBlock, WindowAttention
from .hilo import DeformableConv2d, DeformableDownsample, DWConvMlp, DWConvMlpBlock, HiLoAttention, HiLoBlock
from .lka import DWConvMlp2d, LargeKernelAttention, LKABlock, LKASpatialAttention
from .neighborhood import ConvNormDownsample, DoubleConvStem, NeighborhoodAttention2d, NeighborhoodAttentionBlock
from .single_head import ConvFFN, SingleHeadAttention, SingleHeadBlock
from .stems import ConvNormStem, NormConvDownsample, PatchMerging, PatchStem
from .super_token import ResidualDWMlp, SuperTokenAttention, SuperTokenBlock

__all__ = [
    'AgentAttention', 'AgentBlock', 'ShiftedWindowAttention', 'ShiftedWindowBlock', 'SwinPatchMerging',
    'ConvNorm', 'ConvPosEnc', 'NormLinear', 'Residual',
    'ChannelAttention', 'ChannelBlock', 'DualAttentionBlock', 'SpatialBlock', 'WindowAttention',
    'DeformableConv2d', 'DeformableDownsample', 'DWConvMlp', 'DWConvMlpBlock', 'HiLoAttention', 'HiLoBlock',
    'DWConvMlp2d', 'LargeKernelAttention', 'LKABlock', 'LKASpatialAttention',
    'ConvNormDownsample', 'DoubleConvStem', 'NeighborhoodAttention2d', 'NeighborhoodAttentionBlock',
    'ConvFFN', 'SingleHeadAttention', 'SingleHeadBlock',
    'ConvNormStem', 'NormConvDownsample', 'PatchMerging', 'PatchStem',
    'ResidualDWMlp', 'SuperTokenAttention', 'SuperTokenBlock',
]
