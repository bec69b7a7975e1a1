"""scripts/benchmark.py end to end on CPU, at a size small enough for CI: one zoo model against its timm peer."""
import importlib.util
import json
import time
from pathlib import Path
from types import ModuleType

import pytest
import timm
import torch

SCRIPT = Path(__file__).resolve().parents[1] / 'scripts' / 'benchmark.py'

TINY_RUN = [
    '--models', 'az_shvit_s1', '--peers', 'shvit_s1', '--device', 'cpu', '--img-size', '64',
    '--batch-size', '2', '--train-batch-size', '2', '--warmup', '1', '--iters', '1',
]


@pytest.fixture(scope='module')
def bench() -> ModuleType:
    # scripts/ is not a package; load the file the way `python scripts/benchmark.py` would see it.
    spec = importlib.util.spec_from_file_location('attnzoo_benchmark_script', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
            'reference', 'sdpa', '--dtype', 'float32', '--warmup', '0', '--iters', '1', '--json', str(out)]
    assert bench.main(argv) == 0
    data = json.loads(out.read_text())
    assert data['meta']['args']['cases'] == ['B2 h2 10x12 d16 k3 dil2']
    rows = {row['method']: row for row in data['results']}
    assert list(rows) == ['attnzoo', 'reference', 'sdpa']
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
