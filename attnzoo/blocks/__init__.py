"""nn.Modules shared by the backbones: attention blocks, MLPs, stems and downsamplers."""
from .conv import ConvNorm, ConvPosEnc, NormLinear, Residual
from .dual_attention import ChannelAttention, ChannelBlock, DualAttentionBlock, SpatialBlock, WindowAttention
from .single_head import ConvFFN, SingleHeadAttention, SingleHeadBlock
from .stems import ConvNormStem, NormConvDownsample, PatchMerging, PatchStem

__all__ = [
    'ConvNorm', 'ConvPosEnc', 'NormLinear', 'Residual',
    'ChannelAttention', 'ChannelBlock', 'DualAttentionBlock', 'SpatialBlock', 'WindowAttention',
    'ConvFFN', 'SingleHeadAttention', 'SingleHeadBlock',
    'ConvNormStem', 'NormConvDownsample', 'PatchMerging', 'PatchStem',
]
