"""What several probes share: models and steps as ``scripts/benchmark.py`` builds them, interleaved
timing by its ``time_iterations``, the names of the modules whose forward is running, and a
``torch.nn.functional`` whose SDPA is swapped.

Import it after the probe has made ``attnzoo`` importable (an uninstalled checkout: the repository
root on ``sys.path``); it puts ``scripts/`` there itself.
"""
import argparse
import contextlib
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / 'scripts'))
from benchmark import (  # noqa: E402,F401  (COMPILE_MODES, begin_compiled_step, compile_in_mode, load_peer_factory, to_channels_last: re-exported)
    COMPILE_MODES,
    Job,
    ModelBenchmark,
    PeerFactory,
    begin_compiled_step,
    compile_in_mode,
    load_peer_factory,
    time_iterations,
    to_channels_last,
)


def model_bench(source: Union[str, PeerFactory], device: torch.device, infer_batch: int = 256,
                train_batch: int = 128, compiled: bool = False) -> ModelBenchmark:
    """A timm name or a peer factory as the benchmark runs it with ``--amp --channels-last``: its
    ``.model`` (on ``device``, laid out), ``.inference_step()`` and ``.train_step()``."""
    args = argparse.Namespace(img_size=None, channels_last=True, amp=True, batch_size=infer_batch,
                              train_batch_size=train_batch, warmup=0, iters=0, compile_mode='default')
    if isinstance(source, PeerFactory):
        return ModelBenchmark(Job(source.label, 'peer', compiled, source), args, device)
    return ModelBenchmark(Job(source, 'model', compiled), args, device)


def interleaved_ms(runs: Dict[str, Tuple[Callable[[], None], Callable[[], None]]], rounds: int, steps: int,
                   device: torch.device, warmup: int = 3) -> Dict[str, float]:
    """Median milliseconds per step of each run, given as (setup, step): each run is set up and
    warmed up, then every round sets up each run in turn and times ``steps`` of its steps, so that
    drift of the machine falls on all runs alike."""
    for setup, step in runs.values():
        setup()
        time_iterations(step, warmup, 0, device)
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (setup, step) in runs.items():
            setup()
            times[name] += time_iterations(step, 0, steps, device)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


@contextlib.contextmanager
def module_stack(model: nn.Module) -> Iterator[List[str]]:
    """While open, the list holds the names of the modules whose forward is running, innermost last
    (``''`` for ``model`` itself); empty outside a forward, e.g. in the backward."""
    stack: List[str] = []

    def enter(name: str) -> Callable:
        def hook(module, inputs) -> None:
            stack.append(name)
        return hook

    def leave(module, inputs, output) -> None:  # returns None: a hook's result would replace the output
        stack.pop()

    handles = []
    for name, module in model.named_modules():
        handles += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]
    try:
        yield stack
    finally:
        for handle in handles:
            handle.remove()


class SdpaShim:
    """``torch.nn.functional`` with ``scaled_dot_product_attention`` replaced by ``sdpa`` (and its calls
    counted): set as a module's ``F`` to swap the attention of that module's ops or blocks."""

    def __init__(self, sdpa: Callable = F.scaled_dot_product_attention):
        self.sdpa, self.calls = sdpa, 0

    def __getattr__(self, name: str):
        return getattr(F, name)

    def scaled_dot_product_attention(self, *args, **kwargs):
        self.calls += 1
        return self.sdpa(*args, **kwargs)
