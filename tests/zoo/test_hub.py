"""Hub I/O the way users meet it: save then load by local-dir:, load by hf-hub: from a hand-laid cache
offline, a clear error for a missing file, and a model card that carries the evaluation results."""
import json
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import ModelCard, constants
from huggingface_hub.repocard_data import model_index_to_eval_results

import attnzoo
from attnzoo.zoo import eval_results_from, from_pretrained, push_to_hub, save_pretrained
from attnzoo.zoo.profile import count_gmacs

from ..conftest import load_script, randomize_

COMMIT = '0123456789abcdef0123456789abcdef01234567'


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hand_laid_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """The files of ``folder`` in a Hugging Face cache as huggingface_hub lays it out: blobs named by
    content, a snapshot of symlinks to them, and refs/main naming the snapshot's commit."""
    repo = cache / ('models--' + repo_id.replace('/', '--'))
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(COMMIT)
    (repo / 'blobs').mkdir()
    snapshot = repo / 'snapshots' / COMMIT
    snapshot.mkdir(parents=True)
    for i, path in enumerate(sorted(folder.iterdir())):
        blob = repo / 'blobs' / f'{i:040x}'
        blob.write_bytes(path.read_bytes())
        (snapshot / path.name).symlink_to(Path('..', '..', 'blobs', blob.name))
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 with an empty cache under tmp_path: huggingface_hub reads both settings at import,
    so the test sets its constants as the environment variables would have."""
    cache = tmp_path / 'hub'
    cache.mkdir()
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
    return cache


@pytest.fixture(scope='module')
def classifier():
    return randomize_(timm.create_model('az_shvit_s1', num_classes=5), 7).eval()


def test_save_pretrained_then_local_dir_gives_the_same_logits(classifier, tmp_path):
    folder = save_pretrained(classifier, tmp_path / 'shvit')
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == 'az_shvit_s1' and config['num_classes'] == 5

    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        want = classifier(x)
        for loaded in (timm.create_model(f'local-dir:{folder}', pretrained=True), from_pretrained(str(folder))):
            assert type(loaded) is type(classifier)
            assert torch.equal(loaded.eval()(x), want)


def test_hf_hub_name_loads_offline_from_the_cache_and_a_missing_file_is_explained(classifier, tmp_path,
                                                                                  offline_cache):
    snapshot = hand_laid_cache(offline_cache, 'attnzoo-test/shvit-s1', save_pretrained(classifier, tmp_path / 'd'))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = classifier(x)
        assert torch.equal(timm.create_model('hf-hub:attnzoo-test/shvit-s1', pretrained=True).eval()(x), want)
        assert torch.equal(from_pretrained('hf-hub:attnzoo-test/shvit-s1').eval()(x), want)

    (snapshot / 'model.safetensors').unlink()
    with pytest.raises(attnzoo.PretrainedWeightsNotFoundError, match=r"'attnzoo-test/shvit-s1'.*offline"):
        timm.create_model('hf-hub:attnzoo-test/shvit-s1', pretrained=True)
    with pytest.raises(attnzoo.PretrainedWeightsNotFoundError,
                       match=r"model.safetensors of Hugging Face repository 'attnzoo-test/shvit-s1' is not in"):
        from_pretrained('hf-hub:attnzoo-test/shvit-s1')
    (snapshot / 'config.json').unlink()
    with pytest.raises(attnzoo.PretrainedWeightsNotFoundError,
                       match=r"config.json of Hugging Face repository 'attnzoo-test/shvit-s1' is not in the local "
                             r"Hugging Face cache and this machine is offline"):
        from_pretrained('hf-hub:attnzoo-test/shvit-s1')


def test_model_card_carries_paper_license_size_and_the_eval_scripts_results(classifier, tmp_path):
    # the three eval scripts' output files: validate.py's csv (two models), eval_coco's two iou types,
    # eval_segmentation's mmseg names
    imagenet = tmp_path / 'imagenet.csv'
    imagenet.write_text('model,top1,top1_err,top5,top5_err,param_count,img_size,crop_pct,interpolation\n'
                        'az_shvit_s1.in1k,72.812,27.188,91.03,8.97,6.33,224,0.875,bicubic\n'
                        'az_van_b0.in1k,75.41,24.59,92.6,7.4,4.11,224,0.9,bicubic\n')
    coco = tmp_path / 'coco.json'
    coco.write_text(json.dumps({'bbox': {'map': 0.4123, 'map_50': 0.6211, 'map_75': 0.45, 'map_small': -1.0},
                                'segm': {'map': 0.3712, 'map_50': 0.5901}}))
    ade = {'aAcc': 81.25, 'mIoU': 47.31, 'mAcc': 58.02}

    folder = save_pretrained(classifier, tmp_path / 'card', repo_id='attnzoo/shvit-s1', metrics=[imagenet, coco, ade])
    card = ModelCard.load(folder / 'README.md')
    data = card.data.to_dict()
    assert data['license'] == 'mit' and data['library_name'] == 'timm'
    assert data['pipeline_tag'] == 'image-classification'
    name, results = model_index_to_eval_results(data['model-index'])
    assert name == 'shvit-s1'
    got = {(r.dataset_name, r.metric_name): r.metric_value for r in results}
    assert got == {
        ('ImageNet-1k', 'Top-1 accuracy'): 72.812, ('ImageNet-1k', 'Top-5 accuracy'): 91.03,
        ('COCO', 'box AP'): 41.23, ('COCO', 'box AP50'): 62.11, ('COCO', 'box AP75'): 45.0,
        ('COCO', 'mask AP'): 37.12, ('COCO', 'mask AP50'): 59.01,
        ('ADE20K', 'mIoU'): 47.31, ('ADE20K', 'mAcc'): 58.02, ('ADE20K', 'aAcc'): 81.25}
    params = sum(p.numel() for p in classifier.parameters()) / 1e6
    gmacs = count_gmacs('az_shvit_s1', (3, 224, 224), num_classes=5)
    text = card.text
    assert f'**Parameters (M):** {params:.2f}' in text and f'**GMACs:** {gmacs:.2f} at 3x224x224' in text
    assert '[SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design]' \
           '(https://arxiv.org/abs/2401.16456)' in text
    assert "timm.create_model('hf-hub:attnzoo/shvit-s1', pretrained=True)" in text
    assert '| COCO | val2017 | box AP | 41.23 |' in text

    with pytest.raises(ValueError, match='2 result rows, 0 of them named'):
        eval_results_from(imagenet, ['az_davit_tiny'])
    # one row of another model is not this model's result either
    with pytest.raises(ValueError, match='1 result rows, 0 of them named az_davit_tiny'):
        eval_results_from({'model': 'az_van_b0.in1k', 'top1': 75.4, 'top5': 92.6}, ['az_davit_tiny'])
    with pytest.raises(ValueError, match='none of the eval scripts'):
        eval_results_from({'accuracy': 1.0})


def test_push_to_hub_uploads_the_saved_folder(classifier, monkeypatch):
    calls = {}

    class Repo:
        repo_id = 'someone/shvit-s1'

    def create_repo(self, repo_id, private=False, exist_ok=False):
        calls['create'] = (repo_id, private, exist_ok)
        return Repo()

    def upload_folder(self, repo_id, folder_path, **kwargs):
        calls['upload'] = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        return 'commit'

    monkeypatch.setattr('huggingface_hub.HfApi.create_repo', create_repo)
    monkeypatch.setattr('huggingface_hub.HfApi.upload_folder', upload_folder)
    assert push_to_hub(classifier, 'shvit-s1', metrics={'top1': 70.0, 'top5': 90.0}, private=True) == 'commit'
    assert calls['create'] == ('shvit-s1', True, True)
    assert sorted(calls['upload']) == ['README.md', 'config.json', 'model.safetensors']
    assert b"hf-hub:someone/shvit-s1" in calls['upload']['README.md']


def test_push_to_hub_script_dry_run_writes_a_folder_that_loads(classifier, tmp_path, capsys):
    script = load_script('push_to_hub')
    checkpoint = tmp_path / 'best.pth'
    torch.save({'state_dict': classifier.state_dict()}, checkpoint)
    results = tmp_path / 'results.json'
    results.write_text(json.dumps({'model': 'az_shvit_s1', 'top1': 61.5, 'top5': 88.25}))
    out = tmp_path / 'out'
    assert script.main(['org/shvit-s1-digits', '--model', 'az_shvit_s1', '--checkpoint', str(checkpoint),
                        '--num-classes', '5', '--metrics', str(results), '--dry-run', str(out)]) == 0
    assert capsys.readouterr().out.strip() == f'wrote {out}: README.md, config.json, model.safetensors'
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(timm.create_model(f'local-dir:{out}', pretrained=True).eval()(x), classifier(x))
    _, results = model_index_to_eval_results(ModelCard.load(out / 'README.md').data.to_dict()['model-index'])
    assert [(r.metric_name, r.metric_value) for r in results] == [('Top-1 accuracy', 61.5), ('Top-5 accuracy', 88.25)]

    assert script.main(['org/x', '--model', 'az_shvit_s1', '--checkpoint', str(checkpoint), '--dry-run', str(out)]) == 1
    assert 'does not fit' in capsys.readouterr().err
    assert script.main(['org/x', '--task-config', str(tmp_path / 'no_cfg.json'), '--dry-run', str(out)]) == 1
    assert 'no_cfg.json is neither a file nor inline json' in capsys.readouterr().err


def test_broken_saved_folders_are_named(classifier, tmp_path):
    folder = save_pretrained(classifier, tmp_path / 'shvit', card=False)
    (folder / 'model.safetensors').unlink()
    with pytest.raises(attnzoo.PretrainedWeightsNotFoundError, match='model.safetensors of saved model'):
        from_pretrained(f'local-dir:{folder}')
    (folder / 'config.json').write_text('{"num_classes": 5}')
    with pytest.raises(attnzoo.CheckpointReadError, match="config.json of saved model .* names no architecture"):
        from_pretrained(f'local-dir:{folder}')
    (folder / 'config.json').write_text('not json')
    with pytest.raises(attnzoo.CheckpointReadError, match='config.json of saved model .* is not valid json'):
        from_pretrained(str(folder))


def _same_outputs(a, b) -> bool:
    """Equal outputs, whatever their nesting (tensors, lists of them, torchvision's detection dicts)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_outputs(a[k], b[k]) for k in a)
    return len(a) == len(b) and all(_same_outputs(x, y) for x, y in zip(a, b))


def _medical():
    from attnzoo.zoo import create_medical_model
    model = create_medical_model('daunet', spatial_dims=3, in_chans=2, num_classes=3, channels=(4, 8),
                                 attention_guiding=True)
    return randomize_(model, 3), torch.randn(1, 2, 16, 16, 16)


def _segmentation():
    from attnzoo.zoo import create_segmentation_model
    model = create_segmentation_model('upernet', 'az_van_b0', 5, channels=16, aux_channels=8, pool_scales=(1, 2))
    return randomize_(model, 4), torch.randn(1, 3, 64, 96)


def _detection():
    from attnzoo.zoo import create_detection_model
    torch.manual_seed(0)
    model = create_detection_model('fcos', 'az_van_b0', 4, min_size=64, max_size=96, fpn_channels=64,
                                   topk_candidates=32, detections_per_img=5, score_thresh=0.0)
    return model, [torch.rand(3, 64, 96)]


@pytest.mark.parametrize('build', [_medical, _segmentation, _detection], ids=['medical', 'segmentation', 'detection'])
def test_task_models_round_trip_by_local_dir_and_offline_hf_hub(build, tmp_path, offline_cache):
    model, x = build()
    model.eval()
    task = model.attnzoo_cfg['task']
    folder = save_pretrained(model, tmp_path / task, repo_id=f'attnzoo-test/{task}')
    config = json.loads((folder / 'config.json').read_text())
    assert config['attnzoo_cfg'] == json.loads(json.dumps(model.attnzoo_cfg))
    card = ModelCard.load(folder / 'README.md')
    assert card.data.library_name == 'attnzoo' and 'not counted' not in card.text  # GMACs on the meta device
    assert f"attnzoo.zoo.from_pretrained('hf-hub:attnzoo-test/{task}')" in card.text
    if task == 'medical':
        assert '**Architecture:** daunet (its own convolutional encoder)' in card.text
    else:
        assert '**Paper:** [Visual Attention Network](https://arxiv.org/abs/2202.09741)' in card.text

    hand_laid_cache(offline_cache, f'attnzoo-test/{task}', folder)
    with torch.no_grad():
        want = model(x)
        for name in (f'local-dir:{folder}', str(folder), f'hf-hub:attnzoo-test/{task}'):
            loaded = from_pretrained(name).eval()
            assert type(loaded) is type(model) and _same_outputs(loaded(x), want), name
