"""Pretrained loading the way users meet it: the Hub cache offline, conversion, damaged files."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from ..conftest import randomize_

ROOT = Path(__file__).resolve().parents[2]

OFFLINE_SCRIPT = r'''
import json, sys, timm, torch, attnzoo
x = torch.load(sys.argv[1])
result = {}
try:
    model = timm.create_model('az_davit_tiny.msft_in1k', pretrained=True).eval()
    with torch.no_grad():
        torch.save(model(x), sys.argv[2])
    result['loaded'] = True
except attnzoo.PretrainedWeightsNotFoundError as e:
    result['error'] = str(e)
print(json.dumps(result))
'''


def _hub_cache(root: Path, repo: str, filename: str, state_dict) -> Path:
    """A Hugging Face cache as huggingface_hub lays it out: refs/main naming a snapshot commit."""
    commit = '0123456789abcdef0123456789abcdef01234567'
    repo_dir = root / ('models--' + repo.replace('/', '--'))
    (repo_dir / 'refs').mkdir(parents=True)
    (repo_dir / 'refs' / 'main').write_text(commit)
    snapshot = repo_dir / 'snapshots' / commit
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(snapshot / filename))
    return snapshot / filename


def _run_offline(cache: Path, tmp_path: Path, x: torch.Tensor) -> dict:
    torch.save(x, tmp_path / 'x.pt')
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE='1', PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, '-c', OFFLINE_SCRIPT, str(tmp_path / 'x.pt'), str(tmp_path / 'y.pt')],
        capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_offline_hub_cache_loads_and_missing_file_is_explained(tmp_path):
    source = randomize_(timm.create_model('davit_tiny')).eval()
    weights = _hub_cache(tmp_path / 'hub', 'timm/davit_tiny.msft_in1k', 'model.safetensors', source.state_dict())
    x = torch.randn(2, 3, 224, 224)
    assert _run_offline(tmp_path / 'hub', tmp_path, x) == {'loaded': True}
    with torch.no_grad():
        want = source(x)
    got = torch.load(tmp_path / 'y.pt')
    assert ((got - want).norm() / want.norm()).item() < 1e-5

    weights.unlink()
    error = _run_offline(tmp_path / 'hub', tmp_path, x)['error']
    assert "'timm/davit_tiny.msft_in1k'" in error and 'model.safetensors' in error and 'offline' in error


def test_corrupt_checkpoint_is_reported_with_its_file(tmp_path):
    path = tmp_path / 'truncated.pth'
    torch.save(timm.create_model('shvit_s1').state_dict(), path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(RuntimeError, match='truncated.pth'):
        timm.create_model('az_shvit_s1', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_files_that_are_no_checkpoint_or_hold_damaged_values_are_refused(tmp_path):
    from attnzoo.backbones import CheckpointReadError
    # bytes that are no archive and no pickle: timm re-raises torch's refusal as a RuntimeError that
    # advises weights_only=False, wrong for a damaged file and unsafe for one of unknown origin
    for name, data in (('garbage.pth', bytes(range(256)) * 16), ('text.pth', b'not a checkpoint\n')):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CheckpointReadError, match=f'{name} could not be read: corrupt') as err:
            timm.create_model('az_shvit_s1', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
        assert 'weights_only' not in str(err.value)
    # damage inside a tensor's data loads without complaint but for the values
    sd = timm.create_model('shvit_s1').state_dict()
    sd['stages.2.blocks.0.conv.m.c.weight'][0, 0] = float('nan')
    path = tmp_path / 'nan.pth'
    torch.save(sd, path)
    with pytest.raises(CheckpointReadError, match=r'non-finite values in 1 tensors \(stages\.2\.blocks\.0\.conv\.'):
        timm.create_model('az_shvit_s1', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def _convert(*args):
    return subprocess.run([sys.executable, str(ROOT / 'scripts' / 'convert_checkpoint.py'), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_convert_script_official_layouts_to_safetensors(tmp_path):
    from ..backbones.test_parity import to_shvit_original
    source = randomize_(timm.create_model('shvit_s1')).eval()
    official = tmp_path / 'shvit_s1.pth'
    torch.save(to_shvit_original(source.state_dict()), official)
    out = _convert('az_shvit_s1', official, tmp_path / 'converted.safetensors')
    assert out.returncode == 0, out.stderr
    assert 'az_shvit_s1' in out.stdout
    model = timm.create_model('az_shvit_s1', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'converted.safetensors'))).eval()
    x = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        got, want = model(x), source(x)
    assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_convert_script_refuses_what_does_not_fit(tmp_path):
    official = tmp_path / 'davit_small.pth'
    torch.save(timm.create_model('shvit_s2').state_dict(), official)
    out = _convert('az_shvit_s1', official, tmp_path / 'x.safetensors')
    assert out.returncode == 1 and 'shapes that differ' in out.stderr
    assert not (tmp_path / 'x.safetensors').exists()
    out = _convert('az_shvit_s1', tmp_path / 'nope.pth', tmp_path / 'x.safetensors')
    assert out.returncode == 1 and 'no checkpoint file' in out.stderr
