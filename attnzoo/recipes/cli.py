"""``attnzoo-train``: LightningCLI over the recipes' tasks and data modules.

    attnzoo-train fit --config digits                    # a config shipped in the package, by name
    attnzoo-train fit --config digits --ckpt_path last   # resume where the run stopped
    attnzoo-train test --config digits --ckpt_path best
    attnzoo-train fit --config my.yaml --trainer.max_epochs 5
    attnzoo-train configs                                # the packaged configs

Tasks and data modules are chosen by ``class_path`` (subclass mode: ``ClassificationTask``,
``DigitsDataModule``...). Every run keeps its checkpoints in ``<trainer.default_root_dir>/checkpoints``
(``last.ckpt`` always, and the best by the task's monitored metric), where ``--ckpt_path last``
finds them, and writes its curves and figures there at the end of fit.
"""
import os
import sys
from pathlib import Path
from typing import List, Optional

from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import ArgsType, LightningCLI

import attnzoo

from . import datamodules, tasks  # noqa: F401  (class_path short names resolve among imported classes)
from .callbacks import CheckpointOnStop, PredictionWriter, TrainingPlots
from .datamodules import BaseDataModule
from .tasks import BaseTask

__all__ = ['CONFIG_DIR', 'AttnzooCLI', 'list_configs', 'main', 'resolve_config', 'run']

CONFIG_DIR = Path(__file__).parent / 'configs'


def list_configs() -> List[str]:
    """The names of the configs shipped in the package."""
    return sorted(p.stem for p in CONFIG_DIR.glob('*.yaml'))


def resolve_config(value: str) -> str:
    """A config file path, or the name of a packaged config (``digits`` or ``digits.yaml``)."""
    if os.path.isfile(value):
        return value
    name = value[:-5] if value.endswith('.yaml') else value
    path = CONFIG_DIR / f'{name}.yaml'
    if os.sep not in value and path.is_file():
        return str(path)
    raise FileNotFoundError(f'no config file {value!r} and no packaged config of that name; '
                            f'packaged: {", ".join(list_configs())}')


def _resolve_config_args(args: List[str]) -> List[str]:
    out = []
    it = iter(args)
    for arg in it:
        if arg in ('--config', '-c'):
            out += [arg, resolve_config(next(it, ''))]
        elif arg.startswith('--config='):
            out.append('--config=' + resolve_config(arg.split('=', 1)[1]))
        else:
            out.append(arg)
    return out


def _checkpoint_dir(root: Optional[str]) -> str:
    return os.path.join(root or os.getcwd(), 'checkpoints')


class AttnzooCLI(LightningCLI):
    """LightningCLI with the recipes' fixed run layout: a ``ModelCheckpoint`` (``checkpoint.*``,
    ``save_last=True``, in ``<default_root_dir>/checkpoints``, keeping the best by the task's
    ``monitor``; ``last.ckpt`` brought up to the final step and an interrupted run's state kept by
    ``CheckpointOnStop``), the curves and figures (``plots.*``) and predict's writer (``predictions.*``)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, 'checkpoint')
        parser.set_defaults({'checkpoint.save_last': True, 'trainer.default_root_dir': 'runs/default'})
        parser.link_arguments('trainer.default_root_dir', 'checkpoint.dirpath', compute_fn=_checkpoint_dir)
        parser.link_arguments('model', 'checkpoint.monitor', compute_fn=lambda m: m.monitor, apply_on='instantiate')
        parser.link_arguments('model', 'checkpoint.mode', compute_fn=lambda m: m.mode, apply_on='instantiate')
        parser.add_lightning_class_args(CheckpointOnStop, 'checkpoint_on_stop')
        parser.add_lightning_class_args(TrainingPlots, 'plots')
        parser.add_lightning_class_args(PredictionWriter, 'predictions')

    def _resolve_best(self) -> None:
        # a fresh trainer knows no best checkpoint: read the one the run's last.ckpt recorded
        kwargs = self.config_init[self.subcommand]
        if kwargs.get('ckpt_path') != 'best' or self.trainer.checkpoint_callback is None:
            return
        directory = self.trainer.checkpoint_callback.dirpath
        last = os.path.join(directory, 'last.ckpt')
        if not os.path.isfile(last):
            raise FileNotFoundError(f'--ckpt_path best: no run in {directory} (no last.ckpt); fit first')
        import torch
        state = torch.load(last, map_location='cpu', weights_only=False)
        best = next((s.get('best_model_path') for k, s in state.get('callbacks', {}).items()
                     if k.startswith('ModelCheckpoint')), None)
        if not best or not os.path.isfile(best):
            raise FileNotFoundError(f'--ckpt_path best: {last} records no best checkpoint that exists ({best!r})')
        kwargs['ckpt_path'] = best

    before_validate = before_test = before_predict = _resolve_best

    def parse_arguments(self, parser, args: List[str]) -> None:
        # ``args`` is the command line itself with config names resolved to files (``run``), so
        # Lightning's warning against passing both ``args`` and a command line does not apply; the
        # command line stays in sys.argv for DDP's relaunch of this script on the other devices
        self.config = parser.parse_args(args)


def run(args: List[str]) -> AttnzooCLI:
    """Run ``attnzoo-train`` with ``args`` (``['fit', '--config', 'digits', ...]``); returns the
    CLI, whose ``trainer``, ``model`` and ``datamodule`` hold the run's state and metrics."""
    return AttnzooCLI(
        BaseTask, BaseDataModule, subclass_mode_model=True, subclass_mode_data=True,
        seed_everything_default=0, save_config_kwargs={'overwrite': True},
        parser_kwargs={'version': attnzoo.__version__}, args=_resolve_config_args(list(args)))


def main(args: ArgsType = None) -> None:
    """Entry point of ``attnzoo-train``."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ['configs']:
        for name in list_configs():
            print(f'{name:28s} {CONFIG_DIR / (name + ".yaml")}')
        return
    run(argv)


if __name__ == '__main__':
    main()
