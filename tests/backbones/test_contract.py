"""The timm contract, as timm checks its own models: heavy checks on the smallest variant of each
family, cheap ones (registration, cfgs, parameter counts on the meta device) on every model."""
import pytest
import timm
import torch
from timm.models import adapt_input_conv

import attnzoo
from attnzoo.backbones import FAMILIES, family_of

from ..conftest import randomize_

ALL = attnzoo.list_models()
NON_SQUARE = (200, 168)  # neither side a multiple of 32
# models without a published exact count are checked against timm's twin where timm has one
TIMM_TWINS = {'az_davit_base_fl': 'davit_base_fl', 'az_davit_huge_fl': 'davit_huge_fl'}


def _smallest_per_family():
    smallest = {}
    for name in ALL:
        family = family_of(name).__name__
        count = family_of(name).paper_results[name]['params'] or float('inf')
        if family not in smallest or count < smallest[family][0]:
            smallest[family] = (count, name)
    return sorted(name for _, name in smallest.values())


# the smallest variant of each family runs the heavy checks
HEAVY = _smallest_per_family()


def _meta(name, **kwargs):
    with torch.device('meta'):
        return timm.create_model(name, **kwargs)


def _random_weights_as_pretrained(name, tmp_path):
    """A model with random weights, and the create_model arguments that load those weights as its pretrained file."""
    model = randomize_(timm.create_model(name)).eval()
    path = tmp_path / 'weights.pth'
    torch.save(model.state_dict(), path)
    return model, dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def _num_params(model):
    return sum(p.numel() for p in model.parameters())


def test_every_family_is_registered_with_prefix():
    assert {'az_davit_tiny', 'az_shvit_s1'} <= set(HEAVY)
    assert all(name.startswith('az_') for name in ALL)
    assert timm.list_models('az_*') == ALL
    registered = sorted(n for module in FAMILIES.values() for n in module.paper_results)
    assert registered == ALL  # every model belongs to exactly one family file


@pytest.mark.parametrize('name', ALL)
def test_parameter_count_matches_the_paper(name):
    model = _meta(name)
    expected = family_of(name).paper_results[name]['param_count']
    if expected is None:
        expected = _num_params(_meta(TIMM_TWINS[name]))
    assert _num_params(model) == expected


@pytest.mark.parametrize('name', ALL)
def test_pretrained_cfg(name):
    cfg = timm.models.get_pretrained_cfg(name)
    # a download source, or notes saying where the published file is
    assert cfg.hf_hub_id or cfg.url or cfg.notes
    assert cfg.license and cfg.paper_ids
    model = _meta(name)
    sd = model.state_dict()
    assert cfg.first_conv + '.weight' in sd
    if cfg.num_classes:
        assert cfg.classifier + '.weight' in sd
    card = attnzoo.model_card(name)
    assert card.weights and card.input_size == cfg.input_size


@pytest.mark.parametrize('name', HEAVY)
def test_forward_default_and_non_square(name):
    model = timm.create_model(name).eval()
    size = model.pretrained_cfg['input_size']
    with torch.no_grad():
        for shape in [(2, *size), (1, 3, *NON_SQUARE)]:
            out = model(torch.randn(shape))
            assert out.shape == (shape[0], model.num_classes)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize('name', HEAVY)
def test_backward_42_classes_reaches_every_parameter(name):
    model = timm.create_model(name, num_classes=42)
    out = model(torch.randn(2, 3, 96, 96))
    assert out.shape == (2, 42)
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f'no gradient for {missing}'
    # 42-class heads are reported by get_classifier
    assert model.get_classifier().out_features == 42


@pytest.mark.parametrize('name', HEAVY)
def test_features_head_and_classifier_reset(name):
    model = timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    x = torch.randn(1, *cfg['input_size'])
    with torch.no_grad():
        feats = model.forward_features(x)
        if cfg['pool_size'] is None:  # a plain ViT (Agent-DeiT): prefix tokens, then one per patch
            h, w = (s // model.feature_info[-1]['reduction'] for s in cfg['input_size'][1:])
            assert feats.shape == (1, model.num_prefix_tokens + h * w, model.num_features)
        else:
            assert feats.shape == (1, model.num_features, *cfg['pool_size'])
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (1, model.head_hidden_size)
        logits = model(x)
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), pre)
        model.reset_classifier(0, '')
        assert model(x).shape == feats.shape
        model.reset_classifier(10, 'avg')
        assert model(x).shape == (1, 10)
    assert logits.shape == (1, 1000)


@pytest.mark.parametrize('name', HEAVY)
def test_catavgmax_pool_feeds_a_classifier_twice_as_wide(name):
    if name.startswith('az_davit'):
        # timm's DaViT head (NormMlpClassifierHead) refuses a pooling that changes the width, ours too
        with pytest.raises(AssertionError, match='changes the pooled width'):
            timm.create_model(name, global_pool='catavgmax')
        return
    if name.startswith('az_agent_deit'):
        # a plain ViT pools tokens, by its class token or their mean
        with pytest.raises(ValueError, match="global_pool must be 'token', 'avg' or ''"):
            timm.create_model(name, global_pool='catavgmax')
        return
    model = timm.create_model(name, global_pool='catavgmax', num_classes=7).eval()
    x = torch.randn(1, 3, *NON_SQUARE)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert model.forward_head(feats, pre_logits=True).shape == (1, 2 * model.num_features)
        assert model(x).shape == (1, 7)
        model.reset_classifier(5)
        assert model(x).shape == (1, 5)


@pytest.mark.parametrize('name', HEAVY)
def test_features_only_getter_and_intermediates(name, tmp_path):
    model, weights = _random_weights_as_pretrained(name, tmp_path)
    x = torch.randn(1, 3, *NON_SQUARE)
    fm = timm.create_model(name, features_only=True, **weights).eval()
    info = fm.feature_info
    assert len(info.channels()) >= 3
    getter = timm.create_model(name, features_only=True, feature_cls='getter', **weights).eval()
    picked = timm.create_model(name, features_only=True, out_indices=(1, -1), **weights).eval()
    with torch.no_grad():
        outs, gouts = fm(x), getter(x)
        final, inter = model.forward_intermediates(x)
        only = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True, stop_early=True)
        feats = model.forward_features(x)
        picked_outs = picked(x)
    for o, g, i, c, r in zip(outs, gouts, inter, info.channels(), info.reduction()):
        # each level has the channels feature_info states and the stride (padded maps round up)
        expected = (1, c, -(-x.shape[2] // r), -(-x.shape[3] // r))
        assert o.shape == g.shape == i.shape == expected
        torch.testing.assert_close(o, i)
        torch.testing.assert_close(g, i)
    torch.testing.assert_close(final, feats)
    assert len(only) == 2
    torch.testing.assert_close(only[0], inter[0])
    torch.testing.assert_close(only[1], inter[-1])
    assert len(picked_outs) == 2 and picked_outs[0].shape[1] == info.channels()[1]

    num_stages = len(model.feature_info)
    pruned = timm.create_model(name).eval()
    pruned.load_state_dict(model.state_dict())
    taken = pruned.prune_intermediate_layers(indices=[0, 1])
    assert taken == [0, 1] and len(pruned.stages) == 2 < num_stages
    with torch.no_grad():
        kept = pruned.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    torch.testing.assert_close(kept[1], inter[1])


@pytest.mark.parametrize('name', HEAVY)
def test_grad_checkpointing_leaves_output_unchanged(name):
    model = randomize_(timm.create_model(name))
    x = torch.randn(2, 3, 96, 80)
    ref = model(x)
    model.set_grad_checkpointing(True)
    out = model(x)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize('name', HEAVY)
def test_model_api_methods(name):
    model = _meta(name)
    matcher = model.group_matcher()
    assert 'stem' in matcher and 'blocks' in matcher
    assert isinstance(model.no_weight_decay(), set)


@pytest.mark.parametrize('name', HEAVY)
@pytest.mark.parametrize('in_chans', [1, 4])
def test_in_chans_build_run_and_adapt_pretrained(name, in_chans, tmp_path):
    source = randomize_(timm.create_model(name))
    path = tmp_path / 'weights.pth'
    torch.save(source.state_dict(), path)
    model = timm.create_model(name, in_chans=in_chans, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    first_conv = model.pretrained_cfg['first_conv'] + '.weight'
    expected = adapt_input_conv(in_chans, source.state_dict()[first_conv])
    torch.testing.assert_close(model.state_dict()[first_conv], expected)
    with torch.no_grad():
        out = model.eval()(torch.randn(1, in_chans, 96, 96))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


@pytest.mark.parametrize('name', HEAVY)
def test_bad_input_raises_value_error_with_shapes(name):
    model = timm.create_model(name).eval()
    minimum = type(model).min_input_size
    with pytest.raises(ValueError, match=r'3 input channels.*\(2, 4, 96, 96\)'):
        model(torch.randn(2, 4, 96, 96))
    with pytest.raises(ValueError, match=r'3-D tensor.*\(3, 96, 96\)'):
        model(torch.randn(3, 96, 96))
    with pytest.raises(ValueError, match=rf'at least {minimum}.*\(1, 3, {minimum - 1}, 96\)'):
        model(torch.randn(1, 3, minimum - 1, 96))
    with pytest.raises(ValueError, match='channels'):
        model.forward_intermediates(torch.randn(1, 1, 96, 96))
    with torch.no_grad():
        assert model(torch.randn(1, 3, minimum, minimum)).shape == (1, 1000)


@pytest.mark.parametrize('name', HEAVY)
def test_channels_last_conversion_keeps_output(name):
    # benchmarks and users convert whole models; torch refuses this for any 5-D parameter
    model = timm.create_model(name).eval()
    randomize_(model)
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    # other conv algorithms sum in another order: float32 rounding, norm-relative as in the compile test
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.parametrize('name', HEAVY)
def test_bf16_autocast_on_cpu(name):
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, 128, 96)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = model(x)
    assert torch.isfinite(out).all()
    # bf16 keeps about 3 significant digits; the logits must still agree to that order
    assert ((out.float() - ref).norm() / ref.norm()).item() < 0.05


# inductor's compile time grows with the graph, not the input: the costliest to compile run
# with fewer blocks, every kind of block still there (Agent-DeiT: one agent and one plain block)
COMPILE_KWARGS = {
    'az_agent_deit_t': dict(depth=2, num_agent_blocks=1),
    'az_agent_pvt_t': dict(depths=(1, 1, 1, 1)),
    # an agent block in each of the first three stages, a window and a shifted-window block in the last
    'az_agent_swin_t': dict(depths=(1, 1, 1, 2), num_agent_blocks=(1, 1, 1, 0)),
    # a dilated and an undilated block in every stage that has both
    'az_dinat_mini': dict(depths=(2, 2, 2, 1), dilations=((1, 8), (1, 4), (1, 2), (1,))),
    'az_litv2_s': dict(depths=(1, 1, 1, 1)),
    'az_stvit_s': dict(depths=(1, 1, 1, 1)),
}


@pytest.mark.parametrize('name', HEAVY)
def test_torch_compile_fullgraph_matches_eager(name):
    model = randomize_(timm.create_model(name, **COMPILE_KWARGS.get(name, {}))).eval()
    x = torch.randn(2, 3, 96, 80)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        got, want = compiled(x), model(x)
    # random weights with random norm statistics can grow activations by orders of magnitude:
    # compare at the scale of the output
    assert ((got - want).norm() / want.norm()).item() < 1e-5


@pytest.mark.parametrize('name', HEAVY)
def test_group_matcher_serves_timm_layer_decay(name):
    """timm's optimizer factory groups parameters by group_matcher (layer decay) and reads every
    captured regex group as a layer number: both granularities must group every parameter."""
    from timm.models import group_parameters
    from timm.optim import create_optimizer_v2
    model = _meta(name)
    for coarse in (True, False):
        groups = group_parameters(model, model.group_matcher(coarse=coarse))
        assert sum(len(names) for names in groups.values()) == len(list(model.parameters()))
    optimizer = create_optimizer_v2(model, 'adamw', lr=1e-3, layer_decay=0.75)
    assert len(optimizer.param_groups) > 2



def _fx_graph(model):
    """The whole model as an FX graph, traced as timm's test suite and ``feature_cls='fx'`` trace it:
    timm's notrace modules stay leaves and its notrace functions are wrapped."""
    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import NodePathTracer
    tracer = NodePathTracer(
        leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True)
    return torch.fx.GraphModule(model, tracer.trace(model))


@pytest.mark.parametrize('name', HEAVY)
def test_fx_trace_matches_eager_forward_and_backward(name):
    model = randomize_(timm.create_model(name, num_classes=10))
    graph = _fx_graph(model)
    x = torch.randn(2, 3, 96, 80)
    model.zero_grad()
    model(x).square().mean().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    graph(x).square().mean().backward()  # the graph shares the model's parameters
    for n, p in model.named_parameters():
        assert p.grad is not None, f'no gradient for {n} through the FX graph'
        torch.testing.assert_close(p.grad, want[n], rtol=0, atol=0, msg=lambda m: f'{n}: {m}')
    model.eval(), graph.eval()
    # traced once, run at another size: shapes stay symbolic, not baked into the graph
    for x in (x, torch.randn(1, 3, 72, 104)):
        with torch.no_grad():
            assert torch.equal(graph(x), model(x))


@pytest.mark.parametrize('name', HEAVY)
def test_features_only_fx_matches_getter(name, tmp_path):
    model, weights = _random_weights_as_pretrained(name, tmp_path)
    fx = timm.create_model(name, features_only=True, feature_cls='fx', **weights).eval()
    getter = timm.create_model(name, features_only=True, feature_cls='getter', **weights).eval()
    assert fx.feature_info.channels() == getter.feature_info.channels()
    x = torch.randn(1, 3, *NON_SQUARE)
    with torch.no_grad():
        outs, want = fx(x), getter(x)
    assert len(outs) == len(want) >= 3
    for o, w in zip(outs, want):
        if o.dim() == 3:  # a plain ViT's blocks give tokens, prefix first, as timm's ViTs under 'fx'
            o = o[:, model.num_prefix_tokens:].transpose(1, 2).reshape(w.shape)
        torch.testing.assert_close(o, w, rtol=0, atol=0)


@pytest.mark.parametrize('name', HEAVY)
def test_torchscript_and_fx_then_torchscript_match_eager(name):
    # timm's test suite scripts every model it does not exclude, directly and after an FX trace;
    # the kernel ops run as Python calls from the scripted code (torch.jit.ignore)
    from timm.layers import set_scriptable
    with set_scriptable(True):
        model = randomize_(timm.create_model(name, num_classes=10)).eval()
    x = torch.randn(1, 3, 96, 80)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), want, rtol=0, atol=0)
        torch.testing.assert_close(torch.jit.script(_fx_graph(model))(x), want, rtol=0, atol=0)
