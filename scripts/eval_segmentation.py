#!/usr/bin/env python3
"""Semantic segmentation on an ADE20K-layout folder with mmseg's mIoU, mAcc and aAcc.

    # a model rebuilt by name from its checkpoint (a paper's mmseg file or attnzoo's), ADE20K's labels
    python scripts/eval_segmentation.py data/ADEChallengeData2016 --model upernet --backbone az_dinat_tiny \\
        --num-classes 150 --checkpoint upernet_dinat_tiny.pth --reduce-zero-label
    # the papers' multi-scale + flip test, sliding windows of 512 every 341 pixels
    python scripts/eval_segmentation.py ... --aug-test --mode slide --crop-size 512 512 --stride 341 341
    # a saved model
    python scripts/eval_segmentation.py data/shapes --model hf-hub:ORG/NAME --out metrics.json

The metric is mmseg's IoUMetric over the whole split (255 ignored); inference is mmseg's: each image
resized to fit --scale (2048 512: short edge 512, aspect kept), whole or sliding-window, logits
resized back to the original image; --aug-test runs the ratios 0.5-1.75 of that scale, each also
flipped, and averages the softmax. Exit status: 0 on success, 1 with a one-line message for a
missing or bad folder, labels the model cannot predict or a checkpoint that does not fit, 2 for bad flags.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import torch
from timm.models import resolve_pretrained_cfg
from timm.utils import ParseKwargs

import attnzoo  # noqa: F401  (registers the az_* models with timm)
from attnzoo.backbones import CheckpointMismatchError, CheckpointReadError, PretrainedWeightsNotFoundError
from attnzoo.recipes.evaluation.common import EvaluationError, format_table, unwrap_worker_error
from attnzoo.recipes.evaluation.segmentation import PAPER_RATIOS, evaluate_segmentation, load_segmenter

# OSError: an image or annotation that cannot be read
USER_ERRORS = (EvaluationError, CheckpointMismatchError, CheckpointReadError, PretrainedWeightsNotFoundError,
               OSError, ValueError)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('data', metavar='DIR', help='folder with images/<split>/ and annotations/<split>/')
    p.add_argument('--split', default='validation', help='split subfolder (default: validation)')
    p.add_argument('--model', required=True, metavar='ARCH|NAME',
                   help="an arch (upernet, fpn, smp:<name>) with --backbone, or a saved model, hf-hub:ORG/NAME "
                        "or local-dir:PATH")
    p.add_argument('--backbone', help='ARCH\'s backbone (a zoo or timm name)')
    p.add_argument('--checkpoint', default='', metavar='PATH', help='ARCH\'s trained weights (mmseg\'s or attnzoo\'s)')
    p.add_argument('--num-classes', type=int, default=None, help='ARCH\'s classes (ADE20K: 150)')
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                   help='further arguments of create_segmentation_model, e.g. channels=512')
    p.add_argument('--class-names', nargs='+', default=None, metavar='NAME',
                   help='the class names by index, or a file of them one per line (default: the indices)')
    p.add_argument('--reduce-zero-label', action='store_true',
                   help='ADE20K\'s labels: 0 ("other") ignored, 1..150 read as 0..149')
    p.add_argument('--mode', choices=('whole', 'slide'), default='whole', help='inference (default: whole)')
    p.add_argument('--crop-size', type=int, nargs=2, default=(512, 512), metavar=('H', 'W'),
                   help='slide window (default: 512 512)')
    p.add_argument('--stride', type=int, nargs=2, default=(341, 341), metavar=('H', 'W'),
                   help='slide stride (default: 341 341)')
    p.add_argument('--scale', type=int, nargs=2, default=(2048, 512), metavar=('LONG', 'SHORT'),
                   help="test scale, aspect kept (default: mmseg's ADE20K 2048 512)")
    p.add_argument('--no-resize', action='store_true', help='run each image at its own size (ratios still apply)')
    p.add_argument('--aug-test', action='store_true',
                   help=f'the papers\' multi-scale + flip: ratios {" ".join(map(str, PAPER_RATIOS))}, flipped too')
    p.add_argument('--ratios', type=float, nargs='+', default=None, help='test scale ratios (default: 1)')
    p.add_argument('--flip', action='store_true', help='also run each view mirrored')
    p.add_argument('--mean', type=float, nargs=3, default=None, help='normalisation mean (default: the backbone\'s)')
    p.add_argument('--std', type=float, nargs=3, default=None, help='normalisation std (default: the backbone\'s)')
    p.add_argument('--out', metavar='FILE', help='write the metrics (and per-class IoU/Acc) as json')
    p.add_argument('-j', '--workers', type=int, default=2, help='data loading workers (default: 2)')
    p.add_argument('--device', default=None, help='device (default: cuda if available, else cpu)')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    return p


def _model(args) -> torch.nn.Module:
    if args.model.startswith(('hf-hub:', 'local-dir:')):
        from attnzoo.zoo import from_pretrained
        if args.backbone or args.checkpoint or args.num_classes:
            raise EvaluationError('a saved model carries its backbone, classes and weights: drop --backbone, '
                                  '--checkpoint and --num-classes')
        model = from_pretrained(args.model)
        task = getattr(model, 'attnzoo_cfg', {}).get('task', 'classification')
        if task != 'segmentation':
            raise EvaluationError(f'{args.model} is not a segmentation model (task {task!r})')
        return model
    missing = [f for f, v in (('--backbone', args.backbone), ('--checkpoint', args.checkpoint),
                              ('--num-classes', args.num_classes)) if not v]
    if missing:
        raise EvaluationError(f'--model {args.model} needs {", ".join(missing)}')
    return load_segmenter(args.model, args.backbone, args.num_classes, args.checkpoint, **args.model_kwargs)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    ratios = args.ratios or (PAPER_RATIOS if args.aug_test else (1.0,))
    flip = args.flip or args.aug_test
    try:
        from attnzoo.recipes.data.segmentation import SegmentationFolder
        dataset = SegmentationFolder(args.data, args.split, reduce_zero_label=args.reduce_zero_label)
        model = _model(args)
        cfg = model.attnzoo_cfg
        data_cfg = resolve_pretrained_cfg(cfg['backbone'])
        mean, std = args.mean or data_cfg.mean, args.std or data_cfg.std
        device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
        names = args.class_names
        if names and len(names) == 1 and Path(names[0]).is_file():
            names = [line.strip() for line in Path(names[0]).read_text().splitlines() if line.strip()]
        metrics = evaluate_segmentation(
            model, dataset, cfg['num_classes'], class_names=names, mean=mean, std=std,
            scale=None if args.no_resize else args.scale,
            ratios=ratios, flip=flip, mode=args.mode, crop_size=args.crop_size, stride=args.stride,
            workers=args.workers, device=device, progress=not args.no_progress)
    except USER_ERRORS as e:
        # an error in a data loading worker arrives with the worker's traceback as its message
        print(f'error: {unwrap_worker_error(e)}', file=sys.stderr)
        return 1

    per_class = [dict(index=i, cls=name, IoU=v['IoU'], Acc=v['Acc'])
                 for i, (name, v) in enumerate(metrics['per_class'].items())]
    print('per class results:')
    print(format_table(per_class, floatfmt=dict(IoU='.2f', Acc='.2f')))
    print()
    test = args.mode
    if args.mode == 'slide':
        test += f' {args.crop_size[0]}x{args.crop_size[1]} every {args.stride[0]}x{args.stride[1]}'
    test += f', scale {"none" if args.no_resize else "x".join(map(str, args.scale))}'
    if len(ratios) > 1:
        test += f', ratios {",".join(map(str, ratios))}'
    if flip:
        test += ', flip'
    print(format_table([dict(aAcc=metrics['aAcc'], mIoU=metrics['mIoU'], mAcc=metrics['mAcc'], images=metrics['images'],
                             img_per_sec=metrics['images_per_sec'], test=test)],
                       floatfmt=dict(aAcc='.2f', mIoU='.2f', mAcc='.2f', img_per_sec='.2f')))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(metrics, test=test), indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
