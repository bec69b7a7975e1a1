"""Medical models: AGUNet / DAUNet (3D as the paper built them, 2D plain) and MEDUSA."""
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from attnzoo.zoo import create_task_model
from attnzoo.zoo.medical import PAPER_CHANNELS, create_medical_model

from ..conftest import randomize_

SWITCHES = list(itertools.product([True, False], repeat=2))  # (deep_supervision, multiscale_input)


def _paper_param_count(*, ds, ms, guiding, gates, dual, in_chans=1, num_classes=2, dims=3):
    """Parameters of the paper's U-Net counted from its description (figures 1-2 and its code),
    independently of the model code: five levels of ``PAPER_CHANNELS``, Conv3D blocks, UpConv3D
    blocks, gates with inner width C/2, PAM/CAM at C, 1x1 heads; a conv followed by batch norm
    has no bias (``bn``: its weight and bias)."""
    k = 3 ** dims

    def conv(cin, cout, ks=k, bias=True):
        return cin * cout * ks + (cout if bias else 0)

    def conv_bn(cin, cout, ks=k):
        return conv(cin, cout, ks, bias=False) + 2 * cout

    def block(cin, cout):  # the paper's Conv block: (conv, BN, ReLU) twice
        return conv_bn(cin, cout) + conv_bn(cout, cout)

    c = PAPER_CHANNELS
    n = block(in_chans, c[0])
    for prev, ci in zip(c[:-1], c[1:]):
        n += block(prev + (ci if ms else 0), ci) + (conv(in_chans, ci) if ms else 0)
    bottom = c[-1]
    if dual:
        pam = 2 * conv(bottom, bottom // 8, 1, bias=False) + conv(bottom, bottom, 1, bias=False) + 1
        branch = conv_bn(bottom, bottom) + conv(bottom, bottom)
        n += pam + 1 + 2 * branch + conv_bn(bottom, bottom, 1)
    prev = bottom
    widths = c[-2::-1]
    for w, skip in zip(widths, c[-2::-1]):
        n += conv_bn(prev, w)  # UpConv block
        if gates:
            h = w // 2
            n += conv_bn(w, h, 1) + conv_bn(skip, h, 1) + conv_bn(2 * h, 1, 1)
        if guiding:
            n += conv(bottom, w)
        n += block(w + skip + (w if guiding else 0), w)
        prev = w
    n += sum(conv(w, num_classes, 1) for w in (widths if ds else widths[-1:]))
    return n


@pytest.mark.parametrize('arch', ['agunet', 'daunet'])
def test_paper_widths_and_each_component_count_as_described(arch):
    with torch.device('meta'):
        for ds, ms, guiding in itertools.product([True, False], repeat=3):
            model = create_medical_model(arch, spatial_dims=3, deep_supervision=ds, multiscale_input=ms,
                                         attention_guiding=guiding)
            got = sum(p.numel() for p in model.parameters())
            assert got == _paper_param_count(ds=ds, ms=ms, guiding=guiding, gates=arch == 'agunet',
                                             dual=arch == 'daunet'), (arch, ds, ms, guiding)
        both = create_medical_model(arch, spatial_dims=3, attention_gates=True, dual_attention=True)
        assert sum(p.numel() for p in both.parameters()) == _paper_param_count(
            ds=True, ms=True, guiding=False, gates=True, dual=True)


def _check_backward_reaches_every_parameter(model, out, backbone_in_graph=None):
    """Every parameter of the model gets a nonzero gradient; a zoo backbone's (``backbone_in_graph``:
    the names its own maps' backward reaches) get one wherever the backbone alone gives one."""
    loss = sum(o.square().mean() for o in (out if isinstance(out, list) else [out]))
    loss.backward()
    for name, p in model.named_parameters():
        if backbone_in_graph is not None and name.startswith('encoder.backbone.'):
            if name[len('encoder.backbone.'):] in backbone_in_graph:
                assert p.grad is not None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize('arch', ['agunet', 'daunet'])
@pytest.mark.parametrize('size', [(32, 32, 32), (29, 31, 27)])
def test_3d_unet_on_a_small_volume(arch, size):
    # every component on (gates and dual attention both, guiding too), narrow widths
    model = randomize_(create_medical_model(
        arch, spatial_dims=3, num_classes=3, channels=(4, 8, 16, 16), attention_guiding=True,
        attention_gates=True, dual_attention=True, attention_drop_rate=0.))
    x = torch.randn(1, 1, *size)
    out = model.train()(x)
    assert isinstance(out, list) and len(out) == 3
    for k, o in enumerate(out):  # highest resolution first, level k at ceil(size / 2**k)
        assert o.shape == (1, 3, *[math.ceil(s / 2 ** k) for s in size])
    _check_backward_reaches_every_parameter(model, out)
    with torch.no_grad():
        y = model.eval()(x)
    assert isinstance(y, torch.Tensor) and y.shape == (1, 3, *size)


def test_deep_supervision_list_starts_with_the_eval_logits():
    model = randomize_(create_medical_model('agunet', spatial_dims=3, channels=(4, 8, 8)))
    x = torch.randn(1, 1, 17, 12, 9)
    with torch.no_grad():
        y = model.eval()(x)
        model.train()
        for m in model.modules():  # deterministic layers, training-mode output format
            if isinstance(m, (torch.nn.BatchNorm3d, torch.nn.Dropout3d)):
                m.eval()
        out = model(x)
    torch.testing.assert_close(out[0], y)


@pytest.mark.parametrize('arch', ['agunet', 'daunet'])
@pytest.mark.parametrize('ds,ms', SWITCHES)
def test_2d_plain_unet_every_switch(arch, ds, ms):
    model = randomize_(create_medical_model(
        arch, deep_supervision=ds, multiscale_input=ms, channels=(4, 8, 16), attention_drop_rate=0.))
    x = torch.randn(2, 1, 21, 18)
    out = model.train()(x)
    if ds:
        assert [tuple(o.shape) for o in out] == [(2, 2, 21, 18), (2, 2, 11, 9)]
    else:
        assert out.shape == (2, 2, 21, 18)
    _check_backward_reaches_every_parameter(model, out)
    assert model.eval()(x).shape == (2, 2, 21, 18)


# one backbone file per family, its smallest variant
FAMILY_SMALLEST = ['az_agent_deit_t', 'az_agent_pvt_t', 'az_agent_swin_t', 'az_davit_tiny', 'az_litv2_s',
                   'az_nat_mini', 'az_shvit_s1', 'az_stvit_s', 'az_van_b0']


@pytest.mark.parametrize('backbone', FAMILY_SMALLEST)
def test_2d_zoo_encoder_every_arch_and_switch(backbone, monkeypatch):
    from attnzoo.zoo import medical

    # the family's dense backbone is built once and shared by the eight models: the matrix stays cheap
    build, built = medical.create_dense_backbone, {}

    def once(name, **kwargs):
        if name not in built:
            built[name] = randomize_(build(name, **kwargs))
        return built[name]

    monkeypatch.setattr(medical, 'create_dense_backbone', once)
    x = torch.randn(2, 1, 37, 32)  # one side padded to 64, the other the smallest accepted
    in_graph = None
    for arch, (ds, ms) in itertools.product(['agunet', 'daunet'], SWITCHES):
        model = randomize_(create_medical_model(
            arch, backbone, deep_supervision=ds, multiscale_input=ms, decoder_channels=(16, 16, 8, 8, 8),
            stem_channels=(8, 8), pyramid_channels=8, attention_drop_rate=0.))
        assert model.encoder.backbone is built[backbone]
        assert model.encoder.backbone.in_chans == 1
        model.zero_grad(set_to_none=True)
        out = model.train()(x)
        if ds:
            assert [tuple(o.shape) for o in out] == [
                (2, 2, math.ceil(37 / s), math.ceil(32 / s)) for s in (1, 2, 4, 8, 16)], (arch, ds, ms)
        else:
            assert out.shape == (2, 2, 37, 32)
        if in_graph is None:
            # what the backbone's own maps reach (not, e.g., a ViT's last class-token query); its
            # gradients may be exact zeros on maps this small (a ReLU dead on a 1x1 map)
            dense_backbone = model.encoder.backbone
            sum(f.sum() for f in dense_backbone(F.pad(x, (0, 64 - 32, 0, 64 - 37)))).backward()
            in_graph = {n for n, p in dense_backbone.named_parameters() if p.grad is not None}
            model.zero_grad(set_to_none=True)
        _check_backward_reaches_every_parameter(model, out, backbone_in_graph=in_graph)
        with torch.no_grad():
            assert model.eval()(x).shape == (2, 2, 37, 32)


def test_2d_zoo_encoder_takes_the_papers_dense_settings():
    model = create_medical_model('daunet', 'az_dinat_mini', dense_cfg='upernet')
    assert model.encoder.backbone.dense_cfg == 'upernet'
    assert model.encoder.strides == [1, 2, 4, 8, 16, 32]
    assert model.attnzoo_cfg['dense_cfg'] == 'upernet' and model.attnzoo_cfg['backbone'] == 'az_dinat_mini'
    with pytest.raises(ValueError, match='stem_channels'):
        create_medical_model('agunet', 'az_van_b0', channels=(8, 16))


def test_ablation_switches_remove_their_modules():
    plain = create_medical_model('agunet', channels=(4, 8, 16), deep_supervision=False, multiscale_input=False,
                                 attention_gates=False)
    assert len(plain.heads) == 1 and len(plain.encoder.pyramid) == 0
    assert all(level.gate is None and level.guide is None for level in plain.decoder)
    assert isinstance(plain.bottleneck, torch.nn.Identity)
    full = create_medical_model('daunet', channels=(4, 8, 16), attention_guiding=True, attention_gates=True)
    assert len(full.heads) == 2 and len(full.encoder.pyramid) == 2
    assert all(level.gate is not None and level.guide is not None for level in full.decoder)
    # the paper's DAUNet has no gates on its skips, its AGUNet no dual attention
    assert all(level.gate is None for level in create_medical_model('daunet', channels=(8, 8)).decoder)
    assert isinstance(create_medical_model('agunet', channels=(8, 8)).bottleneck, torch.nn.Identity)


def test_cfg_rebuilds_the_model():
    model = create_medical_model('daunet', spatial_dims=3, num_classes=4, channels=(4, 8, 16),
                                 attention_guiding=True, gate_fusion='add', attention_gates=True)
    cfg = json.loads(json.dumps(model.attnzoo_cfg))
    assert cfg['task'] == 'medical' and cfg['arch'] == 'daunet' and cfg['backbone'] is None
    assert cfg['channels'] == [4, 8, 16] and cfg['attention_guiding'] is True and cfg['num_classes'] == 4
    rebuilt = create_task_model(cfg)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}


def test_bad_inputs_and_arguments_are_refused():
    model = create_medical_model('agunet', spatial_dims=3, channels=(4, 8, 8))
    with pytest.raises(ValueError, match=r'\(B, 1, D, H, W\)'):
        model(torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match='1 input channels'):
        model(torch.randn(1, 2, 8, 8, 8))
    with pytest.raises(ValueError, match='at least 4'):
        model(torch.randn(1, 1, 8, 3, 8))
    with pytest.raises(TypeError, match='floating-point'):
        model(torch.ones(1, 1, 8, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match='unknown medical arch'):
        create_medical_model('unet')
    with pytest.raises(ValueError, match='spatial_dims'):
        create_medical_model('agunet', spatial_dims=1)
    with pytest.raises(ValueError, match='zoo backbones are 2D'):
        create_medical_model('agunet', 'az_van_b0', spatial_dims=3)
    with pytest.raises(ValueError, match='decoder_channels'):
        create_medical_model('agunet', channels=(4, 8, 8), decoder_channels=(8,))


@pytest.mark.parametrize('backbone', ['az_van_b0', 'az_shvit_s1'])
def test_medusa_builds_gates_every_stage_and_trains_a_step(backbone):
    model = create_medical_model('medusa', backbone, num_classes=3, body_channels=(4, 8, 8, 16, 16, 16))
    stem = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert stem.in_channels == 1  # in_chans=1: timm's adaptation of the backbone's stem
    assert len(model.heads) == len(model.backbone.stages)
    x, y = torch.randn(2, 1, 64, 64), torch.tensor([0, 2])
    maps = model.attention_maps(x)
    assert [tuple(m.shape[2:]) for m in maps] == [
        (math.ceil(64 / min(s, 32)),) * 2 for s in model.stage_strides]
    # the heads' maps reach the logits: change one head and the output changes
    model.eval()
    with torch.no_grad():
        before = model(x)
        model.heads[-1][-1].bias += 3
        assert not torch.allclose(model(x), before)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = torch.nn.functional.cross_entropy(model(x), y)
    assert torch.isfinite(loss)
    loss.backward()
    for part in ('body_encoder', 'body_decoder', 'heads', 'backbone'):
        assert any(p.grad is not None and p.grad.abs().sum() > 0
                   for n, p in model.named_parameters() if n.startswith(part)), part
    opt.step()
    assert any(not torch.equal(p, params[n]) for n, p in model.named_parameters() if n.startswith('heads'))
    assert model.attnzoo_cfg['arch'] == 'medusa' and model.attnzoo_cfg['backbone'] == backbone


def test_medusa_attention_body_sees_the_grayscale_image():
    model = randomize_(create_medical_model('medusa', 'az_van_b0', in_chans=3, body_channels=(4, 4, 8, 8, 8, 8)))
    x = torch.rand(2, 3, 40, 36)
    chroma = torch.tensor([0.587, -0.299, 0.]).view(1, 3, 1, 1)  # orthogonal to the luma weights
    with torch.no_grad():
        maps, same_luma = model.eval().attention_maps(x), model.attention_maps(x + 0.3 * chroma)
        for a, b in zip(maps, same_luma):
            torch.testing.assert_close(a, b)
        assert not torch.allclose(model(x), model(x + 0.3 * chroma))  # the backbone sees colour


def test_medusa_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match='name one'):
        create_medical_model('medusa')
    with pytest.raises(ValueError, match='2D classifier'):
        create_medical_model('medusa', 'az_van_b0', spatial_dims=3)
    with pytest.raises(ValueError, match='no decoder to guide'):
        create_medical_model('medusa', 'az_van_b0', attention_guiding=True)
    with pytest.raises(ValueError, match='no stages to gate'):
        create_medical_model('medusa', 'az_agent_deit_t')

