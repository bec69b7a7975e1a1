"""Agent attention: the reference op and the AgentAttention block against independent float64 transcriptions."""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from attnzoo.blocks import AgentAttention
from attnzoo.blocks.agent import resize_agent_bias
from attnzoo.kernels import agent_attention

from ..conftest import randomize_


def _softmax(logits):
    e = torch.exp(logits - logits.max())
    return e / e.sum()


def agent_attention_loops(q, k, v, agents, agent_bias, query_bias, scale):
    """The paper's two attentions, one agent and one query at a time.

    For every image b and head h:
      agent_v[a] = sum_m softmax_m(scale * <agents[a], k[m]> + agent_bias[h, a, m]) v[m]
      out[i]     = sum_a softmax_a(scale * <q[i], agents[a]> + query_bias[h, i, a]) agent_v[a]
    """
    B, N, heads, _ = q.shape
    M, n = k.shape[1], agents.shape[1]
    out = torch.empty(B, N, heads, v.shape[-1], dtype=q.dtype)
    for b in range(B):
        for h in range(heads):
            agent_v = []
            for a in range(n):
                logits = torch.stack([scale * agents[b, a, h].dot(k[b, m, h]) + agent_bias[h, a, m] for m in range(M)])
                p = _softmax(logits)
                agent_v.append(sum(p[m] * v[b, m, h] for m in range(M)))
            for i in range(N):
                logits = torch.stack([scale * q[b, i, h].dot(agents[b, a, h]) + query_bias[h, i, a] for a in range(n)])
                p = _softmax(logits)
                out[b, i, h] = sum(p[a] * agent_v[a] for a in range(n))
    return out


def _inputs(dtype=torch.float64, B=2, N=7, M=5, n=3, heads=2, d=4, dv=6):
    q, k, agents = torch.randn(B, N, heads, d), torch.randn(B, M, heads, d), torch.randn(B, n, heads, d)
    v = torch.randn(B, M, heads, dv)
    agent_bias, query_bias = torch.randn(heads, n, M), torch.randn(heads, N, n)
    return [t.to(dtype) for t in (q, k, v, agents, agent_bias, query_bias)]


def test_reference_equals_loops_float64_with_gradients():
    inputs = [t.requires_grad_() for t in _inputs()]
    out = agent_attention.reference(*inputs, scale=0.4)
    expected = agent_attention_loops(*inputs, scale=0.4)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(expected, inputs, grad)
    for g, w in zip(got, want):  # q, k, v, agents and both biases
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('rank', [3, 4])
@pytest.mark.parametrize('bias_dims', [3, 4])
def test_masks_of_either_rank_give_the_same_result_and_gradients(monkeypatch, rank, bias_dims):
    # the op gives SDPA 4-D masks on the CPU and 3-D ones on CUDA (compiled training); both, from
    # biases of either rank, must be the definition
    module = importlib.import_module('attnzoo.kernels.agent_attention')  # the op shadows its module
    monkeypatch.setattr(module, '_mask_rank', lambda device: rank)
    inputs = _inputs()
    if bias_dims == 4:
        inputs[4:] = [b[None] for b in inputs[4:]]
    inputs = [t.requires_grad_() for t in inputs]
    out = agent_attention(*inputs, scale=0.4)
    expected = agent_attention_loops(*inputs[:4], *(b.reshape(b.shape[-3:]) for b in inputs[4:]), scale=0.4)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='the failure is CUDA inductor\'s (efficient attention)')
def test_compiled_training_with_a_convolution_after_matches_eager_on_cuda():
    # inductor lays out 4-D tensors upstream of a convolution channels_last; a 4-D bias so laid out
    # made the efficient-attention backward fail in Agent-PVT-T (8 heads, 49 agents, 7x7 map)
    torch.manual_seed(0)
    size, dim = (7, 7), 64
    block = randomize_(AgentAttention(dim, 8, agent_num=49, bias_size=7)).cuda()
    conv = torch.nn.Conv2d(dim, dim, 3, padding=1, groups=dim).cuda()

    def step(x):
        with torch.autocast('cuda', torch.bfloat16):
            y = block(x, size).transpose(1, 2).reshape(x.shape[0], dim, *size)
            return conv(y.contiguous(memory_format=torch.channels_last)).float().square().mean()

    x = torch.randn(8, 49, dim, device='cuda')
    params = list(block.parameters()) + list(conv.parameters())
    want = torch.autograd.grad(step(x), params)
    got = torch.autograd.grad(torch.compile(step)(x), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2 * w.abs().max().item())


def test_float32_reference_against_float64():
    inputs = _inputs(B=2, N=40, M=40, n=9, heads=3, d=8, dv=8)
    expected = agent_attention_loops(*inputs, scale=8 ** -0.5)
    out = agent_attention(*[t.float() for t in inputs])  # default scale head_dim ** -0.5
    assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-5


def test_agents_equal_to_queries_is_two_chained_softmax_attentions():
    # With A = q (as many agents as tokens) and no biases, the definition reads
    #   out = softmax(s q q^T) (softmax(s q k^T) v)
    # i.e. the queries attend to themselves after attending to the keys: nothing in the op may
    # depend on agents being fewer than tokens.
    q, k, v = (torch.randn(2, 9, 3, 5, dtype=torch.float64) for _ in range(3))
    s = 0.3
    out = agent_attention(q, k, v, q, scale=s)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, N, d)
    agent_v = torch.softmax(s * qh @ kh.transpose(-1, -2), -1) @ vh
    expected = torch.softmax(s * qh @ qh.transpose(-1, -2), -1) @ agent_v
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=1e-12, atol=1e-12)


def test_block_with_one_agent_per_token_and_zero_biases():
    # An agent grid as large as the map makes the pooled agents the queries themselves; with every
    # bias zero the block computes proj(softmax(s q q^T) softmax(s q k^T) v + dwconv3x3(v)).
    H, W, dim, heads = 4, 4, 12, 3
    block = AgentAttention(dim, heads, agent_num=H * W, bias_size=(H, W)).double().eval()
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name.endswith('_bias'):
                p.zero_()
    x = torch.randn(2, H * W, dim, dtype=torch.float64)
    out = block(x, (H, W))
    q, k, v = block.qkv(x).view(2, H * W, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    s = (dim // heads) ** -0.5
    attn = torch.softmax(s * q @ q.transpose(-1, -2), -1) @ (torch.softmax(s * q @ k.transpose(-1, -2), -1) @ v)
    attn = attn.transpose(1, 2).reshape(2, H * W, dim)
    v_map = v.transpose(1, 2).reshape(2, H, W, dim).permute(0, 3, 1, 2)
    dwc = F.conv2d(v_map, block.dwc.weight, block.dwc.bias, padding=1, groups=dim).flatten(2).transpose(1, 2)
    expected = block.proj(attn + dwc)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def _bilinear_weights(size_in, size_out):
    """(size_out, size_in) matrix of 1-D linear interpolation with align_corners=False, from its formula."""
    w = torch.zeros(size_out, size_in, dtype=torch.float64)
    for o in range(size_out):
        src = max((o + 0.5) * size_in / size_out - 0.5, 0.)
        i0 = min(int(math.floor(src)), size_in - 1)
        i1 = min(i0 + 1, size_in - 1)
        lam = src - i0
        w[o, i0] += 1 - lam
        w[o, i1] += lam
    return w


def _resize_grid(grid, size):
    """Bilinear resize of the last two dims, as the product of two 1-D interpolations."""
    wh, ww = _bilinear_weights(grid.shape[-2], size[0]), _bilinear_weights(grid.shape[-1], size[1])
    return torch.einsum('oh,...hw,pw->...op', wh, grid, ww)


def agent_block_transcription(block, x, size):
    """AgentAttention written out from the paper and the official dense code, one position at a time.

    Agents: the query map averaged over adaptive pooling cells. Biases: each grid resized to the
    map by bilinear interpolation (the 7x7 grids and the row/column grids summed at their stored
    size). The class token (first token) gets the ac/ca biases and no depthwise-conv term.
    """
    B, N, C = x.shape
    H, W = size
    heads, d = block.num_heads, C // block.num_heads
    P = block.num_prefix_tokens
    g = block.agent_grid[0]
    q, k, v = block.qkv(x).view(B, N, 3, heads, d).unbind(2)
    q_map = q[:, P:].reshape(B, H, W, heads, d)
    agents = torch.empty(B, g * g, heads, d, dtype=x.dtype)
    for i in range(g):
        for j in range(g):
            r0, r1 = (i * H) // g, -(-((i + 1) * H) // g)
            c0, c1 = (j * W) // g, -(-((j + 1) * W) // g)
            agents[:, i * g + j] = q_map[:, r0:r1, c0:c1].mean(dim=(1, 2))
    an = _resize_grid(block.an_bias, size) + _resize_grid(block.ah_bias + block.aw_bias, size)
    na = _resize_grid(block.na_bias, size) + _resize_grid((block.ha_bias + block.wa_bias).permute(0, 3, 1, 2), size)
    agent_bias = an.flatten(2)
    query_bias = na.flatten(2).transpose(1, 2)
    if P:
        agent_bias = torch.cat([block.ac_bias[0], agent_bias], 2)
        query_bias = torch.cat([block.ca_bias[0], query_bias], 1)
    out = agent_attention_loops(q, k, v, agents, agent_bias, query_bias, d ** -0.5).reshape(B, N, C)
    v_map = v[:, P:].reshape(B, H, W, C)
    v_pad = F.pad(v_map, (0, 0, 1, 1, 1, 1))
    wgt = block.dwc.weight[:, 0]  # (C, 3, 3)
    for i in range(H):
        for j in range(W):
            local = (v_pad[:, i:i + 3, j:j + 3] * wgt.permute(1, 2, 0)).sum(dim=(1, 2)) + block.dwc.bias
            out[:, P + i * W + j] = out[:, P + i * W + j] + local
    return block.proj(out)


@pytest.mark.parametrize('class_token', [False, True])
@pytest.mark.parametrize('size', [(4, 4), (5, 7)])
def test_block_against_transcription_at_training_and_other_sizes(class_token, size):
    dim, heads = 8, 2
    block = randomize_(AgentAttention(dim, heads, agent_num=4, bias_size=4, class_token=class_token)).double().eval()
    x = torch.randn(2, int(class_token) + size[0] * size[1], dim, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block(x, size), agent_block_transcription(block, x, size), rtol=1e-10, atol=1e-10)


def test_resized_biases_equal_the_dense_code_resizing_them_in_forward():
    # A block stored with 3x3 agents on a 4x5 map, resized once to 4x4 agents on a 6x7 map, must
    # give the biases the official dense code computes from the stored ones at every forward:
    # spatial bilinear resize to the map, then bilinear resize of the agent grid.
    small = randomize_(AgentAttention(8, 2, agent_num=9, bias_size=(4, 5))).double()
    big = AgentAttention(8, 2, agent_num=16, bias_size=(6, 7)).double()
    target = big.state_dict()
    big.load_state_dict({k: resize_agent_bias(k, v, target[k].shape) if k.endswith('_bias') and v.dim() > 1 else v
                         for k, v in small.state_dict().items()})
    heads, size, hw = 2, (6, 7), 42

    def agents_to_4x4(t):  # (heads, 9, hw) -> (heads, 16, hw), bilinear over the agent grid
        t = F.interpolate(t.reshape(heads, 3, 3, hw).permute(0, 3, 1, 2), size=(4, 4), mode='bilinear')
        return t.reshape(heads, hw, 16).permute(0, 2, 1)

    def spatial(t):
        return F.interpolate(t, size=size, mode='bilinear').reshape(heads, 9, hw)

    to_keys = agents_to_4x4(spatial(small.an_bias) + spatial(small.ah_bias + small.aw_bias))
    to_agents = agents_to_4x4(spatial(small.na_bias) + spatial((small.ha_bias + small.wa_bias).permute(0, 3, 1, 2)))
    agent_bias, query_bias = big.position_biases(size)
    torch.testing.assert_close(agent_bias, to_keys, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(query_bias, to_agents.transpose(1, 2), rtol=1e-12, atol=1e-12)


def test_bad_shapes_raise():
    q = torch.randn(1, 4, 2, 3)
    with pytest.raises(ValueError, match='agents'):
        agent_attention(q, q, q, torch.randn(1, 2, 3, 3))
    with pytest.raises(ValueError, match='4-D'):
        agent_attention(q[0], q, q, q)
    with pytest.raises(ValueError, match='square'):
        AgentAttention(8, 2, agent_num=8)


@pytest.mark.parametrize('rank', [3, 4])
def test_inference_products_equal_sdpa(monkeypatch, rank):
    # eager CUDA inference takes the explicit products (attention_products); forced on the CPU here,
    # they give SDPA's result, the biases broadcast as the op gives them (3-D on CUDA, 4-D on the CPU)
    module = importlib.import_module('attnzoo.kernels.agent_attention')  # the op shadows its module
    monkeypatch.setattr(module, '_mask_rank', lambda device: rank)
    inputs = _inputs()
    want = agent_attention(*inputs, scale=0.4)
    explicit, calls = importlib.import_module('attnzoo.kernels.attention_products').attention_products, []
    monkeypatch.setattr(module, 'products_for_inference', lambda *t: True)
    monkeypatch.setattr(module, 'attention_products', lambda *a, **kw: calls.append(1) or explicit(*a, **kw))
    torch.testing.assert_close(agent_attention(*inputs, scale=0.4), want, rtol=1e-12, atol=1e-12)
    assert len(calls) == 2
