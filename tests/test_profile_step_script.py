"""scripts/profile_step.py on the CPU: timm models and user-built peers in one run, results in JSON."""
import json
from types import ModuleType

import pytest

from .conftest import load_script

# a peer as an author's code would be: no timm attributes (num_classes, pretrained_cfg)
PEER_MODULE = '''
import torch.nn as nn


def tiny_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 5))
'''


@pytest.fixture(scope='module')
def prof() -> ModuleType:
    return load_script('profile_step')


def test_models_and_peer_factories_profile_in_one_run(prof, tmp_path, capsys):
    (tmp_path / 'my_peers.py').write_text(PEER_MODULE)
    out = tmp_path / 'steps.json'
    prof.main(['--models', 'az_shvit_s1', '--peer-path', str(tmp_path), '--peer-factory', 'my_peers:tiny_net:mine',
               '--img-size', '64', '--train-batch-size', '2', '--warmup', '1', '--steps', '1',
               '--profiled-steps', '1', '--channels-last', '--json', str(out)])
    data = json.loads(out.read_text())
    assert [(r['model'], r['phase']) for r in data['results']] == [('az_shvit_s1', 'train'), ('mine', 'train')]
    for r in data['results']:
        assert r['wall_ms'] > 0 and r['peak_gib'] is None  # no CUDA memory on the CPU
    assert data['meta']['peer_sources'] == {'mine': str(tmp_path / 'my_peers.py')}
    assert '== mine train: wall' in capsys.readouterr().out


@pytest.mark.parametrize('argv, message', [
    ([], '--models, --peer-factory'),
    (['--models', 'no_such_model_xyz'], 'unknown model name'),
    (['--peer-factory', 'no_such_module_xyz:fn'], 'cannot import'),
    (['--peer-factory', 'nocolon'], 'MODULE:FUNCTION'),
])
def test_bad_arguments_stop_before_anything_runs(prof, capsys, argv, message):
    with pytest.raises(SystemExit):
        prof.main(argv)
    assert message in capsys.readouterr().err
