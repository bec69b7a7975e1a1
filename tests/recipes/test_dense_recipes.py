"""SegmentationTask, DetectionTask and MedicalSegmentationTask through attnzoo-train on their packaged
configs over the embedded synthetic sets: fit (a few dozen steps that must learn: the loss falls
well below its start and the metric beats the best constant prediction), validate and test of the
best checkpoint, predict's files, and the end-of-fit figures."""
import json
import os

import numpy as np
import pytest
import torch

from attnzoo.recipes.cli import run

QUIET = ['--trainer.enable_progress_bar', 'false', '--trainer.enable_model_summary', 'false']


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The embedded sets are written under the test's folder, not the user's cache."""
    monkeypatch.setenv('ATTNZOO_CACHE', str(tmp_path / 'cache'))
    return tmp_path / 'cache'


def _history(cli):
    return next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == 'TrainingPlots').history


def _best(cli, name):
    """The best epoch's value of a validation metric (what the best checkpoint holds)."""
    return float(cli.trainer.checkpoint_callback.best_model_score), max(v for _, v in _history(cli)[name])


def _runs(config, root, *extra):
    base = ['--config', config, '--trainer.default_root_dir', str(root), *QUIET, *extra]
    return lambda cmd, *more: run([cmd, *base, *more])


def test_segmentation_recipe(tmp_path, cache):
    from torchmetrics.classification import MulticlassJaccardIndex

    root = tmp_path / 'run'
    attnzoo_train = _runs('shapes_segmentation', root)
    cli = attnzoo_train('fit')
    history = _history(cli)
    running = [v for _, v in history['train_loss_step']]
    assert running[-1] < 0.6 * running[0], running

    # the best constant label map, scored as the task scores: every pixel one class
    val = cli.datamodule.dataset('val')
    masks = torch.stack([val[i][1] for i in range(len(val))])
    constant = max(float(MulticlassJaccardIndex(4, average='macro', ignore_index=255)(torch.full_like(masks, k), masks))
                   for k in range(4))
    best, best_seen = _best(cli, 'val_miou')
    assert best == pytest.approx(best_seen) and best > constant + 0.1, (best, constant)
    ckpts = root / 'checkpoints'
    for png in ('curves.png', 'masks.png'):
        assert (ckpts / png).stat().st_size > 10_000

    # test and validate score the held-out images with the best weights: what fit saw there
    c = attnzoo_train('test', '--ckpt_path', 'best')
    assert float(c.trainer.callback_metrics['test_miou']) == pytest.approx(best, abs=1e-6)
    c = attnzoo_train('validate', '--ckpt_path', 'best')
    assert float(c.trainer.callback_metrics['val_miou']) == pytest.approx(best, abs=1e-6)
    attnzoo_train('predict', '--ckpt_path', 'best')
    written = sorted((root / 'predictions' / 'predictions').glob('*.png'))
    assert [p.stem for p in written] == sorted(os.path.splitext(os.path.basename(p))[0] for p, _ in val.samples)
    from PIL import Image
    label_map = np.array(Image.open(written[0]))
    assert label_map.shape == (64, 96) and set(np.unique(label_map)) <= {0, 1, 2, 3}


def _constant_detections(train, val, num_classes):
    """The best constant guess: in every image, each class's mean training box (relative), score one."""
    boxes = {k: [] for k in range(1, num_classes)}
    for i in range(len(train)):
        image, target = train[i]
        scale = torch.tensor([image.shape[2], image.shape[1]] * 2)
        for box, label in zip(target['boxes'], target['labels'].tolist()):
            boxes[label].append(box / scale)
    preds, targets = [], []
    for i in range(len(val)):
        image, target = val[i]
        scale = torch.tensor([image.shape[2], image.shape[1]] * 2)
        means = [torch.stack(boxes[k]).mean(0) * scale for k in boxes if boxes[k]]
        labels = [k for k in boxes if boxes[k]]
        preds.append({'boxes': torch.stack(means), 'scores': torch.ones(len(labels)), 'labels': torch.tensor(labels)})
        targets.append({'boxes': target['boxes'], 'labels': target['labels']})
    return preds, targets


def test_detection_recipe(tmp_path, cache):
    from pycocotools.coco import COCO
    from torchmetrics.detection import MeanAveragePrecision

    root = tmp_path / 'run'
    # two of the config's four epochs: 32 steps, enough to learn (the detector's losses level off
    # near 0.6 of their first steps' by then)
    attnzoo_train = _runs('shapes_detection', root, '--trainer.max_epochs', '2')
    cli = attnzoo_train('fit')
    history = _history(cli)
    running = [v for _, v in history['train_loss_step']]
    assert running[-1] < 0.7 * running[0], running

    dm = cli.datamodule
    train = dm.build_dataset('train', None)
    metric = MeanAveragePrecision(backend='pycocotools')
    metric.update(*_constant_detections(train, dm.dataset('val'), dm.num_classes))
    constant = metric.compute()
    best, _ = _best(cli, 'val_map')
    map50 = history['val_map_50'][-1][1]
    # measured (two threads): box AP 0.135, AP50 0.33 against the constant's 0.026, 0.112
    assert best > 2 * float(constant['map']) and map50 > 2 * float(constant['map_50']), (
        best, map50, constant['map'], constant['map_50'])
    ckpts = root / 'checkpoints'
    for png in ('curves.png', 'boxes.png'):
        assert (ckpts / png).stat().st_size > 10_000

    c = attnzoo_train('test', '--ckpt_path', 'best')
    assert float(c.trainer.callback_metrics['test_map']) == pytest.approx(best, abs=1e-6)
    attnzoo_train('predict', '--ckpt_path', 'best')
    # COCO results in the json's ids, as pycocotools reads them
    val = dm.dataset('val')
    with open(root / 'predictions' / 'predictions.json') as f:
        results = json.load(f)
    assert results and {r['image_id'] for r in results} <= {im['id'] for im in val.data['images']}
    gt = COCO(str(val.ann_file))
    assert len(gt.loadRes(results).getAnnIds()) == len(results)


def test_mask_rcnn_through_the_detection_recipe(tmp_path, cache):
    # Mask R-CNN's path: instance masks in the data, mask AP beside box AP, for two steps
    cli = run(['fit', '--config', 'shapes_detection', '--trainer.default_root_dir', str(tmp_path / 'run'), *QUIET,
               '--model.init_args.arch', 'mask_rcnn', '--data.init_args.masks', 'true',
               '--model.init_args.model_kwargs.mask_head_channels', '32', '--trainer.max_steps', '2',
               '--trainer.limit_val_batches', '1', '--data.init_args.num_train', '8', '--data.init_args.num_val', '4'])
    metrics = cli.trainer.callback_metrics
    assert {'train_loss_mask', 'val_map', 'val_segm_map', 'val_segm_map_50'} <= set(metrics)
    assert all(-1 <= float(metrics[k]) <= 1 for k in ('val_map', 'val_segm_map'))
    with pytest.raises(ValueError, match='set data.init_args.masks to true'):
        run(['fit', '--config', 'shapes_detection', '--trainer.default_root_dir', str(tmp_path / 'bad'), *QUIET,
             '--model.init_args.arch', 'mask_rcnn', '--trainer.max_steps', '1'])


def test_medical_recipe(tmp_path, cache):
    from attnzoo.recipes.data.volumes import read_nifti

    root = tmp_path / 'run'
    attnzoo_train = _runs('volumes_medical', root)
    cli = attnzoo_train('fit')
    history = _history(cli)
    losses = [v for _, v in history['train_loss']]
    assert losses[-1] < 0.6 * losses[0], losses
    best, _ = _best(cli, 'val_dice')
    # the best constant: every voxel tumour (all background has no foreground Dice at all)
    val = cli.datamodule.dataset('val')
    dice = []
    for i in range(len(val)):
        label = val[i]['label']
        dice.append(2 * label.sum().item() / (label.numel() + label.sum().item()))
    constant = float(np.mean(dice))
    assert best > constant + 0.4, (best, constant)
    hd95 = [v for _, v in history['val_hd95']]
    assert np.isfinite(hd95[-1]) and hd95[-1] < hd95[0]
    ckpts = root / 'checkpoints'
    for png in ('curves.png', 'slices_0.png'):
        assert (ckpts / png).stat().st_size > 10_000

    c = attnzoo_train('test', '--ckpt_path', 'best')
    assert float(c.trainer.callback_metrics['test_dice']) == pytest.approx(best, abs=1e-6)
    attnzoo_train('predict', '--ckpt_path', 'best')
    written = sorted((root / 'predictions' / 'predictions').glob('*.nii.gz'))
    assert [p.name for p in written] == [f'{c}.nii.gz' for c, _, _ in val.samples]
    pred, image = read_nifti(written[0]), read_nifti(val.samples[0][1])
    assert pred.data.shape == image.data.shape and np.allclose(pred.affine, image.affine)
    assert set(np.unique(pred.data)) <= {0, 1}


def test_medical_task_segments_2d_images(cache):
    # the 2D path: (image, mask) batches of RGB images, sliding windows over each image
    import pytorch_lightning as pl

    from attnzoo.recipes.datamodules import ShapesSegmentationDataModule
    from attnzoo.recipes.tasks import MedicalSegmentationTask

    task = MedicalSegmentationTask(arch='agunet', spatial_dims=2, in_chans=3, num_classes=4,
                                   model_kwargs={'channels': [8, 16, 32]}, roi_size=[32, 32])
    dm = ShapesSegmentationDataModule(num_train=8, num_val=4, batch_size=4, seed=0)
    trainer = pl.Trainer(fast_dev_run=2, accelerator='cpu', logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(task, dm)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics['train_loss']) and 0 <= float(metrics['val_dice']) <= 1
    assert len(task.samples) == 2 and task.samples[0][2].shape == (64, 96)
    assert set(task.figures(trainer)) == {'masks'}


@pytest.mark.parametrize('config', ['shapes_segmentation', 'shapes_detection'])
def test_dense_tasks_refuse_a_head_that_does_not_fit_the_data(tmp_path, cache, config):
    # the check every task inherits from BaseTask.setup, before any step runs
    with pytest.raises(ValueError, match="the data has 4 classes, the model's head 7: set model.init_args.num_classes"):
        run(['fit', '--config', config, '--trainer.default_root_dir', str(tmp_path), *QUIET,
             '--model.init_args.num_classes', '7', '--trainer.max_steps', '1'])
