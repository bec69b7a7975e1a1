"""The recipes under Lightning's DDP unchanged: 2 CPU processes (gloo) train and score as one process does."""
import json
import os
import subprocess
import sys

import numpy as np
import torch

from attnzoo.recipes.cli import run
from attnzoo.recipes.sampling import EvalSampler, TrainSampler

ARGS = ['fit', '--config', 'digits', '--model.init_args.model', 'test_convnext3', '--data.init_args.image_size', '32',
        '--trainer.max_epochs', '2', '--trainer.limit_train_batches', '3', '--trainer.enable_progress_bar', 'false',
        '--trainer.enable_model_summary', 'false', '--model.init_args.optimizer.layer_decay', '0.8']


def test_shards_partition_the_single_process_order():
    data = list(range(23))
    one = [i for i, _ in TrainSampler(data, num_replicas=1, rank=0, seed=5)]
    two = [[i for i, _ in TrainSampler(data, num_replicas=2, rank=r, seed=5)] for r in range(2)]
    # batch k of the single process (size 4) is the union of batch k of the two shards (size 2 each)
    for k in range(5):
        assert sorted(one[4 * k:4 * k + 4]) == sorted(two[0][2 * k:2 * k + 2] + two[1][2 * k:2 * k + 2])
    shards = [list(EvalSampler(data, 3, r)) for r in range(3)]
    assert sorted(i for s in shards for i, _ in s) == data  # every sample scored exactly once, none padded
    assert [len(EvalSampler(data, 3, r)) for r in range(3)] == [8, 8, 7]


def test_ddp_on_two_processes_matches_one_process(tmp_path):
    # one process, batches of 16
    run([*ARGS, '--trainer.default_root_dir', str(tmp_path / 'one'), '--data.init_args.batch_size', '16'])
    # two processes (gloo), batches of 8 each: the same samples per step, gradients averaged by DDP
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get('PYTHONPATH', ''), OMP_NUM_THREADS='1')
    proc = subprocess.run(
        [sys.executable, '-m', 'attnzoo.recipes.cli', *ARGS, '--trainer.default_root_dir', str(tmp_path / 'two'),
         '--data.init_args.batch_size', '8', '--trainer.strategy', 'ddp', '--trainer.devices', '2',
         '--trainer.accelerator', 'cpu'], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'Starting with 2 processes' in proc.stdout + proc.stderr

    a = torch.load(tmp_path / 'one' / 'checkpoints' / 'last.ckpt', map_location='cpu', weights_only=False)
    b = torch.load(tmp_path / 'two' / 'checkpoints' / 'last.ckpt', map_location='cpu', weights_only=False)
    assert a['global_step'] == b['global_step'] == 6
    for k, v in a['state_dict'].items():
        torch.testing.assert_close(b['state_dict'][k], v, rtol=1e-5, atol=1e-6, msg=k)
    key = next(k for k in a['callbacks'] if k.startswith('TrainingPlots'))
    ha, hb = a['callbacks'][key]['history'], b['callbacks'][key]['history']
    for name in ('val_loss', 'val_acc1', 'val_acc5'):  # dataset-level metrics, synced over the processes
        assert [s for s, _ in ha[name]] == [s for s, _ in hb[name]]
        np.testing.assert_allclose([v for _, v in hb[name]], [v for _, v in ha[name]], rtol=1e-5)


def test_dense_metrics_over_two_processes_equal_one_process(tmp_path, monkeypatch):
    # segmentation's dataset-level mIoU, pixel accuracy and loss: two processes (gloo) score their
    # shards of the held-out images and sync, and must give the single process' numbers (the
    # weights: the seeded initialisation, the same in every process and run)
    monkeypatch.setenv('ATTNZOO_CACHE', str(tmp_path / 'cache'))
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get('PYTHONPATH', ''), OMP_NUM_THREADS='1')
    common = ['validate', '--config', 'shapes_segmentation', '--trainer.default_root_dir', str(tmp_path / 'run'),
              '--trainer.enable_progress_bar', 'false', '--trainer.enable_model_summary', 'false']
    one = run(common).trainer.callback_metrics
    # Lightning starts the second process by running the first one's command line again: a script file
    script = tmp_path / 'validate.py'
    script.write_text('import json, sys\nfrom attnzoo.recipes.cli import run\n'
                      'trainer = run(sys.argv[1:]).trainer\n'
                      f'with open(r"{tmp_path}" + f"/metrics_{{trainer.global_rank}}.json", "w") as f:\n'
                      '    json.dump({k: float(v) for k, v in trainer.callback_metrics.items()}, f)\n')
    proc = subprocess.run(
        [sys.executable, str(script), *common, '--trainer.strategy', 'ddp', '--trainer.devices', '2',
         '--trainer.accelerator', 'cpu'], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in range(2):  # both processes hold the synced numbers
        two = json.loads((tmp_path / f'metrics_{rank}.json').read_text())
        for name in ('val_miou', 'val_acc', 'val_loss'):
            np.testing.assert_allclose(two[name], float(one[name]), rtol=1e-5, err_msg=name)
