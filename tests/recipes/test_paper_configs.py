"""The papers' recipes shipped as configs parse through attnzoo-train's CLI and build what the papers
trained (models instantiated, never trained; the data folders are not needed to build them)."""
import pytest

from attnzoo.recipes.cli import AttnzooCLI, list_configs, resolve_config
from attnzoo.recipes.datamodules import BaseDataModule
from attnzoo.recipes.tasks import BaseTask
from attnzoo.recipes.tasks.base import _nested_no_weight_decay

# on this CPU: no GPUs, no mixed precision, no downloads of the pretrained backbones
CPU = ['--trainer.accelerator', 'cpu', '--trainer.devices', '1', '--trainer.strategy', 'auto',
       '--trainer.precision', '32-true', '--trainer.sync_batchnorm', 'false']


def _build(name, *extra):
    return AttnzooCLI(BaseTask, BaseDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
                      args=['--config', resolve_config(name), *CPU, *extra])


def _params(module):
    return sum(p.numel() for p in module.parameters()) / 1e6


def test_every_packaged_config_is_listed():
    assert {'digits', 'shapes_segmentation', 'shapes_detection', 'volumes_medical', 'dinat_tiny_upernet_ade20k',
            'dinat_tiny_maskrcnn_coco_3x', 'agunet_3d_meningioma', 'davit_tiny_imagenet'} <= set(list_configs())


def test_dinat_tiny_upernet_ade20k():
    cli = _build('dinat_tiny_upernet_ade20k', '--model.init_args.pretrained_backbone', 'false')
    hp, trainer, dm = cli.model.hparams, cli.trainer, cli.datamodule
    assert type(cli.model).__name__ == 'SegmentationTask' and hp.arch == 'upernet' and hp.num_classes == 150
    assert _params(cli.model.model) == pytest.approx(58, abs=0.5)  # the NAT README's 58 M
    assert cli.model.model.aux_loss_weight == 0.4
    assert trainer.max_steps == 160_000 and trainer.val_check_interval == 16_000
    opt, sched = hp.optimizer, hp.scheduler
    assert (opt['opt'], opt['lr'], opt['weight_decay'], tuple(opt['betas'])) == ('adamw', 6e-5, 0.01, (0.9, 0.999))
    assert (sched['sched'], sched['decay_rate'], sched['warmup_steps']) == ('poly', 1.0, 1500) and sched['on_updates']
    assert sched['warmup_lr'] == pytest.approx(6e-5 * 1e-6)
    # the relative position biases skip weight decay as 'rpb': decay_mult=0 in the mmseg config
    names = _nested_no_weight_decay(cli.model.model)
    assert names and all(n.endswith('.rpb') for n in names)
    assert len(names) == sum(n.endswith('.rpb') for n, _ in cli.model.model.named_parameters())
    cli.model.hparams.scheduler = dict(sched, sched='none')  # the schedule needs a trainer; the groups do not
    groups = cli.model.configure_optimizers()['optimizer'].param_groups
    by_id = {id(p): n for n, p in cli.model.model.named_parameters()}
    no_decay = {by_id[id(p)] for g in groups if g['weight_decay'] == 0 for p in g['params']}
    decay = {by_id[id(p)] for g in groups if g['weight_decay'] == 0.01 for p in g['params']}
    assert set(names) <= no_decay and not any('norm' in n or n.endswith('.rpb') for n in decay)
    assert len(no_decay) + len(decay) == len(by_id)
    # 8 GPUs x 2 images, 512 x 512 crops of ADE20K with its zero label reduced
    assert dm.batch_size == 2 and dm.image_size == 512 and dm.reduce_zero_label and dm.num_classes == 150
    assert (dm.train_preset, dm.eval_preset, dm.eval_batch_size) == ('ade20k', 'ade20k_eval', 1)
    assert cli.model.model.backbone.dense_cfg == 'upernet'


def test_dinat_tiny_maskrcnn_coco_3x():
    cli = _build('dinat_tiny_maskrcnn_coco_3x', '--model.init_args.pretrained_backbone', 'false')
    hp, model = cli.model.hparams, cli.model.model
    assert type(cli.model).__name__ == 'DetectionTask' and hp.arch == 'mask_rcnn' and hp.num_classes == 81
    assert _params(model) == pytest.approx(48, abs=0.6)  # the NAT README's 48 M (mmdet's heads differ a little)
    assert model.backbone.body.dense_cfg == 'maskrcnn'
    assert cli.trainer.max_epochs == 36
    assert list(model.transform.min_size) == list(range(480, 801, 32)) and model.transform.max_size == 1333
    assert model.rpn._post_nms_top_n['training'] == 1000 and model.roi_heads.detections_per_img == 100
    opt, sched = hp.optimizer, hp.scheduler
    assert (opt['opt'], opt['lr'], opt['weight_decay']) == ('adamw', 1e-4, 0.05)
    assert (sched['sched'], list(sched['decay_milestones']), sched['decay_rate'], sched['warmup_steps']) == (
        'multistep', [27, 33], 0.1, 500)
    dm = cli.datamodule
    assert dm.masks and dm.batch_size == 2 and dm.train_preset == 'coco_detr'


def test_agunet_3d_meningioma():
    cli = _build('agunet_3d_meningioma')
    hp = cli.model.hparams
    assert type(cli.model).__name__ == 'MedicalSegmentationTask' and hp.spatial_dims == 3 and hp.arch == 'agunet'
    # the paper's widths with multi-scale input and deep supervision: README "Medical"'s count
    assert sum(p.numel() for p in cli.model.model.parameters()) == 20_431_248
    assert list(hp.roi_size) == [128, 128, 128] and cli.datamodule.image_size == 128


def test_davit_tiny_imagenet():
    cli = _build('davit_tiny_imagenet', '--model.init_args.pretrained', 'false')
    hp = cli.model.hparams
    assert hp.model == 'az_davit_tiny' and _params(cli.model.model) == pytest.approx(28.3, abs=0.1)
    assert cli.trainer.max_epochs == 300 and cli.trainer.gradient_clip_val == 1.0
    assert (hp.optimizer['lr'], hp.optimizer['weight_decay'], hp.drop_path_rate) == (1e-3, 0.05, 0.1)
    assert cli.datamodule.batch_size == 128  # x 8 GPUs: the README's 1024
