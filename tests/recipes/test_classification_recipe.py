"""ClassificationTask through attnzoo-train: fit / validate / test / predict, exact resume, timm's
schedules as Lightning steps them, the digits split and image-folder errors, and make demo's path."""
import csv
import os
import re

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from attnzoo.recipes.cli import resolve_config, run
from attnzoo.recipes.data.classification import DigitsDataset, ImageFolderDataset
from attnzoo.recipes.datamodules import ImageFolderDataModule

# a narrow timm model (LayerNorm, a group_matcher for layer decay): these tests are about the recipe
TINY = ['--model.init_args.model', 'test_convnext3', '--data.init_args.image_size', '32',
        '--trainer.enable_model_summary', 'false']
HERE = 'tests.recipes.test_classification_recipe'


class StopAfterEpoch(pl.Callback):
    """Interrupts a run at the end of epoch ``epoch`` (its checkpoints are written, as after a crash)."""

    def __init__(self, epoch: int = 0) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


class FailAtStep(pl.Callback):
    """Raises in the middle of training, after two optimizer steps (a crash, an out-of-memory...)."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        if trainer.global_step == 2:
            raise RuntimeError('simulated crash')


class RecordLR(pl.Callback):
    """Keeps the learning rates of every parameter group at the start of every training batch."""
    seen: list = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        RecordLR.seen.append([g['lr'] for g in trainer.optimizers[0].param_groups])


def _fit_args(root, *extra):
    return ['fit', '--config', 'digits', '--trainer.default_root_dir', str(root), *TINY, *extra]


def test_fit_validate_test_predict_through_the_cli(tmp_path):
    root = tmp_path / 'run'
    cli = run(_fit_args(root, '--trainer.max_epochs', '2', '--trainer.limit_train_batches', '10',
                        '--data.init_args.batch_size', '32', '--model.init_args.optimizer.lr', '0.004'))
    ckpts = root / 'checkpoints'
    assert (ckpts / 'last.ckpt').is_file()
    assert (ckpts / 'curves.png').stat().st_size > 10_000 and (ckpts / 'confusion_matrix.png').stat().st_size > 10_000
    history = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == 'TrainingPlots').history
    running = [v for _, v in history['train_loss_step']]
    # 20 steps learn: the loss falls well below its start, accuracy far above a constant guess (10 %)
    assert running[-1] < 0.7 * running[0]
    assert history['val_acc1'][-1][1] > 0.4
    best = cli.trainer.checkpoint_callback.best_model_path
    assert os.path.dirname(best) == str(ckpts) and cli.trainer.checkpoint_callback.monitor == 'val_acc1'

    for cmd in ('validate', 'test'):
        c = run([cmd, '--config', 'digits', '--trainer.default_root_dir', str(root), *TINY, '--ckpt_path', 'best'])
        assert c.trainer.ckpt_path == best
        acc = float(c.trainer.callback_metrics[f'{"val" if cmd == "validate" else "test"}_acc1'])
        assert 0.4 < acc <= 1
    c = run(['predict', '--config', 'digits', '--trainer.default_root_dir', str(root), *TINY, '--ckpt_path', 'last'])
    with open(root / 'predictions' / 'predictions.csv') as f:
        rows = list(csv.reader(f))
    assert rows[0][:2] == ['index', 'class_1'] and len(rows) == 1 + len(DigitsDataset('test'))
    labels = DigitsDataset('test', image_size=8).targets
    assert np.mean([int(r[1]) == t for r, t in zip(rows[1:], labels)]) > 0.4


@pytest.mark.parametrize('budget', [['--trainer.max_epochs', '2'],
                                    ['--trainer.max_epochs', '-1', '--trainer.max_steps', '6']],
                         ids=['epochs', 'steps'])
def test_resume_ends_with_the_same_weights(tmp_path, budget):
    # every source of randomness on: mixup/cutmix, drop path, EMA, layer decay, warmup per update;
    # by steps, Lightning sets the resumed sampler's epoch one ahead, which the trainer's count overrides
    extra = [*budget, '--trainer.limit_train_batches', '3', '--trainer.limit_val_batches', '1',
             '--data.init_args.batch_size', '16', '--model.init_args.drop_path_rate', '0.1',
             '--model.init_args.mixup', '{"mixup_alpha": 0.8, "cutmix_alpha": 1.0}',
             '--model.init_args.ema', '{"decay": 0.9}', '--model.init_args.optimizer.layer_decay', '0.8']
    run(_fit_args(tmp_path / 'whole', *extra))
    interrupted = tmp_path / 'interrupted'
    c = run(_fit_args(interrupted, *extra, f'--trainer.callbacks+={HERE}.StopAfterEpoch'))
    assert c.trainer.current_epoch == 1 and c.trainer.global_step == 3
    c = run(_fit_args(interrupted, *extra, '--ckpt_path', 'last'))
    assert c.trainer.global_step == 6

    a = torch.load(tmp_path / 'whole' / 'checkpoints' / 'last.ckpt', map_location='cpu', weights_only=False)
    b = torch.load(interrupted / 'checkpoints' / 'last.ckpt', map_location='cpu', weights_only=False)
    assert a['state_dict'].keys() == b['state_dict'].keys()
    assert any(k.startswith('model_ema.') for k in a['state_dict'])
    for k in a['state_dict']:
        assert torch.equal(a['state_dict'][k], b['state_dict'][k]), k
    for sa, sb in zip(a['optimizer_states'][0]['state'].values(), b['optimizer_states'][0]['state'].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a['lr_schedulers'] == b['lr_schedulers']
    plots = next(k for k in a['callbacks'] if k.startswith('TrainingPlots'))
    assert a['callbacks'][plots]['history'] == b['callbacks'][plots]['history']


def test_a_step_budget_stops_with_last_checkpoint_and_a_larger_one_resumes_on_its_schedule(tmp_path):
    # stopped at max_steps mid-epoch, last.ckpt holds that step; resumed with a larger budget, the
    # schedule is the new one's (the old horizon's settings held the learning rate at 0 past it)
    extra = ['--trainer.max_epochs', '-1', '--trainer.limit_train_batches', '3', '--trainer.limit_val_batches', '1',
             '--data.init_args.batch_size', '16', '--model.init_args.scheduler.on_updates', 'true',
             f'--trainer.callbacks+={HERE}.RecordLR']
    RecordLR.seen = []
    run(_fit_args(tmp_path / 'whole', *extra, '--trainer.max_steps', '6'))
    whole, RecordLR.seen = RecordLR.seen, []
    interrupted = tmp_path / 'interrupted'
    run(_fit_args(interrupted, *extra, '--trainer.max_steps', '4'))
    last = torch.load(interrupted / 'checkpoints' / 'last.ckpt', map_location='cpu', weights_only=False)
    assert last['global_step'] == 4
    RecordLR.seen = []
    c = run(_fit_args(interrupted, *extra, '--trainer.max_steps', '6', '--ckpt_path', 'last'))
    assert c.trainer.global_step == 6 and len(whole) == 6
    assert RecordLR.seen == whole[4:] and all(lr > 0 for lrs in RecordLR.seen for lr in lrs)


def test_a_crashed_fit_keeps_its_state(tmp_path):
    root = tmp_path / 'run'
    with pytest.raises(RuntimeError, match='simulated crash'):
        run(_fit_args(root, '--trainer.max_epochs', '1', '--trainer.limit_train_batches', '5',
                      '--data.init_args.batch_size', '16', f'--trainer.callbacks+={HERE}.FailAtStep'))
    state = torch.load(root / 'checkpoints' / 'on_exception.ckpt', map_location='cpu', weights_only=False)
    assert state['global_step'] == 2 and not (root / 'checkpoints' / 'last.ckpt').exists()


@pytest.mark.parametrize('on_updates', [True, False])
def test_learning_rates_follow_timms_schedule(tmp_path, on_updates):
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    RecordLR.seen = []
    steps, epochs, warmup = 3, 4, 1.5
    run(_fit_args(
        tmp_path, '--trainer.max_epochs', str(epochs), '--trainer.limit_train_batches', str(steps),
        '--trainer.limit_val_batches', '0', '--data.init_args.batch_size', '8',
        '--model.init_args.optimizer.lr', '0.01',
        '--model.init_args.optimizer.layer_decay', '0.7', '--model.init_args.scheduler',
        f'{{"sched": "cosine", "on_updates": {str(on_updates).lower()}, "warmup_epochs": {warmup}, '
        f'"warmup_lr": 0.0001, "min_lr": 0.00001}}',
        f'--trainer.callbacks+={HERE}.RecordLR'))
    seen = RecordLR.seen
    # the same schedule built by hand, stepped as timm's train.py steps it
    from attnzoo.recipes.tasks import ClassificationTask
    model = ClassificationTask('test_convnext3', num_classes=10).model
    opt = create_optimizer_v2(model, opt='adamw', lr=0.01, weight_decay=0.05, layer_decay=0.7)
    sched, _ = create_scheduler_v2(opt, sched='cosine', num_epochs=epochs, warmup_epochs=warmup, warmup_lr=1e-4,
                                   min_lr=1e-5, step_on_epochs=not on_updates, updates_per_epoch=steps)
    expected = []
    for epoch in range(epochs):
        for step in range(steps):
            expected.append([g['lr'] for g in opt.param_groups])
            sched.step_update(num_updates=epoch * steps + step + 1)
        sched.step(epoch + 1)
    assert len(set(expected[-1])) > 1  # layer decay: the groups' rates differ
    assert len(seen) == len(expected)
    np.testing.assert_allclose(seen, expected, rtol=1e-12)


def test_digits_split_is_fixed_stratified_and_disjoint():
    from sklearn.datasets import load_digits
    targets = load_digits().target
    parts = DigitsDataset.split_indices(targets)
    sizes = {k: len(v) for k, v in parts.items()}
    assert sum(sizes.values()) == 1797 and sizes['test'] == 360
    assert not set(parts['train']) & set(parts['test']) and not set(parts['val']) & set(parts['test'])
    for v in parts.values():  # every class in every split, in proportion
        counts = np.bincount(targets[v], minlength=10)
        assert counts.min() >= 0.8 * counts.mean()
    again = DigitsDataset.split_indices(targets)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)
    ds = DigitsDataset('val', image_size=24)
    image, label = ds[3]
    assert image.shape == (3, 24, 24) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert label.dtype == torch.int64


def _write_images(folder, n, size=20):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        image = rng.integers(0, 255, (size, size + 3, 3), dtype=np.uint8)
        Image.fromarray(image).save(os.path.join(folder, f'{i}.png'))


def test_image_folder_reads_imagenet_layout_and_explains_bad_folders(tmp_path):
    for split in ('train', 'val'):
        for c in ('n01', 'n02', 'n03'):
            _write_images(tmp_path / split / c, 4)
    dm = ImageFolderDataModule(str(tmp_path), image_size=16, batch_size=4)
    dm.setup('fit')
    assert dm.classes == ['n01', 'n02', 'n03'] and dm.num_classes == 3
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and y.dtype == torch.int64
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (4, 3, 16, 16) and y.tolist() == [0, 0, 0, 0]

    with pytest.raises(FileNotFoundError, match='does not exist'):
        ImageFolderDataset(tmp_path / 'nope')
    _write_images(tmp_path / 'flat', 3)
    with pytest.raises(ValueError, match='no class folders.*holds 3 images directly'):
        ImageFolderDataset(tmp_path / 'flat')
    os.makedirs(tmp_path / 'empty' / 'a')
    with pytest.raises(ValueError, match='class folders hold no images'):
        ImageFolderDataset(tmp_path / 'empty')
    with pytest.raises(ValueError, match=r"missing \['n03'\], unexpected \['n04'\]"):
        os.rename(tmp_path / 'val' / 'n03', tmp_path / 'val' / 'n04')
        ImageFolderDataModule(str(tmp_path), image_size=16).setup('validate')
    (tmp_path / 'train' / 'n01' / 'bad.png').write_bytes(b'not an image')
    ds = ImageFolderDataset(tmp_path / 'train')
    with pytest.raises(ValueError, match='cannot read image .*bad.png'):
        ds[[p for p, _ in ds.samples].index(str(tmp_path / 'train' / 'n01' / 'bad.png'))]


def test_cli_explains_unknown_configs_and_a_head_that_does_not_fit_the_data(tmp_path):
    assert resolve_config('digits').endswith(os.path.join('configs', 'digits.yaml'))
    with pytest.raises(FileNotFoundError, match='packaged: .*digits'):
        resolve_config('no_such_config')
    with pytest.raises(ValueError, match='the data has 10 classes, the model\'s head 7'):
        run(_fit_args(tmp_path, '--model.init_args.num_classes', '7', '--trainer.max_epochs', '1'))


def test_attnzoo_train_reads_its_command_line_without_lightnings_args_warning(monkeypatch, capsys):
    import sys
    import warnings

    from attnzoo.recipes.cli import main
    monkeypatch.setattr(sys, 'argv', ['attnzoo-train', 'fit', '--config', 'digits', '--print_config'])
    with warnings.catch_warnings(record=True) as seen, pytest.raises(SystemExit):
        warnings.simplefilter('always')
        main()
    assert not [w for w in seen if 'args parameter' in str(w.message)]
    # the configuration printed is the packaged one, read from the command line
    assert 'model: az_shvit_s1' in capsys.readouterr().out


def test_make_demo_training_path_on_a_short_run(tmp_path, capsys):
    from attnzoo.recipes.demo import main
    # four steps do not reach the demo's bar of 95 %: it reports where everything is, then fails
    with pytest.raises(SystemExit) as exit_:
        main(['--trainer.default_root_dir', str(tmp_path), '--trainer.max_epochs', '1',
              '--trainer.limit_train_batches', '4'])
    assert exit_.value.code == 1
    out, err = capsys.readouterr()
    assert re.search(r'held-out top-1: \d+\.\d\d % on 360 test digits', out) and 'is below 95 %' in err
    assert 'model az_shvit_s1' in out and str(tmp_path / 'checkpoints' / 'last.ckpt') in out
    assert f'plot: {tmp_path / "checkpoints" / "confusion_matrix.png"}' in out
    assert (tmp_path / 'checkpoints' / 'confusion_matrix.png').is_file()
