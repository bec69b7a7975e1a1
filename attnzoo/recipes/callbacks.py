"""Callbacks of the recipes: the run's curves and figures beside the checkpoints, and predict's output files."""
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.utilities import rank_zero_info

__all__ = ['PredictionWriter', 'TrainingPlots', 'run_directory']


def run_directory(trainer: pl.Trainer) -> str:
    """Where a run's checkpoints, curves and figures go: the checkpoint callback's folder."""
    ckpt = trainer.checkpoint_callback
    return getattr(ckpt, 'dirpath', None) or os.path.join(trainer.default_root_dir, 'checkpoints')


class TrainingPlots(pl.Callback):
    """Keeps the run's curves and, at the end of fit, writes ``curves.png`` (losses and metrics
    over steps) and the task's figures (``BaseTask.figures``: a confusion matrix, masks, boxes or
    volume slices over images) as PNGs beside the checkpoints.

    The curves are the running training loss (mean over every ``every_n_steps`` steps), the
    training loss per epoch (this process' batches) and every ``val_*`` value logged per
    validation. They are part of the callback's state, saved in each checkpoint, so the curves of
    a resumed run start at its first epoch.
    """

    def __init__(self, every_n_steps: int = 10, dpi: int = 100) -> None:
        self.every_n_steps = every_n_steps
        self.dpi = dpi
        self.history: Dict[str, List[Tuple[int, float]]] = {}
        self._running = [0.0, 0]  # loss sum and count since the last running point
        self._epoch = [0.0, 0]  # loss sum and count of the epoch under way
        self.written: List[str] = []

    def _add(self, name: str, step: int, value: float) -> None:
        self.history.setdefault(name, []).append((int(step), float(value)))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs['loss'] if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        value = float(loss.detach())
        for acc in (self._running, self._epoch):
            acc[0] += value
            acc[1] += 1
        if trainer.global_step % self.every_n_steps == 0 and self._running[1]:
            self._add('train_loss_step', trainer.global_step, self._running[0] / self._running[1])
            self._running = [0.0, 0]

    def _close_epoch(self, trainer: pl.Trainer) -> None:
        if self._epoch[1]:
            self._add('train_loss', trainer.global_step, self._epoch[0] / self._epoch[1])
            self._epoch = [0.0, 0]

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != 'fit':
            return
        # a checkpoint may be written right after this hook: close the epoch's training loss first
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._close_epoch(trainer)
        for name, value in trainer.callback_metrics.items():
            if name.startswith('val_') and value.numel() == 1:
                self._add(name, trainer.global_step, value.item())

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_epoch(trainer)

    def state_dict(self) -> Dict[str, Any]:
        return {'history': self.history, 'running': self._running, 'epoch': self._epoch}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.history = {k: [tuple(p) for p in v] for k, v in state_dict['history'].items()}
        self._running = list(state_dict['running'])
        self._epoch = list(state_dict['epoch'])

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from .plots import plot_curves
        directory = run_directory(trainer)
        os.makedirs(directory, exist_ok=True)
        figures = {'curves': plot_curves(self.history, title=type(pl_module).__name__)}
        figures.update(pl_module.figures(trainer) if hasattr(pl_module, 'figures') else {})
        self.written = []
        for name, fig in figures.items():
            path = os.path.join(directory, f'{name}.png')
            fig.savefig(path, dpi=self.dpi)
            self.written.append(path)
        rank_zero_info(f'plots written: {", ".join(self.written)}')


class CheckpointOnStop(pl.Callback):
    """Keeps the run resumable where it stopped: ``ModelCheckpoint`` writes ``last.ckpt`` after
    validation only, so a run that ends at ``max_steps`` mid-epoch left it steps behind, and one
    interrupted (Ctrl-C, an error) left nothing of the steps since. At the end of training
    ``last.ckpt`` is brought up to the final step; on an exception the state is written to
    ``on_exception.ckpt`` beside it (``--ckpt_path`` takes it), ``last.ckpt`` left as it was."""

    def __init__(self) -> None:
        self._saved_step: Optional[int] = None

    def _dirpath(self, trainer: pl.Trainer) -> Optional[str]:
        callback = trainer.checkpoint_callback
        return getattr(callback, 'dirpath', None) if callback is not None else None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: Dict[str, Any]) -> None:
        # every save of the run passes here (ModelCheckpoint writes last.ckpt with each of its saves)
        self._saved_step = trainer.global_step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        directory = self._dirpath(trainer)
        if not directory or not trainer.checkpoint_callback.save_last or self._saved_step == trainer.global_step:
            return
        trainer.save_checkpoint(os.path.join(directory, 'last.ckpt'))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        directory = self._dirpath(trainer)
        if directory and trainer.state.fn == 'fit' and trainer.global_step > 0:
            path = os.path.join(directory, 'on_exception.ckpt')
            trainer.save_checkpoint(path)
            rank_zero_info(f'{type(exception).__name__}: the state at step {trainer.global_step} is in {path}')


class PredictionWriter(BasePredictionWriter):
    """Writes ``predict``'s outputs through the task's ``write_predictions`` (CSV for
    classification, label-map PNGs for segmentation, COCO results json for detection, NIfTI for
    volumes) into ``output_dir`` (default: ``<default_root_dir>/predictions``). Under DDP each
    process writes its shard (samples ``rank::world_size``) with a ``_rank<r>`` suffix."""

    def __init__(self, output_dir: Optional[str] = None) -> None:
        super().__init__(write_interval='epoch')
        self.output_dir = output_dir
        self.written: Optional[str] = None

    def write_on_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Sequence[Any],
                           batch_indices: Sequence[Any]) -> None:
        write = getattr(pl_module, 'write_predictions', None)
        if write is None or not predictions:
            return
        directory = self.output_dir or os.path.join(trainer.default_root_dir, 'predictions')
        os.makedirs(directory, exist_ok=True)
        name = 'predictions' if trainer.world_size == 1 else f'predictions_rank{trainer.global_rank}'
        dm = getattr(trainer, 'datamodule', None)
        self.written = write(list(predictions), os.path.join(directory, name),
                             dataset=getattr(dm, 'predict_dataset', None), first=trainer.global_rank,
                             step=trainer.world_size)
        print(f'predictions written: {self.written}')
