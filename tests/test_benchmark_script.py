"""scripts/benchmark.py end to end on CPU, at a size small enough for CI: one zoo model against its timm peer."""
import json
import sys
import time
from types import ModuleType

import pytest
import timm
import torch

from .conftest import load_script

TINY_RUN = [
    '--models', 'az_shvit_s1', '--peers', 'shvit_s1', '--device', 'cpu', '--img-size', '64',
    '--batch-size', '2', '--train-batch-size', '2', '--warmup', '1', '--iters', '1',
]


@pytest.fixture(scope='module')
def bench() -> ModuleType:
    return load_script('benchmark')


@pytest.fixture(autouse=True)
def one_thread():
    # On a small CI box sharing its cores with other test processes, OpenMP threads spinning for a
    # busy core turn milliseconds into seconds; one thread keeps the run fast and steady.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _param_count(name: str) -> int:
    return sum(p.numel() for p in timm.create_model(name).parameters())


def test_model_against_peer(bench, tmp_path, capsys):
    out = tmp_path / 'results.json'
    assert bench.main(TINY_RUN + ['--json', str(out)]) == 0
    data = json.loads(out.read_text())

    rows = {row['label']: row for row in data['results']}
    assert list(rows) == ['az_shvit_s1', 'shvit_s1']
    for name, row in rows.items():
        assert row['error'] is None, row['error']
        assert row['input_size'] == [3, 64, 64]
        assert row['param_count'] == _param_count(name)
        assert row['gflops'] > 0
        assert row['infer_img_s'] > 0 and row['train_img_s'] > 0
        # No trustworthy peak-memory counter for torch on CPU.
        assert row['infer_peak_gib'] is None and row['train_peak_gib'] is None

    peer, model = rows['shvit_s1'], rows['az_shvit_s1']
    assert peer['infer_ratio'] == 1.0 and peer['train_ratio'] == 1.0
    assert model['infer_ratio'] == pytest.approx(model['infer_img_s'] / peer['infer_img_s'])
    assert model['train_ratio'] == pytest.approx(model['train_img_s'] / peer['train_img_s'])

    meta = data['meta']
    assert meta['versions']['torch'] == torch.__version__
    assert meta['versions']['timm'] == timm.__version__
    assert meta['argv'][-2:] == ['--json', str(out)]
    assert meta['args']['img_size'] == 64 and meta['gpu'] is None

    table = capsys.readouterr().out
    assert 'az_shvit_s1' in table and 'shvit_s1' in table and 'infer img/s' in table


def test_failing_model_becomes_error_row(bench, tmp_path, monkeypatch):
    create = bench.create_benchmark_model

    def create_or_oom(name, img_size):
        if name == 'az_shvit_s1':
            raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 GiB\nmore detail')
        return create(name, img_size)

    monkeypatch.setattr(bench, 'create_benchmark_model', create_or_oom)
    out = tmp_path / 'results.json'
    assert bench.main(TINY_RUN + ['--json', str(out)]) == 1

    failed, peer = json.loads(out.read_text())['results']
    assert failed['error'] == 'OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB'
    assert failed['infer_img_s'] is None and failed['infer_ratio'] is None
    assert peer['error'] is None and peer['infer_img_s'] > 0 and peer['infer_ratio'] == 1.0


def test_unknown_model_is_rejected_before_running(bench):
    with pytest.raises(SystemExit):
        bench.main(['--models', 'az_no_such_model', '--device', 'cpu'])


def test_kernel_mode_times_na2d_and_its_peers(bench, tmp_path, capsys):
    out = tmp_path / 'na2d.json'
    argv = ['--mode', 'kernels', '--device', 'cpu', '--cases', '2,2,10,12,16,3,2', '--methods', 'attnzoo',
            'reference', 'sdpa', 'fmha_window', '--dtype', 'float32', '--warmup', '0', '--iters', '1',
            '--json', str(out)]
    assert bench.main(argv) == 0
    data = json.loads(out.read_text())
    assert data['meta']['args']['cases'] == ['B2 h2 10x12 d16 k3 dil2']
    rows = {row['method']: row for row in data['results']}
    assert list(rows) == ['attnzoo', 'reference', 'sdpa', 'fmha_window']
    # useful work of neighborhood attention: 4 * B*heads*H*W * k*k * d forward, 3.5 times that with backward
    flops = 4 * 2 * 2 * 10 * 12 * 9 * 16
    for row in rows.values():
        assert row['error'] is None, row['error']
        assert row['fwd_tflops'] == pytest.approx(flops / (row['fwd_ms'] / 1e3) / 1e12)
        assert row['fwd_bwd_tflops'] == pytest.approx(3.5 * flops / (row['fwd_bwd_ms'] / 1e3) / 1e12)
        # 4 tensors of 2*10*12*2*16 float32 forward; floor = bytes / 4.3 TB/s
        assert row['fwd_x_floor'] == pytest.approx(row['fwd_ms'] / 1e3 / (4 * 7680 * 4 / 4300e9))
        # on a CPU the host is the device: one time per phase
        assert row['fwd_call_ms'] == row['fwd_ms'] and row['fwd_bwd_call_ms'] == row['fwd_bwd_ms']
    assert 'B2 h2 10x12 d16 k3 dil2' in capsys.readouterr().out


def test_the_peak_is_reset_between_warm_up_and_timed_steps(bench):
    # what first calls allocate once (cuDNN's algorithm search, autotuning) must not count in the
    # peak: the reset falls after the last warm-up call and before the first timed one
    calls = []
    times = bench.time_iterations(lambda: calls.append('step'), 2, 3, torch.device('cpu'),
                                  after_warmup=lambda: calls.append('reset'))
    assert calls == ['step', 'step', 'reset', 'step', 'step', 'step'] and len(times) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason='CUDA graphs need a GPU')
def test_graph_replays_leave_the_host_out(bench):
    # a step that keeps its host busy 2 ms for a few microseconds of GPU work: eager calls measure
    # the host, replays of the captured graph the GPU
    x = torch.zeros(1, device='cuda')

    def step():
        time.sleep(0.002)
        x.add_(1)

    device = torch.device('cuda')
    assert min(bench.time_iterations(step, 1, 5, device)) > 1.5e-3
    assert max(bench.time_graph_replays(step, 1, 5, device)) < 0.5e-3


def test_kernel_mode_rejects_a_malformed_case(bench):
    with pytest.raises(SystemExit):
        bench.main(['--mode', 'kernels', '--device', 'cpu', '--cases', '2,2,10,12,16,3'])


FACTORY_MODULE = '''
import timm
import torch

def small_shvit(img_size=None):
    """A peer from a user's function: timm's SHViT-S1, which records the size it was asked for."""
    model = timm.create_model('shvit_s1')
    model.asked_img_size = img_size
    return model

def not_a_model():
    return 'a string'

def with_5d_bias():
    """A model holding a 5-D parameter, as the Agent Attention authors' models do."""
    model = timm.create_model('shvit_s1')
    model.grid = torch.nn.Parameter(torch.randn(1, 2, 3, 4, 5))
    return model
'''


@pytest.fixture
def user_peers(tmp_path, monkeypatch):
    """A folder holding a user's peer module; sys.path and sys.modules are restored afterwards."""
    (tmp_path / 'user_peers.py').write_text(FACTORY_MODULE)
    monkeypatch.setattr(sys, 'path', list(sys.path))
    monkeypatch.delitem(sys.modules, 'user_peers', raising=False)
    yield tmp_path
    sys.modules.pop('user_peers', None)


def test_peer_factory_pairs_and_interleaved_latency(bench, user_peers, tmp_path, capsys):
    out = tmp_path / 'results.json'
    argv = ['--models', 'az_shvit_s1', '--peers', 'shvit_s1', '--peer-path', str(user_peers),
            '--peer-factory', 'user_peers:small_shvit:shvit_official', '--pairs', 'az_shvit_s1=shvit_official',
            '--device', 'cpu', '--img-size', '64', '--no-train', '--interleave', '--warmup', '1', '--iters', '3',
            '--json', str(out)]
    assert bench.main(argv) == 0
    data = json.loads(out.read_text())
    rows = {row['label']: row for row in data['results']}
    assert list(rows) == ['az_shvit_s1', 'shvit_s1', 'shvit_official']
    ours, timm_peer, official = rows['az_shvit_s1'], rows['shvit_s1'], rows['shvit_official']
    assert official['factory'] == 'user_peers:small_shvit:shvit_official'
    assert official['source'] == str(tmp_path / 'user_peers.py')
    assert official['param_count'] == _param_count('shvit_s1') and official['input_size'] == [3, 64, 64]
    for row in rows.values():
        assert row['error'] is None, row['error']
        # CPU default: latency at batch 1, the median of the interleaved rounds; no train step asked for
        assert row['infer_batch_size'] == 1 and row['infer_ms'] > 0
        assert row['infer_img_s'] == pytest.approx(1e3 / row['infer_ms'])
        assert row['train_img_s'] is None and row['train_ratio'] is None
    # the paired model against its pair, the named peer against itself, the other peer the first peer
    assert ours['ratio_to'] == 'shvit_official'
    assert ours['infer_ratio'] == pytest.approx(official['infer_ms'] / ours['infer_ms'])
    assert official['infer_ratio'] == 1.0 and official['ratio_to'] == 'shvit_official'
    assert timm_peer['ratio_to'] == 'shvit_s1'
    assert data['meta']['args']['peer_factory'] == ['user_peers:small_shvit:shvit_official']
    table = capsys.readouterr().out
    assert 'infer ms' in table and 'shvit_official' in table and 'interleaved' in table


def test_interleaved_training_steps_take_turns(bench, monkeypatch):
    # a training step per row per round, after every row's warm-up; no peaks (all rows resident)
    order = []
    real = bench.ModelBenchmark.train_step

    def train_step(self):
        step = real(self)

        def logged():
            order.append(self.job.label)
            step()
        return logged

    monkeypatch.setattr(bench.ModelBenchmark, 'train_step', train_step)
    rows = bench.benchmark_interleaved(
        [bench.Job('az_shvit_s1', 'model', False), bench.Job('shvit_s1', 'peer', False)],
        bench.parse_args(['--models', 'az_shvit_s1', '--device', 'cpu', '--img-size', '64', '--batch-size', '2',
                          '--train-batch-size', '2', '--interleave', '--warmup', '1', '--iters', '3']),
        torch.device('cpu'))
    assert order == ['az_shvit_s1', 'shvit_s1'] + ['az_shvit_s1', 'shvit_s1'] * 3
    for row in rows:
        assert row['error'] is None and row['train_ms'] > 0 and row['infer_ms'] > 0
        assert row['train_img_s'] == pytest.approx(2e3 / row['train_ms'])
        assert row['train_peak_gib'] is None


def test_peer_factory_gets_the_asked_size(bench, user_peers):
    sys.path.insert(0, str(user_peers))
    factory = bench.load_peer_factory('user_peers:small_shvit')
    assert factory.label == 'small_shvit'
    assert factory.build(96).asked_img_size == 96 and factory.build(None).asked_img_size is None
    with pytest.raises(TypeError, match='returned str'):
        bench.load_peer_factory('user_peers:not_a_model').build(None)


def test_channels_last_converts_4d_tensors_and_keeps_5d_ones(bench, user_peers):
    # Module.to(memory_format=channels_last) raises on a 5-D tensor; the benchmark converts 4-D ones only
    sys.path.insert(0, str(user_peers))
    args = bench.parse_args(['--models', 'az_shvit_s1', '--device', 'cpu', '--img-size', '64', '--channels-last'])
    job = bench.Job('with_5d_bias', 'peer', False, factory=bench.load_peer_factory('user_peers:with_5d_bias'))
    model = bench.ModelBenchmark(job, args, torch.device('cpu')).model
    convs = [p for p in model.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not convs[0].is_contiguous()
    assert model.grid.is_contiguous()


@pytest.mark.parametrize('extra, message', [
    (['--peer-factory', 'no_such_module_xyz:fn'], 'cannot import'),
    (['--peer-factory', 'json'], 'MODULE:FUNCTION'),
    (['--peer-factory', 'json:no_such_function'], 'no function'),
    (['--pairs', 'az_shvit_s1=davit_tiny'], 'PEER one of the peers'),
    (['--peer-factory', 'json:loads:shvit_s1'], 'labels must differ'),
])
def test_bad_peer_arguments_are_rejected_before_running(bench, extra, message, capsys):
    with pytest.raises(SystemExit):
        bench.main(['--models', 'az_shvit_s1', '--peers', 'shvit_s1', '--device', 'cpu'] + extra)
    assert message in capsys.readouterr().err


def test_compile_mode_needs_compile(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(['--models', 'az_shvit_s1', '--device', 'cpu', '--compile-mode', 'reduce-overhead'])
    assert '--compile-mode needs --compile' in capsys.readouterr().err


@pytest.mark.parametrize('mode, new_generations', [('default', 0), ('reduce-overhead', 2)])
def test_compile_mode_reaches_torch_compile_and_graph_modes_start_a_generation_per_step(
        bench, monkeypatch, mode, new_generations):
    # torch.compile is lazy: the model is never compiled here, only built, and its steps run eager
    compiled_with = {}

    def fake_compile(model, **kwargs):
        compiled_with.update(kwargs)
        return model

    marks = []
    monkeypatch.setattr(torch, 'compile', fake_compile)
    monkeypatch.setattr(torch.compiler, 'cudagraph_mark_step_begin', lambda: marks.append(1))
    args = bench.parse_args(['--models', 'az_shvit_s1', '--device', 'cpu', '--img-size', '64', '--batch-size', '1',
                             '--train-batch-size', '2', '--compile', '--compile-mode', mode])
    model = bench.ModelBenchmark(bench.Job('az_shvit_s1', 'model', True), args, torch.device('cpu'))
    assert compiled_with == dict(dynamic=False, mode=None if mode == 'default' else mode)
    model.inference_step()()
    model.train_step()()
    assert len(marks) == new_generations
