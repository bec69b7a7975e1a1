"""scripts/eval_imagenet.py on a generated ImageNet-layout folder: timm validate.py's numbers, one row per
model, and a clear failure for each thing a user can get wrong."""
import json
import tarfile
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torchvision.datasets import ImageFolder

from attnzoo.zoo import save_pretrained

from ..conftest import load_script, randomize_

NUM_CLASSES = 8
NUM_IMAGES = 48
# validate.py's data flags, given to the script and resolved the same way in the oracle
DATA_ARGS = dict(img_size=64, crop_pct=0.9, interpolation='bilinear')
DATA_FLAGS = ['--img-size', '64', '--crop-pct', '0.9', '--interpolation', 'bilinear']


@pytest.fixture(scope='module')
def script() -> ModuleType:
    return load_script('eval_imagenet')


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(seed: int):
    """Images of assorted sizes and aspect ratios, so the resize and the centre crop both matter."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(NUM_IMAGES):
        h, w = rng.integers(48, 120, size=2)
        base = rng.integers(0, 256, (1, 1, 3))
        noise = rng.integers(-60, 60, (h, w, 3))
        ramp = np.linspace(0, rng.integers(-80, 80), w)[None, :, None]
        out.append(Image.fromarray(np.clip(base + noise + ramp, 0, 255).astype(np.uint8)))
    return out


def _logits(model, images, data_args):
    """The model's logits on PIL images through timm's own eval transform (resize, centre crop, normalise)."""
    transform = create_transform(**resolve_data_config(data_args, model=model))
    with torch.no_grad():
        return torch.cat([model(transform(img)[None]) for img in images])


@pytest.fixture(scope='module')
def imagenet(tmp_path_factory):
    """An ImageNet-layout folder labelled from the oracle's own predictions: image i's label is the class
    its logits rank at place i % 6, so exactly 1/6 of the images are top-1 hits and 5/6 top-5 hits, and
    any difference in preprocessing (size, crop, interpolation, normalisation) moves predictions off
    these labels. Also the model, its checkpoint and a tar of the folder."""
    tmp = tmp_path_factory.mktemp('imagenet')
    torch.set_num_threads(1)
    model = randomize_(timm.create_model('az_shvit_s1', num_classes=NUM_CLASSES), 3).eval()
    images = _images(seed=3)
    # a random network ranks the classes nearly alike for every image; a head centred on these images'
    # features makes the ranking depend on the image, so a preprocessing slip changes the numbers
    transform = create_transform(**resolve_data_config(DATA_ARGS, model=model))
    with torch.no_grad():
        features = torch.cat([model.forward_head(model.forward_features(transform(img)[None]), pre_logits=True)
                              for img in images])
        head = model.get_classifier()
        head.bias.copy_(-head.weight @ features.mean(0))
    ranks = _logits(model, images, DATA_ARGS).argsort(dim=1, descending=True)
    labels = [int(ranks[i, i % 6]) for i in range(NUM_IMAGES)]
    assert sorted(set(labels)) == list(range(NUM_CLASSES)), 'every class needs an image: pick another seed'
    root = tmp / 'imagenet'
    for i, (img, label) in enumerate(zip(images, labels)):
        folder = root / 'val' / f'n{label:08d}'
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f'img_{i:03d}.png')
    # laid out as attnzoo-train's Lightning checkpoints are: the model under model., an EMA copy beside
    checkpoint = tmp / 'checkpoint.pth'
    sd = model.state_dict()
    torch.save({'epoch': 3, 'state_dict': {**{f'model.{k}': v for k, v in sd.items()},
                                           **{f'model_ema.module.{k}': v + 1 for k, v in sd.items()}}}, checkpoint)
    tar = tmp / 'val.tar'
    with tarfile.open(tar, 'w') as tf:
        tf.add(root / 'val', arcname='.')
    return dict(root=root, tar=tar, model=model, checkpoint=checkpoint, images=images, labels=labels)


def _expected(top1_hits: int, top5_hits: int, n: int = NUM_IMAGES):
    return round(100 * top1_hits / n, 4), round(100 * top5_hits / n, 4)


def test_folder_and_tar_give_the_oracle_numbers(script, imagenet, tmp_path, capsys):
    top1, top5 = _expected(NUM_IMAGES // 6, NUM_IMAGES - NUM_IMAGES // 6)
    out = tmp_path / 'results.json'
    args = ['--model', 'az_shvit_s1', '--checkpoint', str(imagenet['checkpoint']), '--num-classes', str(NUM_CLASSES),
            *DATA_FLAGS, '-b', '8', '-j', '0', '--device', 'cpu', '--no-progress']
    # the parent folder: the script finds val/ as validate.py does
    assert script.main([str(imagenet['root'])] + args + ['--results-file', str(out), '--results-format', 'json']) == 0
    row = json.loads(out.read_text())
    # validate.py's columns for one model and a checkpoint file (its checkpoint column is for folders)
    assert list(row) == ['model', 'top1', 'top1_err', 'top5', 'top5_err', 'param_count', 'img_size', 'crop_pct',
                         'interpolation']
    assert (row['top1'], row['top5']) == (top1, top5)
    assert row['top1_err'] == round(100 - top1, 4) and row['top5_err'] == round(100 - top5, 4)
    assert row['param_count'] == round(sum(p.numel() for p in imagenet['model'].parameters()) / 1e6, 2)
    assert (row['img_size'], row['crop_pct'], row['interpolation']) == (64, 0.9, 'bilinear')
    printed = capsys.readouterr().out
    assert f'* Acc@1 {top1:.3f} ({100 - top1:.3f}) Acc@5 {top5:.3f}' in printed and 'img/s' in printed

    csv_out = tmp_path / 'results.csv'
    assert script.main([str(imagenet['tar'])] + args + ['--results-file', str(csv_out)]) == 0
    header, values = csv_out.read_text().splitlines()
    assert header == 'model,top1,top1_err,top5,top5_err,param_count,img_size,crop_pct,interpolation'
    assert values.split(',')[1:5] == [str(top1), str(round(100 - top1, 4)), str(top5), str(round(100 - top5, 4))]


def _oracle(model, folder: Path, data_args):
    """top-1/top-5 of ``model`` on ``folder`` computed apart from the script: torchvision's ImageFolder
    for the files and labels, timm's transform for the pixels."""
    dataset = ImageFolder(str(folder))
    images = [Image.open(path).convert('RGB') for path, _ in dataset.samples]
    target = torch.tensor(dataset.targets)
    ranks = _logits(model, images, data_args).argsort(dim=1, descending=True)
    top1 = (ranks[:, 0] == target).sum().item()
    top5 = (ranks[:, :5] == target[:, None]).any(1).sum().item()
    return _expected(top1, top5, len(target))


def test_several_models_one_row_each_from_local_dirs(script, imagenet, tmp_path, capsys):
    # a zoo model and a plain timm model, each saved with attnzoo's save_pretrained and named by local-dir:
    models = {}
    for i, name in enumerate(['az_shvit_s1', 'test_resnet']):
        model = randomize_(timm.create_model(name, num_classes=NUM_CLASSES), 10 + i).eval()
        folder = save_pretrained(model, tmp_path / name, card=False)
        models[f'local-dir:{folder}'] = model
    out = tmp_path / 'results.csv'
    assert script.main([str(imagenet['root'] / 'val'), '--model', *models, *DATA_FLAGS, '-b', '16', '-j', '0',
                        '--device', 'cpu', '--no-progress', '--results-file', str(out)]) == 0
    rows = [line.split(',') for line in out.read_text().splitlines()]
    assert rows[0] == ['model', 'top1', 'top1_err', 'top5', 'top5_err', 'param_count', 'img_size', 'crop_pct',
                       'interpolation']
    got = {r[0]: (float(r[1]), float(r[3])) for r in rows[1:]}
    want = {name: _oracle(model, imagenet['root'] / 'val', DATA_ARGS) for name, model in models.items()}
    assert got == want
    # validate.py's order for several models: best top-1 first
    assert [r[0] for r in rows[1:]] == sorted(want, key=lambda n: want[n][0], reverse=True)
    table = capsys.readouterr().out.split('\n\n')[-1]
    assert table.splitlines()[0].split() == ['model', 'top1', 'top1_err', 'top5', 'top5_err', 'img_per_sec',
                                             'param_count', 'img_size', 'crop_pct', 'interpolation']
    assert len(table.strip().splitlines()) == 2 + len(models)


def test_user_errors_exit_non_zero_with_a_clear_message(script, imagenet, tmp_path, capsys):
    common = ['--model', 'az_shvit_s1', '--num-classes', str(NUM_CLASSES), '--checkpoint', str(imagenet['checkpoint']),
              *DATA_FLAGS, '-b', '8', '-j', '0', '--device', 'cpu', '--no-progress']

    def run(data, *extra):
        code = script.main([str(data), *common, *extra])
        return code, capsys.readouterr().err

    code, err = run(tmp_path / 'nowhere')
    assert code == 1 and 'nowhere does not exist' in err

    empty = tmp_path / 'empty'
    (empty / 'n0').mkdir(parents=True)
    code, err = run(empty)
    assert code == 1 and 'no images in' in err

    few = tmp_path / 'three_classes'
    for c in range(3):
        (few / f'n{c}').mkdir(parents=True)
        imagenet['images'][c].save(few / f'n{c}' / 'a.png')
    code, err = run(few)
    assert code == 1 and 'has 3 classes (subfolders) but az_shvit_s1 predicts 8' in err and '--class-map' in err
    # a class folder without images is no class to the reader: said, rather than a count that would
    # shift every later class's index
    for c in range(3, NUM_CLASSES):
        (few / f'n{c}').mkdir()
        if c != 4:
            imagenet['images'][c].save(few / f'n{c}' / 'a.png')
    code, err = run(few)
    assert code == 1 and 'class folders without images: n4' in err

    # flags validate.py would take and then fail on with a traceback
    code, err = run(imagenet['root'], '--input-size', '3', '40', '40')
    assert code == 1 and 'needs H and W of at least 64' in err and 'Traceback' not in err
    with pytest.raises(SystemExit):
        script.main([str(imagenet['root']), *common, '--mean', '0.5', '0.5'])
    assert '--mean takes one value or one per channel (3), got 2' in capsys.readouterr().err

    # the checkpoint's head has 8 outputs, the model asked for 10: every differing tensor is named
    code = script.main([str(imagenet['root']), *common[:2], '--num-classes', '10', *common[4:]])
    err = capsys.readouterr().err
    assert code == 1 and 'checkpoint.pth does not fit' in err
    assert 'head.l.weight' in err and '(8, 320) vs model (10, 320)' in err

    broken = tmp_path / 'broken'
    for label in range(NUM_CLASSES):
        (broken / f'n{label}').mkdir(parents=True)
        imagenet['images'][label].save(broken / f'n{label}' / 'a.png')
    (broken / 'n5' / 'b.png').write_bytes(b'not a png at all')
    code, err = run(broken)
    assert code == 1 and f'cannot read image {broken / "n5" / "b.png"}' in err

    with pytest.raises(SystemExit) as exit_info:
        script.main([str(imagenet['root']), '--model', 'az_no_such_model'])
    assert exit_info.value.code == 2 and 'unknown model' in capsys.readouterr().err


def test_seeded_head_and_a_wildcard_write_a_list_as_validate_does(script, imagenet, tmp_path):
    # a head built anew (pretrained weights, another class count) is the same every run, as
    # validate.py seeds (42) before building the model; a wildcard is its bulk mode even for one match
    from attnzoo.zoo import save_pretrained
    folder = save_pretrained(randomize_(timm.create_model('az_shvit_s1'), 5).eval(), tmp_path / 'm', card=False)
    args = [str(imagenet['root']), '--num-classes', str(NUM_CLASSES), *DATA_FLAGS, '-b', '16', '-j', '0',
            '--device', 'cpu', '--no-progress', '--results-format', 'json']
    rows = []
    for i in range(2):
        out = tmp_path / f'r{i}.json'
        assert script.main(args + ['--model', f'local-dir:{folder}', '--results-file', str(out)]) == 0
        rows.append(json.loads(out.read_text()))
    assert isinstance(rows[0], dict) and rows[0] == rows[1]
    out = tmp_path / 'w.json'
    assert script.main(args + ['--checkpoint', str(imagenet['checkpoint']), '--model', 'az_shvit_s1*',
                               '--results-file', str(out)]) == 0
    listed = json.loads(out.read_text())
    assert isinstance(listed, list) and [r['model'] for r in listed] == ['az_shvit_s1.in1k']


def test_wildcards_expand_to_pretrained_tags_as_validate_does():
    from attnzoo.recipes.evaluation.imagenet import expand_model_names
    names = expand_model_names(['az_shvit_s*', 'test_resnet', 'local-dir:/some/folder', 'az_shvit_s1.in1k'])
    assert names == timm.list_models('az_shvit_s*', pretrained=True) + ['test_resnet', 'local-dir:/some/folder']


def test_validate_model_and_scoring_options(script, imagenet, tmp_path):
    # a 12-class model scored on the folder's 8 classes through --valid-labels, max pooling through
    # --gp, fused through --reparam, and ImageNet-ReaL labels: each against its oracle
    images, labels = imagenet['images'], imagenet['labels']
    model = randomize_(timm.create_model('az_shvit_s1', num_classes=12, global_pool='max'), 7).eval()
    valid = [11, 3, 5, 0, 9, 2, 7, 4]  # the folder's class c is output valid[c]
    valid_file = tmp_path / 'valid.txt'
    valid_file.write_text('\n'.join(map(str, valid)))
    checkpoint = tmp_path / 'twelve.pth'
    torch.save(model.state_dict(), checkpoint)
    # ImageNet's validation names, which ReaL's real.json is indexed by: image i is file i + 1
    val = tmp_path / 'val'
    for i, (img, label) in enumerate(zip(images, labels)):
        (val / f'n{label:08d}').mkdir(parents=True, exist_ok=True)
        img.save(val / f'n{label:08d}' / f'ILSVRC2012_val_{i + 1:08d}.JPEG', quality=98)
    order = ImageFolder(str(val))
    files = [Image.open(path).convert('RGB') for path, _ in order.samples]
    logits = _logits(model, files, DATA_ARGS)[:, valid]
    target = torch.tensor(order.targets)
    ranks = logits.argsort(1, descending=True)
    want = _expected((ranks[:, 0] == target).sum().item(), (ranks[:, :5] == target[:, None]).any(1).sum().item())
    common = [str(tmp_path), '--model', 'az_shvit_s1', '--num-classes', '12', '--checkpoint', str(checkpoint),
              '--gp', 'max', '--valid-labels', str(valid_file), *DATA_FLAGS, '-b', '16', '-j', '0', '--device', 'cpu',
              '--no-progress', '--results-format', 'json']
    out = tmp_path / 'r.json'
    for extra in ([], ['--reparam']):
        assert script.main(common + extra + ['--results-file', str(out)]) == 0
        row = json.loads(out.read_text())
        assert (row['top1'], row['top5']) == want
    # ReaL: several or no labels per image, by the file's number; top-1 counts a hit on any of them
    real = [[int(ranks[i, 0])] if i % 3 == 0 else ([int(ranks[i, 1]), int(ranks[i, 0])] if i % 3 == 1 else [])
            for i in range(NUM_IMAGES)]
    numbers = [int(Path(path).stem.rsplit('_', 1)[1]) - 1 for path, _ in order.samples]
    real_json = tmp_path / 'real.json'
    real_json.write_text(json.dumps([real[numbers.index(n)] if n in numbers else [] for n in range(NUM_IMAGES)]))
    assert script.main(common + ['--real-labels', str(real_json), '--results-file', str(out)]) == 0
    assert json.loads(out.read_text())['top1'] == 100.0  # every labelled image's top guess is among its labels
