"""COCO-format data: the synthetic writer, the reader's targets (boxes, labels, masks from polygons
and RLE, crowd, area), the category mapping back to COCO ids, the transform hook and clear errors,
with pycocotools as the oracle."""
import contextlib
import io
import json
import shutil

import albumentations as A
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from attnzoo.recipes.data.coco import (
    CocoDetection,
    collate_detection,
    evaluate_coco,
    to_coco_results,
    write_shapes_coco,
)
from attnzoo.recipes.data.shapes import SHAPE_CLASSES, draw_shapes


@pytest.fixture(scope='module')
def shapes_coco(tmp_path_factory):
    root = tmp_path_factory.mktemp('shapes_coco')
    return root, write_shapes_coco(root, {'train': 12, 'val': 10}, image_size=(48, 64), seed=7)


def _gt_as_predictions(ds):
    preds, ids = [], []
    for i in range(len(ds)):
        _, t = ds[i]
        preds.append({'boxes': t['boxes'], 'labels': t['labels'], 'scores': torch.ones(len(t['labels'])),
                      'masks': t['masks'][:, None].float()})
        ids.append(int(t['image_id']))
    return ds.to_coco_results(preds, ids)


def test_written_json_loads_in_pycocotools(shapes_coco):
    root, splits = shapes_coco
    assert set(splits) == {'train', 'val'}
    image_ids = set()
    for split, (image_dir, ann_file) in splits.items():
        assert ann_file == root / 'annotations' / f'instances_{split}.json' and image_dir == root / split
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(ann_file))
        assert len(coco.getImgIds()) == {'train': 12, 'val': 10}[split]
        assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == list(SHAPE_CLASSES)
        for ann in coco.loadAnns(coco.getAnnIds()):
            img = coco.loadImgs(ann['image_id'])[0]
            assert (img['height'], img['width']) == (48, 64)
            m = coco.annToMask(ann)  # pycocotools reads the polygon; its area and bounds are the json's
            assert m.sum() == ann['area'] > 0
            x, y, w, h = ann['bbox']
            ys, xs = np.nonzero(m)
            assert x - 1 <= xs.min() and xs.max() <= x + w + 1 and y - 1 <= ys.min() and ys.max() <= y + h + 1
        assert not image_ids & set(coco.getImgIds())  # ids unique across splits
        image_ids |= set(coco.getImgIds())


@pytest.mark.parametrize('iou_type', ['bbox', 'segm'])
def test_ground_truth_as_predictions_scores_ap_one(shapes_coco, iou_type):
    image_dir, ann_file = shapes_coco[1]['val']
    ds = CocoDetection(image_dir, ann_file)
    stats = evaluate_coco(ds.coco, _gt_as_predictions(ds), iou_type)
    assert stats[0] == pytest.approx(1.0) and stats[1] == pytest.approx(1.0) and stats[2] == pytest.approx(1.0)
    assert stats[8] == pytest.approx(1.0)  # AR@100


def test_mask_evaluation_sizes_detections_by_their_masks(shapes_coco):
    """A false positive whose mask is medium-sized but whose box is tiny: the segm evaluation counts it
    among the medium detections (its mask's area), as it would with no box at all."""
    image_dir, ann_file = shapes_coco[1]['val']
    ds = CocoDetection(image_dir, ann_file)
    results = _gt_as_predictions(ds)
    blob = np.zeros((48, 64), dtype=np.uint8, order='F')
    blob[4:44, 8:48] = 1  # 1600 pixels: COCO's medium range
    rle = mask_utils.encode(blob)
    rle['counts'] = rle['counts'].decode('ascii')
    fp = dict(image_id=results[0]['image_id'], category_id=results[0]['category_id'], score=2.,
              segmentation=rle, bbox=[0., 0., 1., 1.])
    with_box = evaluate_coco(ds.coco, results + [fp], 'segm')
    without_box = evaluate_coco(ds.coco, [{k: v for k, v in r.items() if k != 'bbox'} for r in results + [fp]], 'segm')
    assert np.array_equal(with_box, without_box)
    assert with_box[4] < 1.  # AP medium pays for the false positive


def test_reader_round_trip(shapes_coco):
    """The reader gives back what the writer drew: the pixels, the boxes, the labels, and masks that are
    pycocotools' rasterisation of the drawn polygons (within a pixel of the drawn masks)."""
    _, splits = shapes_coco
    ds = CocoDetection(*splits['train'])
    assert len(ds) == 12 and ds.num_classes == 4 and ds.classes[1:] == SHAPE_CLASSES
    rng = np.random.default_rng(7)  # the writer's draws, replayed
    for i in range(len(ds)):
        drawn, shapes = draw_shapes(rng, 48, 64)
        image, t = ds[i]
        assert image.dtype == torch.float32 and image.shape == (3, 48, 64)
        assert 0 <= image.min() and image.max() <= 1
        assert torch.equal((image * 255).round().to(torch.uint8).permute(1, 2, 0), torch.from_numpy(drawn))
        assert int(t['image_id']) == i + 1
        assert t['labels'].tolist() == [s.label for s in shapes] and t['labels'].dtype == torch.int64
        expected = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (s.box for s in shapes)], dtype=torch.float32)
        assert t['boxes'].dtype == torch.float32 and torch.equal(t['boxes'], expected)
        assert t['masks'].shape == (len(shapes), 48, 64) and t['masks'].dtype == torch.uint8
        assert t['iscrowd'].tolist() == [0] * len(shapes)
        for s, m in zip(shapes, t['masks'].numpy().astype(bool)):
            coco_mask = mask_utils.decode(mask_utils.frPyObjects([s.polygon.reshape(-1).tolist()], 48, 64))[..., 0]
            assert np.array_equal(m, coco_mask.astype(bool))
            grown = np.pad(s.mask, 1)
            grown = grown[:-2, 1:-1] | grown[2:, 1:-1] | grown[1:-1, :-2] | grown[1:-1, 2:] | s.mask
            assert not (m & ~grown).any()  # PIL fills the outline too: the drawn mask is the fatter one
        assert torch.equal(t['area'], t['masks'].flatten(1).sum(1).float())


def _rewrite(ann_file, tmp_path, edit):
    data = json.loads(ann_file.read_text())
    edit(data)
    out = tmp_path / 'instances.json'
    out.write_text(json.dumps(data))
    return out


def test_rle_masks_crowd_and_category_ids_mapped_back(shapes_coco, tmp_path):
    """Compressed and uncompressed RLE read as the polygons they encode; sparse category ids become
    labels 1..K and go back to the json's ids in results, which then score AP 1.0 again."""
    image_dir, ann_file = shapes_coco[1]['val']
    polygons = CocoDetection(image_dir, ann_file)

    def edit(data):
        for c in data['categories']:
            c['id'] = {1: 7, 2: 3, 3: 12}[c['id']]
        for k, a in enumerate(data['annotations']):
            a['category_id'] = {1: 7, 2: 3, 3: 12}[a['category_id']]
            img = next(im for im in data['images'] if im['id'] == a['image_id'])
            rle = mask_utils.merge(mask_utils.frPyObjects(a['segmentation'], img['height'], img['width']))
            if k % 3 == 1:  # compressed
                a['segmentation'] = {'size': rle['size'], 'counts': rle['counts'].decode('ascii')}
            elif k % 3 == 2:  # uncompressed: run lengths in column-major order
                flat = mask_utils.decode(rle).flatten(order='F')
                change = np.flatnonzero(np.diff(np.r_[0, flat, 1 - flat[-1]])).tolist()
                a['segmentation'] = {'size': rle['size'], 'counts': np.diff([0] + change).tolist()}
                a['iscrowd'] = 1
    ds = CocoDetection(image_dir, _rewrite(ann_file, tmp_path, edit))
    assert ds.label_to_cat_id == {1: 3, 2: 7, 3: 12}
    assert ds.classes == ('__background__', 'ellipse', 'rectangle', 'triangle')
    crowd = 0
    for i in range(len(ds)):
        (_, t), (_, ref) = ds[i], polygons[i]
        assert torch.equal(t['masks'], ref['masks']) and torch.equal(t['boxes'], ref['boxes'])
        remap = {1: 2, 2: 1, 3: 3}  # rectangle (id 7) is now label 2, ellipse (id 3) label 1
        assert t['labels'].tolist() == [remap[v] for v in ref['labels'].tolist()]
        crowd += int(t['iscrowd'].sum())
    assert crowd > 0
    results = _gt_as_predictions(ds)
    assert {r['category_id'] for r in results} == {3, 7, 12}
    assert evaluate_coco(ds.coco, results, 'segm')[0] == pytest.approx(1.0)
    no_crowd = CocoDetection(image_dir, ds.ann_file, skip_crowd=True)
    assert sum(len(no_crowd[i][1]['labels']) for i in range(len(ds))) == sum(
        len(ds[i][1]['labels']) for i in range(len(ds))) - crowd


def test_boxes_only_degenerate_boxes_and_empty_images(shapes_coco, tmp_path):
    image_dir, ann_file = shapes_coco[1]['val']

    def edit(data):
        for a in data['annotations']:
            del a['segmentation']
        data['annotations'] = [a for a in data['annotations'] if a['image_id'] != data['images'][0]['id']]
        data['annotations'][0]['bbox'][2] = 0.  # zero width: torchvision would refuse it
    edited = _rewrite(ann_file, tmp_path, edit)
    with pytest.raises(ValueError, match='has no segmentation; pass masks=False'):
        CocoDetection(image_dir, edited)[1]
    ds = CocoDetection(image_dir, edited, masks=False)
    _, empty = ds[0]
    assert empty['boxes'].shape == (0, 4) and empty['labels'].shape == (0,) and 'masks' not in empty
    anns = json.loads(edited.read_text())['annotations']
    degenerate_image = anns[0]['image_id']
    index = [im['id'] for im in ds.images].index(degenerate_image)
    _, t = ds[index]
    assert len(t['boxes']) == sum(a['image_id'] == degenerate_image for a in anns) - 1
    for i in range(len(ds)):
        assert (ds[i][1]['boxes'][:, 2:] > ds[i][1]['boxes'][:, :2]).all()
    assert len(CocoDetection(image_dir, edited, masks=False, skip_empty=True)) == len(ds) - 1


def test_transform_hook_keeps_masks_with_their_boxes(shapes_coco):
    image_dir, ann_file = shapes_coco[1]['val']
    plain = CocoDetection(image_dir, ann_file)
    flip = CocoDetection(image_dir, ann_file, transform=A.Compose(
        [A.HorizontalFlip(p=1.0)], bbox_params=A.BboxParams(format='coco', label_fields=['labels', 'ann_index'])))
    image, t = flip[0]
    ref_image, ref = plain[0]
    assert torch.equal(image, ref_image.flip(-1)) and torch.equal(t['masks'], ref['masks'].flip(-1))
    assert torch.allclose(t['boxes'], torch.stack([64 - ref['boxes'][:, 2], ref['boxes'][:, 1],
                                                   64 - ref['boxes'][:, 0], ref['boxes'][:, 3]], 1), atol=1e-4)
    # a crop that drops boxes: the masks, labels and crowd flags of the boxes kept stay with them
    bbox_params = A.BboxParams(format='coco', label_fields=['labels', 'ann_index'], min_visibility=0.9)
    crop = CocoDetection(image_dir, ann_file, transform=A.Compose([A.Crop(0, 0, 32, 24)], bbox_params=bbox_params))
    dropped = 0
    for i in range(len(crop)):
        _, t = crop[i]
        _, ref = plain[i]
        dropped += len(ref['labels']) - len(t['labels'])
        for box, mask in zip(t['boxes'], t['masks']):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert xs.min() >= box[0] - 1 and xs.max() <= box[2] + 1
            assert ys.min() >= box[1] - 1 and ys.max() <= box[3] + 1
        assert torch.equal(t['area'], t['masks'].flatten(1).sum(1).float())
    assert dropped > 0
    unaligned = CocoDetection(image_dir, ann_file, transform=A.Compose(
        [A.Crop(0, 0, 32, 24)], bbox_params=A.BboxParams(format='coco', label_fields=['labels'], min_visibility=0.9)))
    with pytest.raises(ValueError, match="label_fields=\\['labels', 'ann_index'\\]"):
        for i in range(len(unaligned)):
            unaligned[i]


def test_collate_feeds_a_dataloader(shapes_coco):
    ds = CocoDetection(*shapes_coco[1]['train'])
    images, targets = next(iter(torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_detection)))
    assert len(images) == len(targets) == 3 and [int(t['image_id']) for t in targets] == [1, 2, 3]


def test_results_of_empty_and_wrong_predictions():
    empty = {'boxes': torch.zeros(0, 4), 'labels': torch.zeros(0, dtype=torch.int64), 'scores': torch.zeros(0),
             'masks': torch.zeros(0, 1, 8, 8)}
    assert to_coco_results([empty], [1], {1: 5}) == []
    background = {'boxes': torch.tensor([[0., 0., 2., 2.], [1., 1., 3., 4.]]), 'labels': torch.tensor([0, 1]),
                  'scores': torch.tensor([0.9, 0.5])}
    assert to_coco_results([background], [3], {1: 5}) == [
        {'image_id': 3, 'category_id': 5, 'bbox': [1., 1., 2., 3.], 'score': 0.5}]
    bad = {'boxes': torch.tensor([[0., 0., 2., 2.]]), 'labels': torch.tensor([2]), 'scores': torch.tensor([0.5])}
    with pytest.raises(ValueError, match='label 2 has no category'):
        to_coco_results([bad], [1], {1: 5})
    with pytest.raises(ValueError, match='1 predictions for 2 image ids'):
        to_coco_results([bad], [1, 2], {1: 5, 2: 6})


def test_clear_errors_for_bad_files(shapes_coco, tmp_path):
    image_dir, ann_file = shapes_coco[1]['val']
    with pytest.raises(FileNotFoundError, match='annotation file .* does not exist'):
        CocoDetection(image_dir, tmp_path / 'nope.json')
    with pytest.raises(FileNotFoundError, match='image folder .* does not exist'):
        CocoDetection(tmp_path / 'nope', ann_file)
    broken = tmp_path / 'broken.json'
    broken.write_text(ann_file.read_text()[:-10])
    with pytest.raises(ValueError, match='is not valid json'):
        CocoDetection(image_dir, broken)
    with pytest.raises(ValueError, match="has no 'categories' list"):
        CocoDetection(image_dir, _rewrite(ann_file, tmp_path, lambda d: d.pop('categories')))
    with pytest.raises(ValueError, match=r'images\[0\] lacks file_name'):
        CocoDetection(image_dir, _rewrite(ann_file, tmp_path, lambda d: d['images'][0].pop('file_name')))
    with pytest.raises(ValueError, match='refers to image 999, which is not listed'):
        CocoDetection(image_dir, _rewrite(ann_file, tmp_path, lambda d: d['annotations'][0].update(image_id=999)))
    with pytest.raises(ValueError, match='has category 42, which is not listed'):
        CocoDetection(image_dir, _rewrite(ann_file, tmp_path, lambda d: d['annotations'][0].update(category_id=42)))
    # the targets carry image ids as int64 tensors
    for bad_id in ('a', 2 ** 63):
        with pytest.raises(ValueError, match=f'images ids must be integers of at most 64 bits, got {bad_id!r}'):
            CocoDetection(image_dir, _rewrite(ann_file, tmp_path, lambda d: d['images'][0].update(id=bad_id)))
    # images that are not there: at construction, or when read if the check is skipped
    folder = tmp_path / 'images'
    shutil.copytree(image_dir, folder)
    first = sorted(folder.iterdir())[0]
    first.unlink()
    with pytest.raises(FileNotFoundError, match=f'1 of the 10 images .* e.g. {first.name}'):
        CocoDetection(folder, ann_file)
    with pytest.raises(FileNotFoundError, match=f'image {first.name} .* is not in'):
        CocoDetection(folder, ann_file, check_files=False)[0]
    Image.new('RGB', (20, 30)).save(first)
    with pytest.raises(ValueError, match='is 30x20 .* says 48x64'):
        CocoDetection(folder, ann_file)[0]
    first.write_bytes(b'not a png')
    with pytest.raises(OSError, match='cannot be read'):
        CocoDetection(folder, ann_file)[0]
