"""The medical blocks against their definitions: MONAI's attention block, DANet's equations in
float64, and one implementation agreeing with itself across 2D and 3D."""
import pytest
import torch

from attnzoo.blocks.medical import (
    AttentionGate,
    ChannelAttentionModule,
    ConvBlock,
    DualAttentionBottleneck,
    GuidanceUpsample,
    PositionAttentionModule,
    UpConvBlock,
)

from ..conftest import randomize_

SIZES = {2: (7, 5), 3: (5, 4, 3)}


def _conv1x1(conv: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A 1x1(x1) convolution as a channel contraction, the definition a reference can use."""
    w = conv.weight.flatten(1)
    y = torch.einsum('oc,bc...->bo...', w, x)
    return y if conv.bias is None else y + conv.bias.view(1, -1, *[1] * (x.dim() - 2))


def _bn_eval(bn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (x - bn.running_mean.view(shape)) / (bn.running_var.view(shape) + bn.eps).sqrt() * \
        bn.weight.view(shape) + bn.bias.view(shape)


@pytest.mark.parametrize('spatial_dims', [2, 3])
@pytest.mark.parametrize('train', [False, True])
def test_additive_gate_is_monais_attention_block(spatial_dims, train):
    from monai.networks.nets.attentionunet import AttentionBlock

    gate = randomize_(AttentionGate(spatial_dims, gate_channels=6, skip_channels=5, inner_channels=3)).double()
    ref = AttentionBlock(spatial_dims, f_int=3, f_g=6, f_l=5).double()
    with torch.no_grad():
        for mine, theirs in ((gate.w_g, ref.W_g), (gate.w_x, ref.W_x), (gate.psi, ref.psi)):
            theirs[0].conv.weight.copy_(mine[0].weight)
            theirs[0].conv.bias.zero_()  # ours has none: a bias before batch norm is cancelled by it
            theirs[1].load_state_dict(mine[1].state_dict())
    gate.train(train)
    ref.train(train)
    g = torch.randn(2, 6, *SIZES[spatial_dims], dtype=torch.float64)
    x = torch.randn(2, 5, *SIZES[spatial_dims], dtype=torch.float64)
    torch.testing.assert_close(gate(g, x), ref(g, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('spatial_dims', [2, 3])
def test_concatenating_gate_follows_the_papers_figure(spatial_dims):
    gate = randomize_(AttentionGate(spatial_dims, 6, 5, 3, fusion='concat')).double().eval()
    g = torch.randn(2, 6, *SIZES[spatial_dims], dtype=torch.float64)
    x = torch.randn(2, 5, *SIZES[spatial_dims], dtype=torch.float64)
    # figure 1's gate: 1x1 conv + BN on g and on x, concatenate, ReLU, 1x1 conv, BN, sigmoid, multiply
    g1 = _bn_eval(gate.w_g[1], _conv1x1(gate.w_g[0], g))
    x1 = _bn_eval(gate.w_x[1], _conv1x1(gate.w_x[0], x))
    psi = torch.sigmoid(_bn_eval(gate.psi[1], _conv1x1(gate.psi[0], torch.relu(torch.cat([g1, x1], 1)))))
    assert psi.shape == (2, 1, *SIZES[spatial_dims])
    torch.testing.assert_close(gate(g, x), x * psi, rtol=1e-12, atol=1e-12)
    assert gate.psi[0].in_channels == 6  # the concatenation doubles psi's input


def test_gate_refuses_mismatched_maps_and_unknown_fusion():
    gate = AttentionGate(2, 4, 4, 2)
    with pytest.raises(ValueError, match='spatial size'):
        gate(torch.randn(1, 4, 4, 4), torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match='fusion'):
        AttentionGate(2, 4, 4, 2, fusion='mul')
    with pytest.raises(ValueError, match='spatial_dims'):
        AttentionGate(4, 4, 4, 2)


@pytest.mark.parametrize('spatial_dims', [2, 3])
def test_position_attention_follows_danet_equations(spatial_dims):
    pam = randomize_(PositionAttentionModule(spatial_dims, 16)).double()
    x = torch.randn(2, 16, *SIZES[spatial_dims], dtype=torch.float64) * 0.5
    a = x.flatten(2)  # (B, C, N)
    # the paper's B sits at the summed position i (a key), its C at the output position j (a query)
    b, c, d = (_conv1x1(m, x).flatten(2) for m in (pam.key, pam.query, pam.value))
    assert b.shape[1] == 2  # queries and keys at C/8
    # s_ji = exp(B_i . C_j) / sum_i exp(B_i . C_j);  E_j = alpha * sum_i s_ji D_i + A_j  (DANet eq. 1-2)
    s = torch.softmax(torch.einsum('bki,bkj->bji', b, c), dim=-1)
    e = pam.gamma * torch.einsum('bji,bci->bcj', s, d) + a
    torch.testing.assert_close(pam(x), e.view_as(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('spatial_dims', [2, 3])
def test_channel_attention_follows_danet_equations(spatial_dims):
    cam = randomize_(ChannelAttentionModule()).double()
    x = torch.randn(2, 6, *SIZES[spatial_dims], dtype=torch.float64) * 0.3
    a = x.flatten(2)
    # x_ji = exp(A_i . A_j) / sum_i exp(A_i . A_j);  E_j = beta * sum_i x_ji A_i + A_j  (DANet eq. 3-4)
    w = torch.softmax(torch.einsum('bin,bjn->bji', a, a), dim=-1)
    e = cam.gamma * torch.einsum('bji,bin->bjn', w, a) + a
    torch.testing.assert_close(cam(x), e.view_as(x), rtol=1e-10, atol=1e-10)


def test_one_implementation_for_2d_and_3d():
    """A 3D block on a one-slice volume, given the 2D block's weights, computes the 2D block."""
    torch.manual_seed(1)
    pairs = [
        (PositionAttentionModule(2, 16), PositionAttentionModule(3, 16)),
        (AttentionGate(2, 8, 8, 4, 'concat'), AttentionGate(3, 8, 8, 4, 'concat')),
    ]
    x2 = torch.randn(2, 8, 6, 5, dtype=torch.float64)
    for m2, m3 in pairs:
        m2 = randomize_(m2).double().eval()
        m3 = m3.double().eval()
        m3.load_state_dict({k: v.unsqueeze(2) if v.dim() == 4 else v for k, v in m2.state_dict().items()})
        if isinstance(m2, AttentionGate):
            g = torch.randn_like(x2)
            torch.testing.assert_close(m3(g.unsqueeze(2), x2.unsqueeze(2)).squeeze(2), m2(g, x2))
        else:
            x = torch.cat([x2, x2], 1)
            torch.testing.assert_close(m3(x.unsqueeze(2)).squeeze(2), m2(x))


@pytest.mark.parametrize('spatial_dims', [2, 3])
def test_dual_attention_bottleneck_and_resampling_blocks_shapes(spatial_dims):
    size = SIZES[spatial_dims]
    x = torch.randn(2, 16, *size)
    bottleneck = randomize_(DualAttentionBottleneck(spatial_dims, 16))
    assert bottleneck(x).shape == x.shape
    # zero gammas (the initialisation): PAM and CAM start as the identity, as in DANet
    fresh = DualAttentionBottleneck(spatial_dims, 16)
    torch.testing.assert_close(fresh.pam[0](x), x)
    torch.testing.assert_close(fresh.cam[0](x), x)
    up = UpConvBlock(spatial_dims, 16, 4)
    assert up(x).shape == (2, 4, *[2 * s for s in size])  # exactly twice, odd sizes too
    guide = GuidanceUpsample(spatial_dims, 16, 4)
    target = [4 * s + 1 for s in size]
    assert guide(x, target).shape == (2, 4, *target)
    block = ConvBlock(spatial_dims, 16, 4, drop_rate=0.1)
    assert block(x).shape == (2, 4, *size)


def test_position_attention_needs_enough_channels():
    with pytest.raises(ValueError, match='at least 8 channels'):
        PositionAttentionModule(2, 4)
