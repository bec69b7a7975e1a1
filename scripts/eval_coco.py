#!/usr/bin/env python3
"""COCO box and mask AP with pycocotools' numbers: of a detections file, or of a detector run over a split.

    # a detections file (COCO results json) against its annotations
    python scripts/eval_coco.py --ann annotations/instances_val2017.json --results dets.json
    # a detector: rebuilt by name and loaded from a checkpoint, or a saved one (hf-hub:/local-dir:)
    python scripts/eval_coco.py --ann annotations/instances_val2017.json --images val2017 \\
        --model mask_rcnn --backbone az_dinat_tiny --checkpoint best.pth --out metrics.json
    python scripts/eval_coco.py --ann instances_val.json --images val --model hf-hub:ORG/NAME

Prints pycocotools' 12 numbers per iou type (bbox, and segm where there are masks) with their names;
--out writes them under torchmetrics' names (map, map_50, ..., mar_large: one dict, or one per iou
type under 'bbox'/'segm' when both), and in model mode the detections beside it (--dets-out).
Exit status: 0 on success, 1 with a one-line message for a missing or bad file, a class-count
mismatch or a checkpoint that does not fit, 2 for bad flags.
"""
import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import torch
from timm.utils import ParseKwargs

import attnzoo  # noqa: F401  (registers the az_* models with timm)
from attnzoo.backbones import CheckpointMismatchError, CheckpointReadError, PretrainedWeightsNotFoundError
from attnzoo.recipes.evaluation.coco import (
    COCO_METRICS,
    IOU_TYPES,
    coco_ground_truth,
    detect,
    evaluate_detections,
    format_coco_stats,
    load_detections,
    load_detector,
    stats_for_json,
)
from attnzoo.recipes.evaluation.common import (
    ClassCountMismatchError,
    EvaluationError,
    format_table,
    unwrap_worker_error,
)

# OSError: an image that cannot be read (the reader names it)
USER_ERRORS = (EvaluationError, CheckpointMismatchError, CheckpointReadError, PretrainedWeightsNotFoundError,
               OSError, ValueError)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--ann', required=True, metavar='INSTANCES.json', help='COCO instances json (the ground truth)')
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument('--results', metavar='DETS.json', help='COCO results json to evaluate')
    which.add_argument('--model', metavar='ARCH|NAME',
                       help='detector: an arch (faster_rcnn, mask_rcnn, retinanet, fcos) with --backbone, '
                            'or a saved model, hf-hub:ORG/NAME or local-dir:PATH')
    p.add_argument('--images', metavar='DIR', help='model mode: the folder of the split\'s images')
    p.add_argument('--backbone', help='model mode: backbone of ARCH (a zoo or timm name)')
    p.add_argument('--checkpoint', default='', metavar='PATH', help='model mode: the detector\'s trained weights')
    p.add_argument('--dense-cfg', default=None, help='model mode: the backbone family\'s dense settings by name')
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                   help='model mode: torchvision detector arguments, e.g. min_size=800 max_size=1333')
    p.add_argument('--iou-type', nargs='+', choices=IOU_TYPES, default=None,
                   help='what to evaluate (default: bbox, and segm where the detections have masks)')
    p.add_argument('--out', metavar='FILE', help='write the numbers as json under torchmetrics\' names')
    p.add_argument('--dets-out', metavar='FILE', help='model mode: write the detections (COCO results json); '
                                                      'default with --out: OUT with .detections.json')
    p.add_argument('-b', '--batch-size', type=int, default=1,
                   help='model mode: images per batch (default: 1, as reference evaluations: a batch is padded to '
                        'its largest image, which changes what a detector finds on the others)')
    p.add_argument('-j', '--workers', type=int, default=2, help='model mode: data loading workers (default: 2)')
    p.add_argument('--device', default=None, help='model mode: device (default: cuda if available, else cpu)')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    return p


def _detector(args, num_classes: int) -> torch.nn.Module:
    from attnzoo.zoo import from_pretrained
    if args.model.startswith(('hf-hub:', 'local-dir:')):
        if args.backbone or args.checkpoint:
            raise EvaluationError('a saved model carries its backbone and weights: drop --backbone/--checkpoint')
        model = from_pretrained(args.model)
        cfg = getattr(model, 'attnzoo_cfg', {})
        if cfg.get('task') != 'detection':
            raise EvaluationError(f'{args.model} is not a detection model (task {cfg.get("task", "classification")!r})')
    else:
        if not args.backbone:
            raise EvaluationError(f'--model {args.model} needs --backbone')
        if not args.checkpoint:
            raise EvaluationError('--model ARCH needs the trained --checkpoint (a random detector has no AP to report)')
        model = load_detector(args.model, args.backbone, num_classes, args.checkpoint, dense_cfg=args.dense_cfg,
                              **args.model_kwargs)
    if model.attnzoo_cfg['num_classes'] != num_classes:
        raise ClassCountMismatchError(
            f'the detector has {model.attnzoo_cfg["num_classes"]} classes (background included) but {args.ann} '
            f'has {num_classes - 1} categories, so {num_classes} are needed')
    return model


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # pycocotools' mask code trips a numpy 2 deprecation notice on every call; nothing a user can act on
    warnings.filterwarnings('ignore', category=DeprecationWarning, module='pycocotools')
    if args.model and not args.images:
        parser.error('--model needs --images, the folder of the split\'s images')
    try:
        coco_gt = coco_ground_truth(args.ann)
        if args.results:
            results = load_detections(args.results)
            image_ids = None
        else:
            from attnzoo.recipes.data.coco import CocoDetection
            dataset = CocoDetection(args.images, args.ann, masks=False)
            model = _detector(args, dataset.num_classes)
            device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
            run = detect(model, dataset, args.batch_size, args.workers, device, progress=not args.no_progress)
            results, image_ids = run['results'], run['image_ids']
            rate = len(image_ids) / run['seconds']
            dets_out = args.dets_out or (str(Path(args.out).with_suffix('.detections.json')) if args.out else None)
            if dets_out:
                Path(dets_out).parent.mkdir(parents=True, exist_ok=True)
                Path(dets_out).write_text(json.dumps(results))
            print(f'{len(results)} detections on {len(image_ids)} images, {rate:.1f} img/s'
                  + (f', written to {dets_out}' if dets_out else ''))
        iou_types = args.iou_type
        if iou_types is None and not args.results:
            iou_types = ['bbox'] + (['segm'] if model.attnzoo_cfg['arch'] == 'mask_rcnn' else [])
        stats = evaluate_detections(coco_gt, results, iou_types, image_ids)
    except USER_ERRORS as e:
        # an error in a data loading worker arrives with the worker's traceback as its message
        print(f'error: {unwrap_worker_error(e)}', file=sys.stderr)
        return 1

    for iou_type, values in stats.items():
        print(f'{iou_type}:')
        print(format_coco_stats(values))
    rows = [dict(iou_type=k, **{name: v[name] for name, *_ in COCO_METRICS}) for k, v in stats.items()]
    print()
    print(format_table(rows, ['iou_type', 'map', 'map_50', 'map_75', 'map_small', 'map_medium', 'map_large',
                              'mar_1', 'mar_10', 'mar_100']))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(stats_for_json(stats), indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
