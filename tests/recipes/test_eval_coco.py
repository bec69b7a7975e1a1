"""scripts/eval_coco.py: pycocotools' numbers on a detections file and on a detector run over the
synthetic shapes-COCO split, written under torchmetrics' names."""
import contextlib
import copy
import io
import json
from types import ModuleType

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from attnzoo.recipes.data.coco import write_shapes_coco

from ..conftest import load_script

# pycocotools' mask code trips numpy 2's copy-keyword notice on every call
pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning:pycocotools')
NAMES = ['map', 'map_50', 'map_75', 'map_small', 'map_medium', 'map_large',
         'mar_1', 'mar_10', 'mar_100', 'mar_small', 'mar_medium', 'mar_large']


@pytest.fixture(scope='module')
def script() -> ModuleType:
    return load_script('eval_coco')


@pytest.fixture(autouse=True)
def one_thread():
    # several OpenMP threads on a small CI box shared with other test processes spin for busy cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    """A synthetic COCO split with objects of COCO's three sizes: small and medium ones on ten
    96x128 images, large ones on three 320x320 images (two writes merged into one split)."""
    root = tmp_path_factory.mktemp('coco')
    image_dir, ann_file = write_shapes_coco(root, {'val': 10}, image_size=(96, 128), seed=1, max_shapes=4)['val']
    big_dir, big_file = write_shapes_coco(root / 'big', {'val': 3}, image_size=320, seed=2)['val']
    data, big = json.loads(ann_file.read_text()), json.loads(big_file.read_text())
    offset = max(im['id'] for im in data['images'])
    ann_offset = max(a['id'] for a in data['annotations'])
    for im in big['images']:
        (big_dir / im['file_name']).rename(image_dir / f'big_{im["file_name"]}')
        data['images'].append(dict(im, id=im['id'] + offset, file_name=f'big_{im["file_name"]}'))
    data['annotations'] += [dict(a, id=a['id'] + ann_offset, image_id=a['image_id'] + offset)
                            for a in big['annotations']]
    ann_file.write_text(json.dumps(data))
    areas = np.array([a['area'] for a in data['annotations']])
    assert (areas < 32 ** 2).any() and ((areas >= 32 ** 2) & (areas < 96 ** 2)).any() and (areas >= 96 ** 2).any()
    return image_dir, ann_file, data


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {'size': rle['size'], 'counts': rle['counts'].decode('ascii')}


def _gt_mask(ann, height, width) -> np.ndarray:
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(ann['segmentation'], height, width)))


def _perturbed(data, seed=0):
    """Detections a detector could give: every object found with jittered box and shifted mask, some
    twice, some missed, some with the wrong class, plus false positives; scores random."""
    rng = np.random.default_rng(seed)
    images = {im['id']: im for im in data['images']}
    dets = []
    for ann in data['annotations']:
        if rng.random() < 0.15:
            continue  # missed
        im = images[ann['image_id']]
        x, y, w, h = ann['bbox']
        for _ in range(1 + (rng.random() < 0.2)):
            box = [x + rng.normal(0, 0.08 * w), y + rng.normal(0, 0.08 * h), w * rng.uniform(0.8, 1.2),
                   h * rng.uniform(0.8, 1.2)]
            mask = np.roll(_gt_mask(ann, im['height'], im['width']), tuple(rng.integers(-3, 4, 2)), (0, 1))
            category = ann['category_id'] if rng.random() > 0.1 else 1 + (ann['category_id'] % 3)
            dets.append({'image_id': ann['image_id'], 'category_id': category, 'bbox': box,
                         'segmentation': _rle(mask), 'score': float(rng.random())})
    for im in data['images'][::2]:  # false positives
        mask = np.zeros((im['height'], im['width']), np.uint8)
        mask[10:30, 20:50] = 1
        dets.append({'image_id': im['id'], 'category_id': int(rng.integers(1, 4)), 'bbox': [20., 10., 30., 20.],
                     'segmentation': _rle(mask), 'score': float(rng.random())})
    return dets


def _pycocotools(ann_file, dets, iou_type):
    """COCOeval run directly, as its README shows, on the detections of one iou type."""
    field = 'bbox' if iou_type == 'bbox' else 'segmentation'
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        dt = gt.loadRes([{k: d[k] for k in ('image_id', 'category_id', 'score', field)} for d in copy.deepcopy(dets)])
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return dict(zip(NAMES, ev.stats.tolist()))


def test_ground_truth_as_detections_gives_ap_one(script, shapes, tmp_path, capsys):
    _, ann_file, data = shapes
    dets = [{'image_id': a['image_id'], 'category_id': a['category_id'], 'bbox': a['bbox'],
             'segmentation': a['segmentation'], 'score': 1.0} for a in data['annotations']]  # polygons: encoded
    results, out = tmp_path / 'gt.json', tmp_path / 'metrics.json'
    results.write_text(json.dumps(dets))
    assert script.main(['--ann', str(ann_file), '--results', str(results), '--out', str(out)]) == 0
    stats = json.loads(out.read_text())
    assert set(stats) == {'bbox', 'segm'}
    for iou_type in ('bbox', 'segm'):
        assert list(stats[iou_type]) == NAMES
        # every AP and recall 1, but AR@1 where an image holds several objects of one class
        assert all(v == 1.0 for k, v in stats[iou_type].items() if k != 'mar_1'), stats[iou_type]
        assert 0.5 < stats[iou_type]['mar_1'] < 1
    printed = capsys.readouterr().out
    assert ' Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000  map' in printed


def test_perturbed_detections_give_pycocotools_numbers(script, shapes, tmp_path, capsys):
    _, ann_file, data = shapes
    dets = _perturbed(data)
    results = tmp_path / 'dets.json'
    results.write_text(json.dumps(dets))
    want = {t: _pycocotools(ann_file, dets, t) for t in ('bbox', 'segm')}
    assert 0.2 < want['bbox']['map'] < 0.9 and 0.2 < want['segm']['map'] < 0.9  # a case with something to get wrong
    assert want['bbox'] != want['segm']

    out = tmp_path / 'both.json'
    assert script.main(['--ann', str(ann_file), '--results', str(results), '--out', str(out)]) == 0
    assert json.loads(out.read_text()) == want
    printed = capsys.readouterr().out
    for t in ('bbox', 'segm'):
        line = f' Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets= 10 ] = {want[t]["mar_10"]:0.3f}'
        assert line + '  mar_10' in printed

    out = tmp_path / 'bbox.json'
    args = ['--ann', str(ann_file), '--results', str(results), '--iou-type', 'bbox', '--out', str(out)]
    assert script.main(args) == 0
    assert json.loads(out.read_text()) == dict(want['bbox'], iou_type='bbox')


def test_bad_inputs_exit_non_zero_with_a_clear_message(script, shapes, tmp_path, capsys):
    _, ann_file, data = shapes
    results = tmp_path / 'dets.json'

    def run(dets, *extra):
        results.write_text(json.dumps(dets))
        code = script.main(['--ann', str(ann_file), '--results', str(results), *extra])
        return code, capsys.readouterr().err

    det = {'image_id': data['images'][0]['id'], 'category_id': 1, 'bbox': [1, 2, 3, 4], 'score': 0.5}
    code, err = run([dict(det, image_id=999)])
    assert (code, err) == (1, 'error: detection 0 is of image 999, which the annotations do not list\n')
    assert run([dict(det, category_id=7)])[1].startswith('error: detection 0 has category 7')
    assert run([det], '--iou-type', 'segm')[1] == 'error: detection 0 lacks segmentation (needed for segm evaluation)\n'
    code = script.main(['--ann', str(tmp_path / 'missing.json'), '--results', str(results)])
    assert code == 1 and 'missing.json does not exist' in capsys.readouterr().err
    # malformed detections: named, not a traceback from inside pycocotools
    assert run([dict(det, bbox='abcd')])[1] == "error: detection 0 has bbox 'abcd', not [x, y, w, h] numbers\n"
    assert run([dict(det, score=None)])[1] == 'error: detection 0 has score None, not a finite number\n'
    assert run([dict(det, segmentation=5)], '--iou-type', 'segm')[1].startswith(
        'error: detection 0 has segmentation 5, neither polygons nor RLE')
    image = data['images'][0]
    wrong = _rle(np.ones((image['height'] + 1, image['width']), np.uint8))
    assert run([dict(det, segmentation=wrong)], '--iou-type', 'segm')[1] == (
        f'error: detection 0 has a mask of size {[image["height"] + 1, image["width"]]} on image {image["id"]} of '
        f'size {[image["height"], image["width"]]} (height, width)\n')
    # ground truth COCOeval cannot read: refused before anything is evaluated
    for field in ('area', 'iscrowd'):
        broken = copy.deepcopy(data)
        del broken['annotations'][3][field]
        bad_ann = tmp_path / f'no_{field}.json'
        bad_ann.write_text(json.dumps(broken))
        results.write_text(json.dumps([det]))
        assert script.main(['--ann', str(bad_ann), '--results', str(results)]) == 1
        err = capsys.readouterr().err
        assert f'annotation {broken["annotations"][3]["id"]} lacks {field}, which COCO evaluation reads' in err
    broken = copy.deepcopy(data)
    del broken['annotations'][2]['segmentation']
    bad_ann.write_text(json.dumps(broken))
    results.write_text(json.dumps([dict(det, segmentation=_rle(np.ones((image['height'], image['width']))))]))
    assert script.main(['--ann', str(bad_ann), '--results', str(results), '--iou-type', 'segm']) == 1
    assert f'annotation {broken["annotations"][2]["id"]} has no segmentation' in capsys.readouterr().err


def test_masks_without_boxes_and_no_detections_as_pycocotools_takes_them(script, shapes, tmp_path):
    _, ann_file, data = shapes
    # masks alone: pycocotools' loadRes takes each detection's box and area from its mask
    dets = [{k: v for k, v in d.items() if k != 'bbox'} for d in _perturbed(data, seed=3)]
    results, out = tmp_path / 'masks.json', tmp_path / 'masks_metrics.json'
    results.write_text(json.dumps(dets))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        dt = gt.loadRes(copy.deepcopy(dets))
        ev = COCOeval(gt, dt, 'bbox')
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert script.main(['--ann', str(ann_file), '--results', str(results), '--out', str(out)]) == 0
    stats = json.loads(out.read_text())
    assert stats['bbox'] == dict(zip(NAMES, ev.stats.tolist()))
    assert stats['segm'] == _pycocotools(ann_file, dets, 'segm')

    # no detections at all, which loadRes refuses: COCOeval of an empty detection set, -1 for the
    # sizes the ground truth has no object of (here only small ones are kept)
    small = dict(data, annotations=[a for a in data['annotations'] if a['area'] < 32 ** 2])
    small_ann = tmp_path / 'small.json'
    small_ann.write_text(json.dumps(small))
    results.write_text('[]')
    assert script.main(['--ann', str(small_ann), '--results', str(results), '--out', str(out)]) == 0
    expected = {name: -1.0 if name.endswith(('_medium', '_large')) else 0.0 for name in NAMES}
    assert json.loads(out.read_text()) == dict(expected, iou_type='bbox')


def test_training_metric_gives_pycocotools_numbers(shapes):
    # the recipe's val_map: torchmetrics over the dataset's targets, whose areas (the json's, here the
    # polygons', not the boxes') sort objects by size as pycocotools does
    from types import SimpleNamespace

    from attnzoo.recipes.data.coco import CocoDetection
    from attnzoo.recipes.tasks.detection import DetectionTask
    image_dir, ann_file, data = shapes
    dets = _perturbed(data, seed=5)
    dataset = CocoDetection(image_dir, ann_file, masks=False)
    preds, targets = [], []
    for i in range(len(dataset)):
        _, target = dataset[i]
        mine = [d for d in dets if d['image_id'] == int(target['image_id'])]
        boxes = torch.tensor([d['bbox'] for d in mine], dtype=torch.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        preds.append({'boxes': boxes.float(), 'scores': torch.tensor([d['score'] for d in mine]),
                      'labels': torch.tensor([dataset.cat_id_to_label[d['category_id']] for d in mine])})
        targets.append(target)
    task = SimpleNamespace(masks=False)
    DetectionTask.configure_metrics(task)
    # pycocotools' float64 thresholds (torchmetrics' own defaults are rounded through float32)
    params = COCOeval(iouType='bbox').params
    assert task.val_map.iou_thresholds == params.iouThrs.tolist()
    assert task.val_map.rec_thresholds == params.recThrs.tolist()
    task.val_map.update(*DetectionTask._metric_inputs(task, preds, targets))
    got = task.val_map.compute()
    # the same boxes as COCO results (float32 as the task saw them) evaluated by pycocotools directly
    results = dataset.to_coco_results(preds, [int(t['image_id']) for t in targets])
    want = _pycocotools(ann_file, results, 'bbox')
    assert want['map_small'] != want['map_large']
    for name in NAMES:
        assert float(got[name]) == pytest.approx(want[name], abs=1e-6), name


DETECTOR_KWARGS = dict(min_size=64, max_size=96, fpn_channels=32, representation_size=32, mask_head_channels=16,
                       rpn_pre_nms_top_n_test=64, rpn_post_nms_top_n_test=32, box_detections_per_img=10,
                       box_score_thresh=0.0)


def test_model_mode_runs_a_detector_over_the_split_and_a_saved_one_gives_the_same(script, shapes, tmp_path, capsys):
    from attnzoo.zoo import create_detection_model, save_pretrained
    image_dir, ann_file, data = shapes
    torch.manual_seed(0)
    model = create_detection_model('mask_rcnn', 'az_van_b0', 1 + len(data['categories']), **DETECTOR_KWARGS).eval()
    # an attnzoo-train (Lightning) checkpoint: the detector under model.
    checkpoint = tmp_path / 'last.ckpt'
    torch.save({'state_dict': {f'model.{k}': v for k, v in model.state_dict().items()}}, checkpoint)
    kwargs = [f'{k}={v}' for k, v in DETECTOR_KWARGS.items() if k not in ('fpn_channels', 'representation_size',
                                                                          'mask_head_channels')]
    common = ['--ann', str(ann_file), '--images', str(image_dir), '-b', '4', '-j', '0', '--device', 'cpu',
              '--no-progress']
    out = tmp_path / 'arch' / 'metrics.json'
    # the narrow heads are constructor arguments of the detector: given through --model-kwargs as well
    heads = ['fpn_channels=32', 'representation_size=32', 'mask_head_channels=16']
    assert script.main(common + ['--model', 'mask_rcnn', '--backbone', 'az_van_b0', '--checkpoint', str(checkpoint),
                                 '--model-kwargs', *kwargs, *heads, '--out', str(out)]) == 0
    printed = capsys.readouterr().out
    dets_file = out.with_suffix('.detections.json')
    dets = json.loads(dets_file.read_text())
    assert f'{len(dets)} detections on {len(data["images"])} images' in printed and str(dets_file) in printed
    assert len(dets) == 10 * len(data['images']) and {'bbox', 'segmentation', 'score'} <= set(dets[0])
    stats = json.loads(out.read_text())
    assert stats == {t: _pycocotools(ann_file, dets, t) for t in ('bbox', 'segm')}

    folder = save_pretrained(model, tmp_path / 'saved', card=False)
    again = tmp_path / 'saved_metrics.json'
    assert script.main(common + ['--model', f'local-dir:{folder}', '--out', str(again)]) == 0
    assert json.loads(again.read_text()) == stats
    assert json.loads(again.with_suffix('.detections.json').read_text()) == dets

    code = script.main(common + ['--model', 'mask_rcnn', '--backbone', 'az_van_b0', '--checkpoint', str(checkpoint)])
    assert code == 1 and 'does not fit' in capsys.readouterr().err  # torchvision's wide heads
