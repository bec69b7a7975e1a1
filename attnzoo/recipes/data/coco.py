"""COCO-format detection data: a reader producing torchvision detection targets, a collate function,
the conversion of detector outputs back into COCO results, pycocotools evaluation, and a writer of
small synthetic COCO sets of drawn shapes (``shapes.py``).

The reader (``CocoDetection``) takes the instances json and the image folder of any COCO-layout set
(COCO itself, LVIS-style subsets, exports of labelling tools) and yields ``(image, target)`` in
torchvision's detection format, so its batches feed ``torchvision.models.detection`` models and
``attnzoo.zoo.create_detection_model`` unchanged:

- ``image``: float32 ``(3, H, W)`` in [0, 1]. Normalisation is the detector's business: torchvision's
  ``GeneralizedRCNNTransform`` (inside every detector) subtracts ``image_mean`` and divides by
  ``image_std``.
- ``target``: ``boxes`` float32 ``(N, 4)`` absolute ``x0, y0, x1, y1``; ``labels`` int64 ``(N,)``, the
  contiguous labels 1..K (0 is torchvision's background) of the json's categories in id order;
  ``masks`` uint8 ``(N, H, W)`` (polygons and RLE, compressed or not, rasterised by pycocotools);
  ``iscrowd`` int64 ``(N,)``; ``area`` float32 ``(N,)``; ``image_id`` int64 scalar, the json's id.

pycocotools is imported where it is used, never at ``import attnzoo``.
"""
import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .shapes import SHAPE_CLASSES, draw_shapes

__all__ = [
    'CocoDetection', 'collate_detection', 'evaluate_coco', 'load_coco_json', 'to_coco_results',
    'write_shapes_coco',
]

PathLike = Union[str, os.PathLike]
Target = Dict[str, torch.Tensor]

# keys every COCO instances json and each of its records must have
_REQUIRED = {
    'images': ('id', 'file_name', 'height', 'width'),
    'annotations': ('id', 'image_id', 'category_id', 'bbox'),
    'categories': ('id', 'name'),
}


def _is_int64(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -2 ** 63 <= value < 2 ** 63


def load_coco_json(ann_file: PathLike) -> Dict[str, Any]:
    """Read and check a COCO instances json: the three lists, their records' keys, and that every
    annotation refers to an image and a category that exist. Raises FileNotFoundError or ValueError
    naming the file and what is wrong."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(f'COCO annotation file {ann_file} does not exist')
    try:
        with open(ann_file, encoding='utf-8') as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f'COCO annotation file {ann_file} is not valid json: {e}') from e
    if not isinstance(data, dict):
        raise ValueError(f'COCO annotation file {ann_file} holds a {type(data).__name__}, not a json object')
    for key, fields in _REQUIRED.items():
        records = data.get(key)
        if not isinstance(records, list):
            raise ValueError(f'COCO annotation file {ann_file} has no {key!r} list')
        for i, record in enumerate(records):
            missing = [f for f in fields if not isinstance(record, dict) or f not in record]
            if missing:
                raise ValueError(f'{ann_file}: {key}[{i}] lacks {", ".join(missing)}')
    for key in ('images', 'categories'):
        for record in data[key]:
            # COCO's ids are integers; the targets carry the image's as an int64 tensor
            if not _is_int64(record['id']):
                raise ValueError(f'{ann_file}: {key} ids must be integers of at most 64 bits, got {record["id"]!r}')
    image_ids = {im['id'] for im in data['images']}
    cat_ids = {c['id'] for c in data['categories']}
    if len(image_ids) != len(data['images']) or len(cat_ids) != len(data['categories']):
        raise ValueError(f'{ann_file}: image or category ids are not unique')
    for ann in data['annotations']:
        if ann['image_id'] not in image_ids:
            raise ValueError(
                f'{ann_file}: annotation {ann["id"]} refers to image {ann["image_id"]}, which is not listed')
        if ann['category_id'] not in cat_ids:
            raise ValueError(
                f'{ann_file}: annotation {ann["id"]} has category {ann["category_id"]}, which is not listed')
        if len(ann['bbox']) != 4:
            raise ValueError(f'{ann_file}: annotation {ann["id"]} has bbox {ann["bbox"]}, not [x, y, w, h]')
    return data


def _quiet_coco(data: Mapping[str, Any]):
    """A pycocotools COCO object over an in-memory json, without its progress prints."""
    from pycocotools.coco import COCO
    coco = COCO()
    coco.dataset = dict(data)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """An annotation's ``segmentation`` (polygons, uncompressed or compressed RLE) as a (H, W) uint8 mask."""
    from pycocotools import mask as mask_utils
    if isinstance(segmentation, list):  # polygons: a list of flat [x0, y0, x1, y1, ...]
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get('counts'), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:  # compressed RLE
        rle = segmentation
    return mask_utils.decode(rle).astype(np.uint8)


class CocoDetection(Dataset):
    """A COCO instances json and its image folder as ``(image, target)`` pairs for torchvision's
    detectors (layouts in the module docstring).

    Args:
        image_dir: the folder the json's ``file_name``s are relative to.
        ann_file: the instances json.
        transform: albumentations-style callable applied as ``sample = transform(**sample)`` to
            ``image`` (H, W, 3) uint8, ``bboxes`` (N, 4) COCO x, y, w, h floats, ``labels`` (N,) int,
            ``masks`` a list of (H, W) uint8 and ``ann_index`` (N,) int, before conversion to
            tensors. A transform that drops boxes (crops) must carry ``ann_index`` along with the
            boxes, as albumentations does for ``BboxParams(format='coco', label_fields=['labels',
            'ann_index'])``, so the masks, crowd flags and areas of the boxes kept are found.
        masks: produce ``masks`` (Mask R-CNN); every annotation then needs a ``segmentation``.
        skip_crowd: leave out ``iscrowd`` annotations (they stay in ``coco`` for evaluation).
        skip_empty: leave out images with no annotation left (torchvision's reference does so for
            training).
        check_files: check at construction that every image file exists (one stat per image).

    ``labels`` are 1..K for the json's categories sorted by id; ``label_to_cat_id`` and
    ``cat_id_to_label`` map between them, ``classes`` are the names by label (``classes[0]`` is
    ``'__background__'``) and ``num_classes`` = K + 1 is what torchvision's detectors take.
    """

    def __init__(
            self,
            image_dir: PathLike,
            ann_file: PathLike,
            transform: Optional[Callable[..., Dict[str, Any]]] = None,
            *,
            masks: bool = True,
            skip_crowd: bool = False,
            skip_empty: bool = False,
            check_files: bool = True,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f'COCO image folder {self.image_dir} does not exist')
        self.data = load_coco_json(self.ann_file)
        self.transform = transform
        self.masks = masks
        self.skip_crowd = skip_crowd

        categories = sorted(self.data['categories'], key=lambda c: c['id'])
        self.label_to_cat_id: Dict[int, int] = {i + 1: c['id'] for i, c in enumerate(categories)}
        self.cat_id_to_label: Dict[int, int] = {c: label for label, c in self.label_to_cat_id.items()}
        self.classes: Tuple[str, ...] = ('__background__',) + tuple(c['name'] for c in categories)

        self._anns: Dict[Any, List[Dict[str, Any]]] = {im['id']: [] for im in self.data['images']}
        for ann in self.data['annotations']:
            if not (skip_crowd and ann.get('iscrowd', 0)):
                self._anns[ann['image_id']].append(ann)
        self.images = [im for im in self.data['images'] if self._anns[im['id']] or not skip_empty]
        if check_files:
            missing = [im['file_name'] for im in self.images if not (self.image_dir / im['file_name']).is_file()]
            if missing:
                raise FileNotFoundError(
                    f'{len(missing)} of the {len(self.images)} images listed in {self.ann_file} are not in '
                    f'{self.image_dir}, e.g. {", ".join(missing[:5])}')
        self._coco = None

    @property
    def num_classes(self) -> int:
        """Categories + background: the ``num_classes`` of torchvision's detectors."""
        return len(self.classes)

    @property
    def coco(self):
        """The ground truth as a pycocotools ``COCO`` object (built on first use), for ``evaluate_coco``."""
        if self._coco is None:
            self._coco = _quiet_coco(self.data)
        return self._coco

    def __len__(self) -> int:
        return len(self.images)

    def _read_image(self, info: Mapping[str, Any]) -> np.ndarray:
        path = self.image_dir / info['file_name']
        if not path.is_file():
            raise FileNotFoundError(
                f'image {info["file_name"]} (id {info["id"]}) of {self.ann_file} is not in {self.image_dir}')
        try:
            with Image.open(path) as im:
                image = np.array(im.convert('RGB'))
        except OSError as e:
            raise OSError(f'image {path} cannot be read: {e}') from e
        if image.shape[:2] != (info['height'], info['width']):
            raise ValueError(
                f'image {path} is {image.shape[0]}x{image.shape[1]} (HxW) but {self.ann_file} says '
                f'{info["height"]}x{info["width"]}: its annotations would not fit')
        return image

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Target]:
        info = self.images[index]
        image = self._read_image(info)
        height, width = image.shape[:2]
        anns = self._anns[info['id']]
        sample: Dict[str, Any] = {
            'image': image,
            'bboxes': np.array([a['bbox'] for a in anns], dtype=np.float64).reshape(-1, 4),
            'labels': np.array([self.cat_id_to_label[a['category_id']] for a in anns], dtype=np.int64),
            'ann_index': np.arange(len(anns), dtype=np.int64),
        }
        if self.masks:
            for a in anns:
                if not a.get('segmentation'):
                    raise ValueError(f'{self.ann_file}: annotation {a["id"]} has no segmentation; '
                                     'pass masks=False to read boxes only')
            sample['masks'] = [_segmentation_to_mask(a['segmentation'], height, width) for a in anns]
        if self.transform is not None:
            sample = self.transform(**sample)
        return self._to_tensors(sample, anns, info)

    def _to_tensors(self, sample: Mapping[str, Any], anns: Sequence[Mapping[str, Any]],
                    info: Mapping[str, Any]) -> Tuple[torch.Tensor, Target]:
        image = np.asarray(sample['image'])
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f'the transform must return image as (H, W, 3) uint8, got {image.dtype} {image.shape}')
        height, width = image.shape[:2]
        boxes = np.asarray(sample['bboxes'], dtype=np.float64).reshape(-1, 4)
        labels = np.asarray(sample['labels'], dtype=np.int64).reshape(-1)
        index = np.asarray(sample['ann_index'], dtype=np.int64).reshape(-1)
        if not len(boxes) == len(labels) == len(index):
            raise ValueError(
                f'the transform returned {len(boxes)} boxes, {len(labels)} labels and {len(index)} ann_index '
                'entries: a transform that drops boxes must drop their labels and ann_index with them '
                "(albumentations: BboxParams(format='coco', label_fields=['labels', 'ann_index']))")
        if self.masks:
            masks = sample['masks']
            masks = np.stack([np.asarray(m) for m in masks]) if len(masks) else np.zeros((0, height, width), np.uint8)
            if len(masks) == len(anns) != len(index):  # boxes were dropped, masks not: keep those of the boxes kept
                masks = masks[index]
            if len(masks) != len(boxes) or masks.shape[1:] != (height, width):
                raise ValueError(
                    f'the transform returned masks of shape {masks.shape} for {len(boxes)} boxes on a '
                    f'{height}x{width} image')
        iscrowd = np.array([anns[i].get('iscrowd', 0) for i in index], dtype=np.int64)
        if self.transform is None:
            area = np.array([anns[i].get('area', anns[i]['bbox'][2] * anns[i]['bbox'][3]) for i in index])
        else:  # the json's areas are of the untransformed image
            area = masks.sum((1, 2)) if self.masks else boxes[:, 2] * boxes[:, 3]

        boxes[:, 2:] += boxes[:, :2]  # x, y, w, h -> x0, y0, x1, y1
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        # torchvision's detectors refuse boxes without area (COCO has a few): drop them, as its reference does
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        target = {
            'boxes': torch.as_tensor(boxes[keep], dtype=torch.float32),
            'labels': torch.as_tensor(labels[keep]),
            'iscrowd': torch.as_tensor(iscrowd[keep]),
            'area': torch.as_tensor(np.asarray(area, dtype=np.float64)[keep], dtype=torch.float32),
            'image_id': torch.tensor(info['id'], dtype=torch.int64),
        }
        if self.masks:
            target['masks'] = torch.as_tensor(np.ascontiguousarray(masks[keep]), dtype=torch.uint8)
        image_t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)
        return image_t, target

    def to_coco_results(self, predictions: Sequence[Mapping[str, torch.Tensor]],
                        image_ids: Sequence[int], mask_threshold: float = 0.5) -> List[Dict[str, Any]]:
        """Detector outputs of the images ``image_ids`` as COCO results in this json's category ids
        (see ``to_coco_results``)."""
        return to_coco_results(predictions, image_ids, self.label_to_cat_id, mask_threshold)


def collate_detection(batch: Sequence[Tuple[torch.Tensor, Target]]) -> Tuple[List[torch.Tensor], List[Target]]:
    """Batch ``(image, target)`` pairs as torchvision's detectors take them: a list of images (of any
    sizes) and a list of targets."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def to_coco_results(
        predictions: Sequence[Mapping[str, torch.Tensor]],
        image_ids: Sequence[int],
        label_to_cat_id: Mapping[int, int],
        mask_threshold: float = 0.5,
) -> List[Dict[str, Any]]:
    """torchvision detector outputs (``boxes`` (N, 4) x0, y0, x1, y1, ``labels``, ``scores``, and
    optionally ``masks`` (N, 1, H, W) or (N, H, W) probabilities or 0/1) as the COCO results list:
    ``image_id``, ``category_id`` (labels mapped back through ``label_to_cat_id``), ``bbox`` x, y, w, h,
    ``score`` and, with masks, ``segmentation`` as compressed RLE of the mask above ``mask_threshold``.
    Label 0, the background, is left out: torchvision's RetinaNet and FCOS count it among their
    ``num_classes`` and may predict it, as its own reference evaluation then ignores."""
    from pycocotools import mask as mask_utils
    if len(predictions) != len(image_ids):
        raise ValueError(f'{len(predictions)} predictions for {len(image_ids)} image ids')
    results: List[Dict[str, Any]] = []
    for pred, image_id in zip(predictions, image_ids):
        boxes = pred['boxes'].detach().cpu().double()
        boxes[:, 2:] -= boxes[:, :2]
        labels, scores = pred['labels'].tolist(), pred['scores'].tolist()
        rles = None
        if 'masks' in pred:
            masks = pred['masks'].detach().cpu()
            masks = masks[:, 0] if masks.dim() == 4 else masks
            masks = (masks > mask_threshold).numpy().astype(np.uint8)
            # pycocotools encodes (H, W, N) Fortran-ordered stacks
            rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0))) if len(masks) else []
        for i, (box, label, score) in enumerate(zip(boxes.tolist(), labels, scores)):
            if label == 0:  # the background: RetinaNet and FCOS score it as a class like any other
                continue
            if label not in label_to_cat_id:
                raise ValueError(f'predicted label {label} has no category (labels are {sorted(label_to_cat_id)})')
            res = {'image_id': int(image_id), 'category_id': label_to_cat_id[label], 'bbox': box, 'score': score}
            if rles is not None:
                res['segmentation'] = {'size': rles[i]['size'], 'counts': rles[i]['counts'].decode('ascii')}
            results.append(res)
    return results


def evaluate_coco(coco_gt, results: Sequence[Mapping[str, Any]], iou_type: str = 'bbox',
                  image_ids: Optional[Sequence[int]] = None) -> np.ndarray:
    """pycocotools' COCOeval of ``results`` against ``coco_gt`` (a ``COCO`` object, e.g.
    ``CocoDetection.coco``): the 12 numbers of its summary (AP, AP50, AP75, AP S/M/L, AR 1/10/100,
    AR S/M/L), with -1 where there is nothing to measure, as pycocotools gives them. ``image_ids``
    restricts the evaluation (default: every image of ``coco_gt``). No results at all (which
    pycocotools' ``loadRes`` refuses) are evaluated as an empty detection set: zero where there
    are objects to find, -1 where there are none.

    For 'segm' the detections' boxes are left out: given a box, pycocotools' ``loadRes`` takes the
    box's area as the detection's, so the small/medium/large split would follow boxes, not masks
    (torchvision's and detectron2's evaluations hand it masks alone, as ``scripts/eval_coco.py`` does)."""
    from pycocotools.cocoeval import COCOeval
    if iou_type not in ('bbox', 'segm'):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    drop = {'bbox', 'area'} if iou_type == 'segm' else set()
    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            coco_dt = coco_gt.loadRes([{k: v for k, v in r.items() if k not in drop} for r in results])
        else:
            coco_dt = _quiet_coco(dict(coco_gt.dataset, annotations=[]))
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return np.asarray(evaluator.stats)


def write_shapes_coco(
        root: PathLike,
        splits: Optional[Mapping[str, int]] = None,
        image_size: Union[int, Tuple[int, int]] = 96,
        seed: int = 0,
        max_shapes: int = 3,
) -> Dict[str, Tuple[Path, Path]]:
    """Write a synthetic COCO set of drawn shapes (``shapes.draw_shapes``) under ``root``, in COCO's
    layout: ``root/<split>/<id>.png`` and ``root/annotations/instances_<split>.json``.

    ``splits`` maps each split to its image count (default ``{'train': 64, 'val': 16}``);
    ``image_size`` is the side or ``(H, W)``, each at least 16. Annotations are the shapes' exact polygons, their
    bounds as ``bbox`` and the pycocotools area of the polygon; categories are ``SHAPE_CLASSES``
    with ids 1..3. Image and annotation ids are unique across splits. The same arguments write the
    same files. Returns ``{split: (image_dir, ann_file)}``, the arguments of ``CocoDetection``.
    """
    from pycocotools import mask as mask_utils
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    splits = {'train': 64, 'val': 16} if splits is None else dict(splits)
    root = Path(root)
    rng = np.random.default_rng(seed)
    categories = [{'id': i + 1, 'name': name, 'supercategory': 'shape'} for i, name in enumerate(SHAPE_CLASSES)]
    out: Dict[str, Tuple[Path, Path]] = {}
    image_id = ann_id = 0
    (root / 'annotations').mkdir(parents=True, exist_ok=True)
    for split, count in splits.items():
        image_dir = root / split
        image_dir.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for _ in range(count):
            image_id += 1
            image, shapes = draw_shapes(rng, height, width, max_shapes=max_shapes)
            file_name = f'{image_id:06d}.png'
            Image.fromarray(image).save(image_dir / file_name)
            images.append({'id': image_id, 'file_name': file_name, 'height': height, 'width': width})
            for s in shapes:
                ann_id += 1
                polygon = [float(v) for v in s.polygon.reshape(-1)]
                area = float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))))
                annotations.append({
                    'id': ann_id, 'image_id': image_id, 'category_id': s.label, 'bbox': list(s.box),
                    'segmentation': [polygon], 'area': area, 'iscrowd': 0})
        ann_file = root / 'annotations' / f'instances_{split}.json'
        with open(ann_file, 'w', encoding='utf-8') as f:
            json.dump({
                'info': {'description': f'attnzoo drawn shapes, seed {seed}', 'version': '1.0'},
                'licenses': [], 'images': images, 'annotations': annotations, 'categories': categories,
            }, f)
        out[split] = (image_dir, ann_file)
    return out
