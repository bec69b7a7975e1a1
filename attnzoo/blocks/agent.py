"""Agent attention (Agent-Swin / Agent-PVT / Agent-DeiT) and the Swin window-attention block it mixes with.

Every attention module here takes tokens ``(B, P + H * W, C)``: ``P`` prefix tokens (a class token;
none for the hierarchical models) followed by an ``H x W`` map in row-major order, together with
the map size ``(H, W)``. The blocks are pre-norm transformer blocks on the same layout.
"""
import math
from typing import Callable, Dict, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, register_notrace_module, to_2tuple, trunc_normal_

from attnzoo.kernels import agent_attention
from attnzoo.kernels.attention_products import attention_products, products_for_inference

from .conv import DepthwiseConv2d
from .norm import PreNorm

__all__ = [
    'AgentAttention', 'ShiftedWindowAttention', 'MultiHeadSelfAttention',
    'TokenBlock', 'AgentBlock', 'ShiftedWindowBlock', 'SelfAttentionBlock',
    'SwinPatchMerging', 'resize_agent_bias',
]

Size = Tuple[int, int]


def _resize(grid: torch.Tensor, size: Size) -> torch.Tensor:
    """Bilinear resize of the last two dims of a ``(N, C, h, w)`` grid; the grid itself when it fits already."""
    if grid.shape[-2] == size[0] and grid.shape[-1] == size[1]:
        return grid
    return F.interpolate(grid, size=size, mode='bilinear', align_corners=False)


# its forward checks the token count and resizes the position biases by the map size: a leaf when FX
# traces (timm's FX feature extraction)
@register_notrace_module
class AgentAttention(nn.Module):
    """Agent attention: agents pooled from the queries attend to the keys, then the queries attend to the agents.

    ``out = proj(softmax(s q A^T + B_qa) softmax(s A k^T + B_ak) v + dwconv3x3(v))``, ``s = head_dim ** -0.5``,
    where the agents ``A`` are the queries average-pooled to an ``agent_num``-token grid (``sqrt(agent_num)``
    on a side).
    The position biases are learned grids stored at one size, set once: a 7x7 grid per agent (the
    ``an`` and ``na`` biases) and separable row/column grids at ``bias_size``, the feature size at the
    training resolution (``ah``/``aw`` and ``ha``/``wa``). At any other feature size they are resized
    bilinearly, as the official dense-prediction code does; at ``bias_size`` this is exactly the
    classification code. With ``class_token`` the first token is a class token: it is a key and a
    query with its own learned biases (``ac``, ``ca``), is not pooled into agents and gets no
    depthwise-conv term (Agent-DeiT).

    ``agent_shape`` pools the queries to another agent grid than the stored ``agent_num`` one (the
    official dense code's ``downstream_agent_shape``, e.g. 12x12 agents from the 3x3 grid of an
    ImageNet model): the biases' agent grid is then resized bilinearly in the forward pass, after
    their spatial resize, as that code does, and no parameter changes shape.

    Tokens ``(B, P + H * W, C)`` in and out (``P`` = 1 with a class token, else 0), with the map size.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            agent_num: int = 49,
            bias_size: Union[int, Size] = 14,
            class_token: bool = False,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            agent_shape: Optional[Size] = None,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not a multiple of num_heads {num_heads}')
        pool = math.isqrt(agent_num)
        if pool * pool != agent_num:
            raise ValueError(f'agent_num must be a square number (the agents form a grid), got {agent_num}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        # the biases are stored for a pool x pool grid of agent_num agents; the queries are pooled
        # to agent_grid, that grid unless a downstream agent shape is given
        self.bias_agent_grid = (pool, pool)
        self.agent_grid = tuple(agent_shape) if agent_shape is not None else (pool, pool)
        self.agent_num = self.agent_grid[0] * self.agent_grid[1]
        self.num_prefix_tokens = 1 if class_token else 0
        bh, bw = to_2tuple(bias_size)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = DepthwiseConv2d(dim, 3)
        # official names; the row/column grids drop the official leading singleton dim (torch cannot
        # convert a 5-D parameter to channels_last), which resize_agent_bias restores on loading
        self.an_bias = nn.Parameter(torch.zeros(num_heads, agent_num, 7, 7))
        self.na_bias = nn.Parameter(torch.zeros(num_heads, agent_num, 7, 7))
        self.ah_bias = nn.Parameter(torch.zeros(num_heads, agent_num, bh, 1))
        self.aw_bias = nn.Parameter(torch.zeros(num_heads, agent_num, 1, bw))
        self.ha_bias = nn.Parameter(torch.zeros(num_heads, bh, 1, agent_num))
        self.wa_bias = nn.Parameter(torch.zeros(num_heads, 1, bw, agent_num))
        biases = [self.an_bias, self.na_bias, self.ah_bias, self.aw_bias, self.ha_bias, self.wa_bias]
        if class_token:
            self.ac_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, 1))
            self.ca_bias = nn.Parameter(torch.zeros(1, num_heads, 1, agent_num))
            biases += [self.ac_bias, self.ca_bias]
        else:
            self.register_parameter('ac_bias', None)
            self.register_parameter('ca_bias', None)
        for bias in biases:
            trunc_normal_(bias, std=.02)

    def _resize_agents(self, bias: torch.Tensor) -> torch.Tensor:
        """``(heads, n_stored, L)`` to ``(heads, n, L)``: the agent grid resized bilinearly, as the official
        dense code resizes it (to ``downstream_agent_shape``); the bias itself when the grids agree."""
        if self.agent_grid == self.bias_agent_grid:
            return bias
        heads, _, length = bias.shape
        grid = bias.reshape(heads, self.bias_agent_grid[0], self.bias_agent_grid[1], length).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=self.agent_grid, mode='bilinear', align_corners=False)
        return grid.reshape(heads, length, self.agent_num).transpose(1, 2)

    def position_biases(self, size: Size) -> Tuple[torch.Tensor, torch.Tensor]:
        """The agent-to-key bias ``(heads, n, P + H*W)`` and query-to-agent bias ``(heads, P + H*W, n)`` at ``size``.

        Computed on every call (4 % of Agent-PVT-T's and 7 % of Agent-Swin-T's batch-1 forward on a
        CPU). Not kept between calls: a write through ``.data`` changes a parameter without a trace
        (no version bump), and a kept bias would then be stale.
        """
        heads, n = self.num_heads, self.bias_agent_grid[0] * self.bias_agent_grid[1]
        # (heads, n, H, W): agent a's bias towards map position (i, j), in both directions; the two
        # directions are resized together (one interpolation per grid size keeps compiled graphs small)
        grids = _resize(torch.cat([self.an_bias, self.na_bias]), size)
        rows_cols = torch.cat([self.ah_bias + self.aw_bias, (self.ha_bias + self.wa_bias).permute(0, 3, 1, 2)])
        both = grids + _resize(rows_cols, size)
        to_keys, to_agents = both[:heads], both[heads:]  # halves by index: TorchScript cannot unpack chunk's list
        agent_bias = to_keys.reshape(heads, n, -1)
        query_bias = to_agents.reshape(heads, n, -1).transpose(1, 2)
        # tests of None, which TorchScript decides when compiling: a model without a class token
        # has no class-token biases to compile
        if self.ac_bias is not None:
            agent_bias = torch.cat([self.ac_bias[0], agent_bias], dim=2)
        if self.ca_bias is not None:
            query_bias = torch.cat([self.ca_bias[0], query_bias], dim=1)
        return self._resize_agents(agent_bias), self._resize_agents(query_bias.transpose(1, 2)).transpose(1, 2)

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        B, N, C = x.shape
        H, W = size
        P = self.num_prefix_tokens
        if N != P + H * W:
            raise ValueError(f'AgentAttention expects {P} + {H} * {W} tokens, got {N}')
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).unbind(2)
        q_map = q[:, P:].reshape(B, H, W, C).permute(0, 3, 1, 2)
        agents = F.adaptive_avg_pool2d(q_map, self.agent_grid).flatten(2).transpose(1, 2)
        agents = agents.reshape(B, self.agent_num, self.num_heads, self.head_dim)
        agent_bias, query_bias = self.position_biases((H, W))
        x = agent_attention(q, k, v, agents, agent_bias, query_bias, self.scale).reshape(B, N, C)
        # the depthwise conv over the value map is the term that restores feature diversity
        v_map = v[:, P:].reshape(B, H, W, C).permute(0, 3, 1, 2)
        local = self.dwc(v_map).flatten(2).transpose(1, 2)
        if P:
            x = torch.cat([x[:, :P], x[:, P:] + local], dim=1)
        else:
            x = x + local
        return self.proj_drop(self.proj(x))


# its forward pads, shifts and masks by the map size: a leaf when FX traces (timm's FX feature extraction)
@register_notrace_module
class ShiftedWindowAttention(nn.Module):
    """Swin's window attention (W-MSA / SW-MSA) with relative position bias, at any map size.

    Tokens ``(B, H * W, C)`` in and out, with the map size. The map is zero-padded on the right and
    bottom to whole windows, cyclically shifted by ``shift_size`` for SW-MSA (pairs of positions
    from different regions of the shifted map get a -100 logit, as in the original), attended per
    window, and shifted back and cropped. Along a side no longer than the window, the window is
    that side and there is no shift: the classification code's rule for small maps, which Agent-Swin
    relies on (its B blocks meet a 7x7 map in the last stage at 224). ``clamp_window=False`` drops
    that rule, as the official dense code does: such a side is padded to a whole window and shifted.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            window_size: int = 7,
            shift_size: int = 0,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            clamp_window: bool = True,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not a multiple of num_heads {num_heads}')
        if not 0 <= shift_size < window_size:
            raise ValueError(f'shift_size must be in [0, window_size), got {shift_size} for window {window_size}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.window_size = window_size
        self.shift_size = shift_size
        self.clamp_window = clamp_window
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        trunc_normal_(self.relative_position_bias_table, std=.02)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def relative_position_bias(self, wh: int, ww: int) -> torch.Tensor:
        """``(heads, wh*ww, wh*ww)``: the table's entries for every pair of positions of a wh x ww window."""
        device = self.relative_position_bias_table.device
        ys, xs = torch.meshgrid(torch.arange(wh, device=device), torch.arange(ww, device=device), indexing='ij')
        ys, xs = ys.flatten(), xs.flatten()
        # offsets shifted to start at 0, row-major in the (2w-1) x (2w-1) table
        rel_y = ys[:, None] - ys[None, :] + self.window_size - 1
        rel_x = xs[:, None] - xs[None, :] + self.window_size - 1
        index = rel_y * (2 * self.window_size - 1) + rel_x
        return self.relative_position_bias_table[index].permute(2, 0, 1)

    @staticmethod
    def _regions(length: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
        # which of the (up to) three strips of the shifted, padded axis each position came from
        pos = torch.arange(length, device=device)
        if not shift:
            return torch.zeros_like(pos)
        return (pos >= length - window).long() + (pos >= length - shift).long()

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        B, N, C = x.shape
        H, W = size
        if N != H * W:
            raise ValueError(f'ShiftedWindowAttention expects {H} * {W} tokens, got {N}')
        if self.clamp_window:
            wh, ww = min(self.window_size, H), min(self.window_size, W)
            sh = self.shift_size if H > self.window_size else 0
            sw = self.shift_size if W > self.window_size else 0
        else:
            wh = ww = self.window_size
            sh = sw = self.shift_size
        x = x.view(B, H, W, C)
        pad_b, pad_r = (wh - H % wh) % wh, (ww - W % ww) % ww
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = H + pad_b, W + pad_r
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        nh, nw = Hp // wh, Wp // ww
        x = x.view(B, nh, wh, nw, ww, C).transpose(2, 3).reshape(B * nh * nw, wh * ww, C)
        # (B * windows, heads, L, head_dim), 4-D as PyTorch's fused CPU attention wants it (a 5-D
        # batch runs the unfused path); the bias broadcasts over windows, the shift mask over heads
        L = wh * ww
        q, k, v = self.qkv(x).view(B * nh * nw, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_position_bias(wh, ww).to(q.dtype)[None]  # (1, heads, L, L)
        if sh or sw:
            ids = self._regions(Hp, wh, sh, x.device)[:, None] * 3 + self._regions(Wp, ww, sw, x.device)[None, :]
            ids = ids.view(nh, wh, nw, ww).transpose(1, 2).reshape(nh * nw, L)
            mask = (ids[:, :, None] != ids[:, None, :]).to(q.dtype) * -100.  # (windows, L, L)
            bias = bias + mask[:, None]  # (windows, heads, L, L)
        if products_for_inference(q, k, v, bias):
            # eager inference on CUDA: the explicit products, measured faster here than SDPA's
            # kernel for masked attention (attention_products); the batch a dim of its own, over
            # which the windows' bias broadcasts
            windows = (B, nh * nw, self.num_heads, L, -1)
            x = attention_products(q.view(windows), k.view(windows), v.view(windows), bias, self.scale).flatten(0, 1)
        else:
            if sh or sw:
                bias = bias.repeat(B, 1, 1, 1)  # (B * windows, heads, L, L): SDPA's batch is one dim
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        x = x.transpose(1, 2).reshape(B, nh, nw, wh, ww, C).transpose(2, 3).reshape(B, Hp, Wp, C)
        if sh or sw:
            x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
        if pad_b or pad_r:
            x = x[:, :H, :W]
        return self.proj_drop(self.proj(x.reshape(B, N, C)))


class MultiHeadSelfAttention(nn.Module):
    """Global multi-head self-attention over all tokens (the plain blocks of Agent-DeiT-B).

    Tokens ``(B, N, C)`` in and out; the map size is accepted for a uniform interface and unused.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_drop: float = 0.):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not a multiple of num_heads {num_heads}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, size: Optional[Size] = None) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class TokenBlock(nn.Module):
    """Pre-norm transformer block: ``x += attn(LN(x), size); x += MLP(LN(x))``.

    Tokens ``(B, N, C)`` in and out, with the map size passed on to the token mixer ``attn``.
    """

    def __init__(
            self,
            dim: int,
            attn: nn.Module,
            mlp_ratio: float = 4.,
            drop_path: float = 0.,
            proj_drop: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Callable[[int], nn.Module] = PreNorm,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), size))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class AgentBlock(TokenBlock):
    """The pre-norm block with agent attention (Agent-PVT, Agent-Swin's A blocks, Agent-DeiT). Tokens."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            agent_num: int = 49,
            bias_size: Union[int, Size] = 14,
            class_token: bool = False,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            agent_shape: Optional[Size] = None,
            **kwargs,
    ):
        attn = AgentAttention(
            dim, num_heads, agent_num=agent_num, bias_size=bias_size, class_token=class_token,
            qkv_bias=qkv_bias, proj_drop=proj_drop, agent_shape=agent_shape)
        super().__init__(dim, attn, proj_drop=proj_drop, **kwargs)


class ShiftedWindowBlock(TokenBlock):
    """Swin's block: pre-norm (shifted) window attention with relative position bias, then the MLP. Tokens."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            window_size: int = 7,
            shift_size: int = 0,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            clamp_window: bool = True,
            **kwargs,
    ):
        attn = ShiftedWindowAttention(
            dim, num_heads, window_size, shift_size, qkv_bias=qkv_bias, proj_drop=proj_drop, clamp_window=clamp_window)
        super().__init__(dim, attn, proj_drop=proj_drop, **kwargs)


class SelfAttentionBlock(TokenBlock):
    """The plain ViT block: pre-norm global multi-head self-attention, then the MLP. Tokens."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_drop: float = 0., **kwargs):
        attn = MultiHeadSelfAttention(dim, num_heads, qkv_bias, proj_drop)
        super().__init__(dim, attn, proj_drop=proj_drop, **kwargs)


# its forward pads odd map sizes: a leaf when FX traces (timm's FX feature extraction)
@register_notrace_module
class SwinPatchMerging(nn.Module):
    """Swin's downsampling: each 2x2 neighbourhood concatenated (4C), normed, projected to ``out_dim``.

    NHWC ``(B, H, W, C)`` in, ``(B, ceil(H/2), ceil(W/2), out_dim)`` out: odd sides are zero-padded
    on the right and bottom first, as the official dense code does.
    """

    def __init__(self, dim: int, out_dim: Optional[int] = None, norm_layer: Callable[[int], nn.Module] = PreNorm):
        super().__init__()
        out_dim = out_dim or 2 * dim
        self.norm = norm_layer(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        # concatenation order (0,0), (1,0), (0,1), (1,1) over (row, col) offsets, the original's
        x = x.reshape(B, x.shape[1] // 2, 2, x.shape[2] // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


# Where the agents are in each bias layout (the rest are heads and spatial sizes).
_ROW_COL = ('ah_bias', 'aw_bias', 'ha_bias', 'wa_bias')
_AGENT_DIM: Dict[str, int] = {
    'an_bias': 1, 'na_bias': 1, 'ah_bias': 1, 'aw_bias': 1, 'ha_bias': 3, 'wa_bias': 3, 'ac_bias': 2, 'ca_bias': 3,
}


def _linear_resize(t: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """Linear (align_corners=False) resize of one dim of ``t``: one axis of the bilinear resize used in forward."""
    moved = t.movedim(dim, -1)
    lead = moved.shape[:-1]
    # half-precision checkpoints are resized in float32
    flat = moved.reshape(1, -1, moved.shape[-1]).to(torch.promote_types(t.dtype, torch.float32))
    out = F.interpolate(flat, size=length, mode='linear', align_corners=False)
    return out.reshape(*lead, length).to(t.dtype).movedim(-1, dim)


def resize_agent_bias(name: str, value: torch.Tensor, shape: Tuple[int, ...]) -> torch.Tensor:
    """Resize a stored AgentAttention bias to another model's shape: its agent grid and its spatial grids.

    ``name`` is the parameter's key (its last part says the layout, e.g. ``...attn.ah_bias``). The
    agent dim is resized as the square grid it is, and every spatial dim linearly, which is the
    separable form of the bilinear resize the official dense code applies in its forward pass. The
    official 5-D row/column grids ``(1, heads, ...)`` are taken as the 4-D ones the model holds.
    """
    kind = name.rsplit('.', 1)[-1]
    if kind not in _AGENT_DIM:
        raise KeyError(f'{name} is not an agent attention bias')
    if kind in _ROW_COL and value.dim() == 5 and value.shape[0] == 1:
        value = value[0]
    if tuple(value.shape) == tuple(shape):
        return value
    if value.dim() != len(shape):
        raise ValueError(f'{name}: cannot resize {tuple(value.shape)} to {tuple(shape)}')
    agent_dim = _AGENT_DIM[kind]
    old, new = value.shape[agent_dim], shape[agent_dim]
    if old != new:
        g_old, g_new = math.isqrt(old), math.isqrt(new)
        if g_old ** 2 != old or g_new ** 2 != new:
            raise ValueError(f'{name}: agent counts must be square numbers, got {old} and {new}')
        grid = value.movedim(agent_dim, -1).unflatten(-1, (g_old, g_old))
        grid = _linear_resize(_linear_resize(grid, -2, g_new), -1, g_new)
        value = grid.flatten(-2).movedim(-1, agent_dim)
    for dim in range(value.dim()):
        if value.shape[dim] != shape[dim]:
            if value.shape[dim] == 1 or shape[dim] == 1 or dim == (1 if kind in ('ac_bias', 'ca_bias') else 0):
                raise ValueError(f'{name}: cannot resize {tuple(value.shape)} to {tuple(shape)}')
            value = _linear_resize(value, dim, shape[dim])
    return value
