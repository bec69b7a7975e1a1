#!/usr/bin/env python3
"""Publish a model on the Hugging Face Hub with a model card: config.json, model.safetensors, README.md.

A classifier is any timm or zoo model name (its pretrained weights with --pretrained, or a trained
--checkpoint); a task model (segmentation, detection, medical) is rebuilt from --task-config, the
``attnzoo_cfg`` its builder recorded, and its --checkpoint. --metrics takes the eval scripts' output
files, which become the card's evaluation results. --dry-run writes the folder and uploads nothing.

    python scripts/push_to_hub.py ORG/az-shvit-s1 --model az_shvit_s1.in1k --pretrained \\
        --metrics results-imagenet.csv --dry-run out/az-shvit-s1
    python scripts/push_to_hub.py ORG/upernet-davit-t --task-config cfg.json --checkpoint best.ckpt \\
        --metrics ade20k.json

Loading: timm.create_model('hf-hub:ORG/NAME', pretrained=True) for a classifier,
attnzoo.zoo.from_pretrained('hf-hub:ORG/NAME') for either kind.
"""
import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import attnzoo  # noqa: F401  (registers the az_* models with timm)
from attnzoo.backbones import CheckpointMismatchError, CheckpointReadError, PretrainedWeightsNotFoundError
from attnzoo.recipes.evaluation.imagenet import create_classifier
from attnzoo.zoo import create_task_model, push_to_hub, save_pretrained
from attnzoo.zoo.tasks import load_task_checkpoint

# OSError: the Hub out of reach (offline mode included: huggingface_hub's OfflineModeIsEnabled)
USER_ERRORS = (CheckpointMismatchError, CheckpointReadError, PretrainedWeightsNotFoundError, OSError, ValueError)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('repo_id', help='Hub repository, ORG/NAME (the card names it even in a dry run)')
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument('--model', help='classifier: a timm or zoo model name, or an hf-hub:/local-dir: name')
    which.add_argument('--task-config', metavar='JSON|FILE', help="task model: its attnzoo_cfg, inline or a file")
    p.add_argument('--pretrained', action='store_true', help='classifier: start from its pretrained weights')
    p.add_argument('--checkpoint', default='', metavar='PATH',
                   help='trained weights (state dict or training checkpoint)')
    p.add_argument('--use-ema', action='store_true', help="publish the checkpoint's EMA weights")
    p.add_argument('--num-classes', type=int, default=None, help='classifier: classes of the checkpoint')
    p.add_argument('--metrics', nargs='+', default=None, metavar='FILE',
                   help="eval scripts' output files (eval_imagenet --results-file, eval_coco/eval_segmentation --out)")
    p.add_argument('--dataset', nargs=3, default=None, metavar=('HUB_ID', 'NAME', 'SPLIT'),
                   help='dataset of the metrics (default per task: ImageNet-1k, COCO, ADE20K)')
    p.add_argument('--license', default=None, help="card license (default: the weights' license)")
    p.add_argument('--private', action='store_true', help='create the repository private')
    p.add_argument('--token', default=None, help='Hub token (default: the logged-in one)')
    p.add_argument('--commit-message', default='Add model')
    p.add_argument('--dry-run', metavar='DIR', default=None, help='write the folder to DIR, upload nothing')
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    card = dict(metrics=args.metrics, dataset=tuple(args.dataset) if args.dataset else None, license=args.license)
    try:
        if args.task_config:
            text = args.task_config
            if os.path.isfile(text):
                text = Path(text).read_text()
            elif not text.lstrip().startswith('{'):
                raise FileNotFoundError(f'--task-config {text} is neither a file nor inline json')
            try:
                cfg = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f'--task-config is not valid json: {e}') from e
            model = create_task_model(cfg)
            if args.checkpoint:
                load_task_checkpoint(model, args.checkpoint, use_ema=args.use_ema)
            else:
                print('warning: no --checkpoint: the task model is published with random weights', file=sys.stderr)
        else:
            model = create_classifier(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint or None,
                                      num_classes=args.num_classes, use_ema=args.use_ema)
            if not (args.pretrained or args.checkpoint):
                print('warning: neither --pretrained nor --checkpoint: publishing random weights', file=sys.stderr)
        if args.dry_run:
            folder = save_pretrained(model, args.dry_run, repo_id=args.repo_id, **card)
            print(f'wrote {folder}: ' + ', '.join(sorted(p.name for p in folder.iterdir())))
        else:
            commit = push_to_hub(model, args.repo_id, private=args.private, token=args.token,
                                 commit_message=args.commit_message, **card)
            print(f'pushed {args.repo_id}: {getattr(commit, "commit_url", commit)}')
    except USER_ERRORS as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
