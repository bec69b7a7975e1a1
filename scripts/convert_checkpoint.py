#!/usr/bin/env python3
"""Convert a published checkpoint of any supported layout into a safetensors file with the zoo's keys.

    python scripts/convert_checkpoint.py az_davit_tiny davit_tiny_original.pth davit_tiny.safetensors
    python scripts/convert_checkpoint.py az_davit_base_fl Florence-2-base/pytorch_model.bin tower.safetensors

The input may be a torch pickle ({'model': sd}, {'state_dict': sd} or a bare state dict) or a
safetensors file. The result loads strictly, e.g. with
``timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=OUTPUT))``.
"""
import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional

import timm
import torch
from safetensors.torch import load_file, save_file

import attnzoo
from attnzoo.backbones import family_of


def load_checkpoint(path: Path) -> Dict:
    """Read a checkpoint file, with an error that names the file when it cannot be read."""
    if not path.is_file():
        raise FileNotFoundError(f'no checkpoint file at {path}')
    try:
        if path.suffix == '.safetensors':
            return load_file(str(path))
        # training scripts store their argparse.Namespace beside the weights: allow that one class
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # every reader has its own error type for a damaged file
        raise RuntimeError(f'could not read checkpoint {path}: corrupt, truncated or not a checkpoint ({e})') from e


def convert(model_name: str, checkpoint: Dict) -> Dict[str, torch.Tensor]:
    """The checkpoint's tensors under the zoo model's keys; raises CheckpointMismatchError if they don't fit."""
    family = family_of(model_name)
    with torch.device('meta'):  # only the names and shapes are needed
        model = timm.create_model(model_name)
    converted = family.checkpoint_filter_fn(checkpoint, model)
    return {k: v.contiguous() for k, v in converted.items()}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('model', choices=attnzoo.list_models(), metavar='MODEL',
                        help='zoo model name, e.g. az_davit_tiny')
    parser.add_argument('input', type=Path, help='published checkpoint (.pth, .pth.tar, .bin or .safetensors)')
    parser.add_argument('output', type=Path, help='safetensors file to write')
    args = parser.parse_args(argv)
    if args.output.suffix != '.safetensors':
        parser.error('the output file must end in .safetensors')
    try:
        state_dict = convert(args.model, load_checkpoint(args.input))
    except (FileNotFoundError, RuntimeError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    # write beside the target, then rename, so a failure never leaves a half-written file behind
    tmp = args.output.with_suffix('.safetensors.partial')
    save_file(state_dict, str(tmp), metadata={'attnzoo_model': args.model, 'source': args.input.name})
    tmp.replace(args.output)
    print(f'{args.model}: {len(state_dict)} tensors, '
          f'{sum(v.numel() for v in state_dict.values()) / 1e6:.2f}M values -> {args.output}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
