"""Cheap measurements of a model: parameters, multiply-adds and CPU latency."""
import time
from typing import Tuple

import timm
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['count_params', 'count_gmacs', 'measure_latency']


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_gmacs(name: str, input_size: Tuple[int, int, int], **kwargs) -> float:
    """Giga multiply-adds of one forward pass of ``name`` on one image of ``input_size`` (C, H, W).

    Papers call this "GFLOPs". Counted by ``torch.utils.flop_counter`` (which counts a multiply-add
    as two flops, hence the halving) on the meta device, so even huge models cost no compute.
    """
    with torch.device('meta'):
        model = timm.create_model(name, **kwargs).eval()
        x = torch.empty(1, *input_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 2e9


@torch.inference_mode()
def measure_latency(model: nn.Module, input_size: Tuple[int, int, int], warmup: int = 1, iters: int = 3) -> float:
    """Median seconds of one batch-1 forward pass on the CPU."""
    model = model.eval()
    x = torch.randn(1, *input_size)
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
