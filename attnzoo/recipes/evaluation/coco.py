"""COCO evaluation with pycocotools' numbers: of a detections file, or of a detector run over a split.

The 12 numbers are COCOeval's ``stats`` (``attnzoo.recipes.data.coco.evaluate_coco``), named both as
pycocotools prints them and as torchmetrics' ``MeanAveragePrecision`` returns them. Mask AP is
evaluated on the detections' masks alone: their boxes are dropped first, as detectron2, mmdet and
torchvision's reference do, since pycocotools would otherwise take a detection's area from its box
and sort it into the wrong small/medium/large range.

pycocotools is imported where it is used, never at ``import attnzoo``.
"""
import contextlib
import io
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from attnzoo.recipes.data.coco import CocoDetection, collate_detection, evaluate_coco, load_coco_json

from .common import DatasetError, EvaluationError

__all__ = [
    'COCO_METRICS', 'IOU_TYPES', 'coco_ground_truth', 'detect', 'evaluate_detections', 'format_coco_stats',
    'load_detections', 'load_detector', 'stats_for_json',
]

IOU_TYPES = ('bbox', 'segm')
# COCOeval.stats in order: torchmetrics' name, then pycocotools' (AP or AR, IoU, area, maxDets)
COCO_METRICS = (
    ('map', 1, None, 'all', 100), ('map_50', 1, .5, 'all', 100), ('map_75', 1, .75, 'all', 100),
    ('map_small', 1, None, 'small', 100), ('map_medium', 1, None, 'medium', 100), ('map_large', 1, None, 'large', 100),
    ('mar_1', 0, None, 'all', 1), ('mar_10', 0, None, 'all', 10), ('mar_100', 0, None, 'all', 100),
    ('mar_small', 0, None, 'small', 100), ('mar_medium', 0, None, 'medium', 100), ('mar_large', 0, None, 'large', 100),
)


def _pycocotools_label(ap: int, iou: Optional[float], area: str, max_dets: int) -> str:
    """The line COCOeval.summarize prints for one number, without the value."""
    title, kind = ('Average Precision', '(AP)') if ap else ('Average Recall', '(AR)')
    iou_text = '0.50:0.95' if iou is None else f'{iou:0.2f}'
    return f' {title:<18} {kind} @[ IoU={iou_text:<9} | area={area:>6s} | maxDets={max_dets:>3d} ]'


def format_coco_stats(stats: Mapping[str, float]) -> str:
    """The 12 numbers as pycocotools prints them, each followed by its torchmetrics name."""
    return '\n'.join(f'{_pycocotools_label(*spec)} = {stats[name]:0.3f}  {name}'
                     for name, *spec in COCO_METRICS)


def coco_ground_truth(ann_file: Union[str, Path]):
    """A pycocotools ``COCO`` object of a checked instances json (``load_coco_json``), quietly.

    COCOeval reads every annotation's ``area`` (its small/medium/large range) and ``iscrowd``:
    checked here, before a detector runs, rather than failing inside pycocotools after it."""
    from pycocotools.coco import COCO
    try:
        data = load_coco_json(ann_file)
    except (FileNotFoundError, ValueError) as e:
        raise DatasetError(str(e)) from e
    for ann in data['annotations']:
        missing = [k for k in ('area', 'iscrowd') if k not in ann]
        if missing:
            raise DatasetError(f'{ann_file}: annotation {ann["id"]} lacks {" and ".join(missing)}, which COCO '
                               'evaluation reads on every annotation')
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_detections(path: Union[str, Path]) -> List[Dict[str, Any]]:
    """A COCO results file: a json list of ``{image_id, category_id, score, bbox and/or segmentation}``."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f'detections file {path} does not exist')
    try:
        results = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvaluationError(f'detections file {path} is not valid json: {e}') from e
    if not isinstance(results, list):
        raise EvaluationError(f'detections file {path} must hold a list of detections, got a {type(results).__name__}')
    return results


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_detections(results: Sequence[Mapping[str, Any]], coco_gt, iou_type: str) -> List[Dict[str, Any]]:
    """The detections of one iou type as pycocotools takes them, checked against the ground truth:
    boxes [x, y, w, h] for 'bbox'; for 'segm' the masks as compressed RLE (polygons and uncompressed
    RLE are encoded at the image's size) and no box. Detections with masks and no boxes at all are
    evaluated as 'bbox' by their masks' bounds and areas, as pycocotools' ``loadRes`` does."""
    field = 'bbox' if iou_type == 'bbox' else 'segmentation'
    if field == 'bbox' and results and all(isinstance(d, Mapping) and 'bbox' not in d and 'segmentation' in d
                                           for d in results):
        field = 'segmentation'
    images, categories = set(coco_gt.getImgIds()), set(coco_gt.getCatIds())
    out = []
    for i, det in enumerate(results):
        if not isinstance(det, Mapping):
            raise EvaluationError(f'detection {i} is a {type(det).__name__}, not an object')
        missing = [k for k in ('image_id', 'category_id', 'score', field) if k not in det]
        if missing:
            raise EvaluationError(f'detection {i} lacks {", ".join(missing)} (needed for {iou_type} evaluation)')
        if det['image_id'] not in images:
            raise EvaluationError(f'detection {i} is of image {det["image_id"]}, which the annotations do not list')
        if det['category_id'] not in categories:
            raise EvaluationError(f'detection {i} has category {det["category_id"]}, which the annotations do not list')
        if not _is_number(det['score']):
            raise EvaluationError(f'detection {i} has score {det["score"]!r}, not a finite number')
        det = {k: det[k] for k in ('image_id', 'category_id', 'score', field)}
        if field == 'bbox':
            box = det['bbox']
            if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_is_number(v) for v in box):
                raise EvaluationError(f'detection {i} has bbox {box!r}, not [x, y, w, h] numbers')
        else:
            det['segmentation'] = _compressed_rle(det['segmentation'], coco_gt.imgs[det['image_id']], i)
        out.append(det)
    return out


def _compressed_rle(seg: Any, image: Mapping[str, Any], i: int) -> Dict[str, Any]:
    """Detection ``i``'s mask (polygons, uncompressed or compressed RLE) as compressed RLE with
    text counts, checked to be of its image's size (pycocotools would compare masks of other sizes
    pixel by pixel as they lie)."""
    from pycocotools import mask as mask_utils
    height, width = image['height'], image['width']
    if isinstance(seg, list):
        if not all(isinstance(p, list) and len(p) >= 6 and all(_is_number(v) for v in p) for p in seg):
            raise EvaluationError(f'detection {i} has a segmentation list that is not polygons [x0, y0, x1, y1, ...]')
        return _text_counts(mask_utils.merge(mask_utils.frPyObjects(seg, height, width)))
    if not isinstance(seg, Mapping) or 'counts' not in seg or 'size' not in seg:
        raise EvaluationError(f'detection {i} has segmentation {str(seg)[:60]}, neither polygons nor RLE '
                              '{"size": [h, w], "counts": ...}')
    if list(seg['size']) != [height, width]:
        raise EvaluationError(f'detection {i} has a mask of size {list(seg["size"])} on image {image["id"]} of '
                              f'size {[height, width]} (height, width)')
    if isinstance(seg['counts'], list):
        return _text_counts(mask_utils.frPyObjects(dict(seg), height, width))
    return _text_counts(dict(seg))


def _text_counts(rle: Dict[str, Any]) -> Dict[str, Any]:
    """An RLE whose counts are text, as json writes them."""
    return dict(rle, counts=rle['counts'].decode('ascii')) if isinstance(rle['counts'], bytes) else rle


def evaluate_detections(
        coco_gt,
        results: Sequence[Mapping[str, Any]],
        iou_types: Optional[Sequence[str]] = None,
        image_ids: Optional[Sequence[int]] = None,
) -> Dict[str, Dict[str, float]]:
    """COCOeval of ``results`` against ``coco_gt`` per iou type: ``{'bbox': {'map': ..., ...}, 'segm': ...}``
    under torchmetrics' names, values as pycocotools gives them (0..1, -1 where nothing is measured).

    ``iou_types`` default: 'bbox', and 'segm' where the detections carry masks. ``image_ids`` restricts
    the evaluation (default: every image of the annotations, as pycocotools does).
    """
    if iou_types is None:
        iou_types = ['bbox'] + (['segm'] if results and 'segmentation' in results[0] else [])
    stats = {}
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise EvaluationError(f'iou type must be one of {IOU_TYPES}, got {iou_type!r}')
        if iou_type == 'segm':
            unmasked = next((a for a in coco_gt.dataset['annotations'] if not a.get('segmentation')), None)
            if unmasked is not None:
                raise EvaluationError(f'annotation {unmasked["id"]} has no segmentation: the ground truth '
                                      'has no masks to evaluate segm against')
        values = evaluate_coco(coco_gt, _check_detections(results, coco_gt, iou_type), iou_type, image_ids)
        stats[iou_type] = {name: float(v) for (name, *_), v in zip(COCO_METRICS, values)}
    return stats


def load_detector(arch: str, backbone: str, num_classes: int, checkpoint: str, **kwargs: Any) -> nn.Module:
    """``create_detection_model(arch, backbone, num_classes, **kwargs)`` with the trained weights of
    ``checkpoint``: a whole detector (a state dict, a training checkpoint, a Lightning checkpoint of the
    recipes) or a paper's mmdet checkpoint (``load_detection_checkpoint``).

    The backbone's batch norm is built as the checkpoint was trained: frozen (torchvision's
    FrozenBatchNorm2d, which keeps no step count) where its file has no ``num_batches_tracked``.
    """
    from attnzoo.zoo.detection import create_detection_model, load_detection_checkpoint
    from attnzoo.zoo.tasks import model_state_from, read_checkpoint
    state_dict = read_checkpoint(checkpoint)
    kwargs.setdefault('frozen_bn', not any(k.endswith('.num_batches_tracked') for k in state_dict))
    model = create_detection_model(arch, backbone, num_classes, **kwargs)
    load_detection_checkpoint(model, model_state_from(state_dict, model))
    return model


@torch.inference_mode()
def detect(
        model: nn.Module,
        dataset: CocoDetection,
        batch_size: int = 1,
        workers: int = 2,
        device: Union[str, torch.device] = 'cpu',
        progress: bool = True,
) -> Dict[str, Any]:
    """Run a torchvision-style detector (images in [0, 1], a list of (3, H, W); outputs in the input
    images' pixels) over ``dataset`` and return its detections as COCO results with the time taken.

    Returns ``{'results': [...], 'image_ids': [...], 'seconds': float}``.

    ``batch_size`` 1 is what the reference evaluations (torchvision's, detectron2's, mmdet's) use: a
    torchvision detector pads a batch to its largest image, and what it finds on the smaller ones
    changes with the padding.
    """
    device = torch.device(device)
    model = model.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_detection)
    results: List[Dict[str, Any]] = []
    image_ids: List[int] = []
    start = time.perf_counter()
    for images, targets in tqdm(loader, desc='detecting', unit='batch', disable=not progress, leave=False):
        outputs = model([im.to(device) for im in images])
        ids = [int(t['image_id']) for t in targets]
        results += dataset.to_coco_results([{k: v.cpu() for k, v in o.items()} for o in outputs], ids)
        image_ids += ids
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return {'results': results, 'image_ids': image_ids, 'seconds': time.perf_counter() - start}


def stats_for_json(stats: Mapping[str, Mapping[str, float]]) -> Dict[str, Any]:
    """What ``--out`` holds: one iou type's dict under torchmetrics' names (with ``iou_type`` beside),
    or one dict per iou type under 'bbox' / 'segm' when both were evaluated."""
    if len(stats) == 1:
        (iou_type, values), = stats.items()
        return dict(values, iou_type=iou_type)
    return {k: dict(v) for k, v in stats.items()}

