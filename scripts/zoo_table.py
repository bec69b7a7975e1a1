#!/usr/bin/env python3
"""Print the zoo: every registered model with its measured and published figures.

Columns: parameters (M) and GFLOPs (multiply-adds, as papers count them) measured at the model's
default input size, the paper's params and ImageNet top-1, where the pretrained weights come from,
and CPU latency at batch 1. ``make zoo`` runs this.

    python scripts/zoo_table.py                 # every model
    python scripts/zoo_table.py 'davit*' --no-latency
"""
import argparse
from typing import List, Optional

import timm
import torch
from tqdm import tqdm

import attnzoo
from attnzoo.zoo.profile import count_gmacs, count_params, measure_latency


def _fmt(value: Optional[float], spec: str) -> str:
    return '-' if value is None else format(value, spec)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('pattern', nargs='?', default='*', help='glob over model names, az_ implied (default: all)')
    parser.add_argument('--no-latency', action='store_true', help='skip the CPU latency measurement')
    parser.add_argument('--threads', type=int, default=None, help='CPU threads for the latency (default: torch\'s)')
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    names = attnzoo.list_models(args.pattern)
    if not names:
        parser.error(f'no model matches {args.pattern!r}; registered: {", ".join(attnzoo.list_models())}')
    rows = []
    for name in tqdm(names, desc='measuring', unit='model'):
        card = attnzoo.model_card(name)
        model = timm.create_model(name)
        latency = None if args.no_latency else measure_latency(model, card.input_size) * 1e3
        rows.append((
            name, f'{card.input_size[1]}x{card.input_size[2]}', f'{count_params(model) / 1e6:.2f}',
            f'{count_gmacs(name, card.input_size):.2f}', _fmt(card.paper_params, '.1f'),
            _fmt(card.paper_top1, '.1f'), _fmt(latency, '.0f'), card.weights or '-', card.license or '-'))
        del model

    header = ('model', 'input', 'params M', 'GFLOPs', 'paper M', 'paper top-1', 'CPU ms (b1)', 'weights', 'license')
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print(f'attnzoo {attnzoo.__version__}: {len(rows)} models, torch {torch.__version__}, '
          f'{torch.get_num_threads()} threads')
    left = (0, 7, 8)  # text columns align left, numbers right
    for row in [header] + rows:
        print('  '.join(str(c).ljust(w) if i in left else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    print('GFLOPs are multiply-adds (torch.utils.flop_counter / 2), the papers\' convention.')


if __name__ == '__main__':
    main()
