"""``make demo``: train a zoo model on scikit-learn's digits on this CPU and score it on the held-out split.

    python -m attnzoo.recipes.demo                          # the packaged 'digits' config
    python -m attnzoo.recipes.demo --trainer.max_epochs 1   # any attnzoo-train override

It runs ``attnzoo-train fit --config digits`` (checkpoints, curves and the confusion matrix in
``runs/digits/checkpoints``), then tests the best checkpoint on the 360 held-out digits, which the
run never saw, and prints the top-1, the time taken and where everything is. It exits with status 1
when the top-1 is below ``--min-top1`` (default 0.95).
"""
import argparse
import os
import sys
import time
from typing import List, Optional

__all__ = ['main']


def main(argv: Optional[List[str]] = None) -> float:
    """Run the demo; returns the held-out top-1 (a fraction)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', default='digits', help='packaged config name or YAML file (default: digits)')
    parser.add_argument('--min-top1', type=float, default=0.95, help='fail below this held-out top-1')
    args, overrides = parser.parse_known_args(argv)

    start = time.perf_counter()
    from .callbacks import TrainingPlots
    from .cli import run
    cli = run(['fit', '--config', args.config, *overrides])
    trained = time.perf_counter() - start
    best = cli.trainer.checkpoint_callback.best_model_path
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path='best', verbose=False)
    top1 = float(results[0]['test_acc1'])
    total = time.perf_counter() - start

    plots = next((cb.written for cb in cli.trainer.callbacks if isinstance(cb, TrainingPlots)), [])
    directory = os.path.dirname(best)
    n_test = len(cli.datamodule.dataset('test'))
    print('\n' + '=' * 78)
    n_train = len(cli.datamodule.dataset('train'))
    print(f'model {cli.model.hparams.model} trained on {n_train} digits in {trained:.0f} s, '
          f'{cli.trainer.current_epoch} epochs')
    print(f'held-out top-1: {100 * top1:.2f} % on {n_test} test digits (never seen in training), total {total:.0f} s')
    print(f'best checkpoint: {best}')
    print(f'last checkpoint: {os.path.join(directory, "last.ckpt")}  (resume: --ckpt_path last)')
    for path in plots:
        print(f'plot: {path}')
    print('=' * 78)
    if top1 < args.min_top1:
        print(f'top-1 {100 * top1:.2f} % is below {100 * args.min_top1:.0f} %', file=sys.stderr)
        sys.exit(1)
    return top1


if __name__ == '__main__':
    main()
