#!/usr/bin/env python3
"""Evaluate classifiers on an ImageNet-layout folder (or tar) with timm validate.py's numbers.

The flags it shares with timm's validate.py mean what they mean there, and the data configuration
is resolved from each model's pretrained_cfg as timm does, so the printed top-1/top-5 are the ones
validate.py gives on the same folder. Any zoo or timm model, hf-hub: and local-dir: names included;
several models (names or wildcards) give one row each.

    python scripts/eval_imagenet.py /data/imagenet --model az_davit_tiny.msft_in1k
    python scripts/eval_imagenet.py /data/imagenet/val --model 'az_*' resnet50.a1_in1k --results-file r.csv
    python scripts/eval_imagenet.py val.tar --model az_shvit_s1 --checkpoint run/best.pth --amp

Exit status: 0 when every model was evaluated, 1 when one failed (the message says why), 2 for bad flags.
"""
import argparse
import logging
import sys
from typing import List, Optional

import torch
from timm.utils import ParseKwargs

import attnzoo  # noqa: F401  (registers the az_* models with timm)
from attnzoo.backbones import CheckpointMismatchError, CheckpointReadError, PretrainedWeightsNotFoundError
from attnzoo.recipes.evaluation.common import EvaluationError, format_table, write_results
from attnzoo.recipes.evaluation.imagenet import evaluate_classifier, expand_model_names, is_wildcard

# what a user can fix: printed as one line, no traceback
# (ValueError: an input size below the model's least, said by the model)
USER_ERRORS = (EvaluationError, CheckpointMismatchError, CheckpointReadError, PretrainedWeightsNotFoundError,
               FileNotFoundError, ValueError)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('data', metavar='DIR',
                   help='ImageNet-layout folder (class subfolders), its parent with val/, or a .tar')
    p.add_argument('--model', '-m', nargs='+', required=True, metavar='NAME',
                   help="model names, wildcards ('az_*' expands to the pretrained tags) or hf-hub:/local-dir: names")
    p.add_argument('--pretrained', action='store_true',
                   help='use the pretrained weights (the default when no --checkpoint is given, as in validate.py)')
    p.add_argument('--checkpoint', default='', metavar='PATH', help='checkpoint to evaluate (one model only)')
    p.add_argument('--use-ema', action='store_true', help='use the EMA weights of the checkpoint if present')
    p.add_argument('--split', default='validation', help='split subfolder searched under DIR (default: validation)')
    p.add_argument('--img-size', type=int, default=None, metavar='N', help='input image size (model default if unset)')
    p.add_argument('--input-size', type=int, nargs=3, default=None, metavar='N',
                   help='input dimensions C H W, e.g. --input-size 3 224 224 (model default if unset)')
    p.add_argument('--use-train-size', action='store_true',
                   help='use the train input size even where the pretrained cfg names a test size')
    p.add_argument('--crop-pct', type=float, default=None, metavar='PCT', help='center crop fraction (model default)')
    p.add_argument('--crop-mode', default=None, choices=('center', 'squash', 'border'),
                   help='crop mode (model default)')
    p.add_argument('--interpolation', default='', choices=('', 'bilinear', 'bicubic', 'nearest', 'random'),
                   metavar='NAME', help='resize interpolation: bilinear, bicubic, nearest (model default)')
    p.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='normalisation mean override')
    p.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='normalisation std override')
    p.add_argument('--num-classes', type=int, default=None, help='classes of the checkpoint (model default)')
    p.add_argument('--in-chans', type=int, default=None, metavar='N',
                   help='input channels (default: from --input-size, else 3)')
    p.add_argument('--gp', default=None, metavar='POOL', help='global pool type (model default)')
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, help='more create_model arguments')
    p.add_argument('--reparam', action='store_true',
                   help='reparameterize (fuse) the model, e.g. SHViT\'s conv-BN pairs')
    p.add_argument('--test-pool', action='store_true', help='test-time pooling where the input outgrows the model\'s')
    p.add_argument('--crop-border-pixels', type=int, default=None, metavar='N', help='crop this many border pixels')
    p.add_argument('--valid-labels', default='', metavar='FILE',
                   help='output indices to score, one per line, in the folder\'s class order (a class subset)')
    p.add_argument('--real-labels', default='', metavar='FILE',
                   help='ImageNet-ReaL real.json: score against its labels')
    p.add_argument('--class-map', default='', metavar='FILE', help='class name to index map (.txt: one per line)')
    p.add_argument('-b', '--batch-size', type=int, default=256, metavar='N', help='batch size (default: 256)')
    p.add_argument('-j', '--workers', type=int, default=4, metavar='N', help='data loading workers (default: 4)')
    p.add_argument('--device', default=None, help='device (default: cuda if available, else cpu)')
    p.add_argument('--amp', action='store_true', help='mixed precision (torch.autocast)')
    p.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'), help='autocast dtype')
    p.add_argument('--channels-last', action='store_true', help='channels_last memory layout')
    p.add_argument('--no-prefetcher', action='store_true', help="normalise in the transform, not timm's prefetcher")
    p.add_argument('--pin-mem', action='store_true', help='pin host memory in the loader')
    p.add_argument('--seed', type=int, default=42, metavar='S',
                   help="random seed, set before each model is built (default: 42, validate.py's)")
    p.add_argument('--results-file', default='', metavar='FILE', help="write validate.py's result columns here")
    p.add_argument('--results-format', default='csv', choices=('csv', 'json'), help='results file format')
    p.add_argument('--no-progress', action='store_true', help='no progress bars')
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    # timm's dataset warns "Skipped sample" before the evaluation stops on that image with its own message
    logging.getLogger('timm.data.dataset').setLevel(logging.ERROR)
    try:
        names = expand_model_names(args.model)
    except EvaluationError as e:
        parser.error(str(e))
    if args.checkpoint and len(names) > 1:
        parser.error(f'--checkpoint fits one model, got {len(names)}: {", ".join(names)}')
    for flag in ('mean', 'std'):
        if getattr(args, flag) is not None and len(getattr(args, flag)) not in (1, 3):
            parser.error(f'--{flag} takes one value or one per channel (3), got {len(getattr(args, flag))}')
    # validate.py's bulk mode, for several names or a wildcard however many it matches: a list of
    # results sorted by top-1; one named model gives its row alone
    bulk = len(args.model) > 1 or any(is_wildcard(m) for m in args.model)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # as validate.py
        torch.backends.cudnn.benchmark = True

    data_args = dict(img_size=args.img_size, input_size=args.input_size, crop_pct=args.crop_pct,
                     crop_mode=args.crop_mode, interpolation=args.interpolation, mean=args.mean, std=args.std)
    results, failures = [], []
    for name in names:
        try:
            r = evaluate_classifier(
                name, args.data, pretrained=(args.pretrained or not args.checkpoint), checkpoint=args.checkpoint,
                use_ema=args.use_ema, num_classes=args.num_classes, data_args=data_args,
                use_train_size=args.use_train_size, split=args.split, class_map=args.class_map,
                batch_size=args.batch_size, workers=args.workers, device=args.device, amp=args.amp,
                amp_dtype=args.amp_dtype, channels_last=args.channels_last, prefetcher=not args.no_prefetcher,
                pin_memory=args.pin_mem, progress=not args.no_progress, seed=args.seed, in_chans=args.in_chans,
                global_pool=args.gp, model_kwargs=args.model_kwargs, reparam=args.reparam, test_pool=args.test_pool,
                crop_border_pixels=args.crop_border_pixels, valid_labels=args.valid_labels,
                real_labels=args.real_labels)
        except USER_ERRORS as e:
            print(f'error: {name}: {e}', file=sys.stderr)
            failures.append(name)
            continue
        print(f'{name}: * Acc@1 {r.top1:.3f} ({r.top1_err:.3f}) Acc@5 {r.top5:.3f} ({r.top5_err:.3f})  '
              f'{r.images} images, {r.images_per_sec:.1f} img/s', flush=True)
        results.append(r)

    if bulk:
        results.sort(key=lambda r: r.top1, reverse=True)  # validate.py's order for several models
    if results:
        rows = [dict(r.validate_row(), img_per_sec=r.images_per_sec) for r in results]
        print()
        print(format_table(rows, ['model', 'top1', 'top1_err', 'top5', 'top5_err', 'img_per_sec', 'param_count',
                                  'img_size', 'crop_pct', 'interpolation'],
                           floatfmt=dict(img_per_sec='.1f', param_count='.2f')))
    if args.results_file and results:
        out = [r.validate_row() for r in results]
        write_results(args.results_file, out if bulk else out[0], args.results_format)
    if failures:
        print(f'{len(failures)} of {len(names)} models failed: {", ".join(failures)}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
