#!/usr/bin/env python3
"""The authors' models as ``scripts/benchmark.py --peer-factory`` peers, their code kept outside the repo.

First copy the authors' model files out of fetched snapshots of their repositories (bare git
directories, as the `fetch` tool writes them) into an ignored folder:

    python benchmarks/probes/authors_peers.py --mirrors /work/.mirror --out .gpu/authors

then, with that folder next to this file's functions on the path:

    python scripts/benchmark.py --amp --channels-last --peer-path benchmarks/probes .gpu/authors \\
        --models az_van_b2 --peer-factory authors_peers:van_b2 --pairs az_van_b2=van_b2

Every factory builds the published configuration with drop path 0 (timm's default for ours).
Two stand-ins: LITv2's compiled DCN is torchvision's ``deform_conv2d`` in float32 (what
torchvision's CUDA autocast rule runs it in), and STViT's ``fvcore`` import (FLOP printing only) is
an empty module.
"""
import argparse
import importlib.util
import subprocess
import sys
import types
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
import torchvision
from torch.nn.modules.utils import _pair

# repository (as fetched: owner+name) -> its model files, copied to the same relative paths
SOURCES: Dict[str, Tuple[str, List[str]]] = {
    'van': ('Visual-Attention-Network+VAN-Classification', ['models/van.py']),
    'litv2': ('ziplab+LITv2', [f'classification/models/{f}.py'
                               for f in ('litv2', 'attentions', 'blocks', 'layers', 'patch_embed')]),
    'stvit': ('hhb072+STViT', ['models/stvit.py']),
    'agent': ('LeapLabTHU+Agent-Attention', [f'agent_transformer/models/{f}.py'
                                             for f in ('agent_swin', 'agent_pvt', 'agent_deit', 'deit')]),
}


def _authors_dir() -> Path:
    """The folder the files were copied to: the entry of sys.path holding ``van/models/van.py``."""
    for entry in sys.path:
        if (Path(entry) / 'van' / 'models' / 'van.py').is_file():
            return Path(entry)
    raise FileNotFoundError('the authors\' files are not on sys.path: copy them with '
                            '`authors_peers.py --mirrors ... --out DIR` and pass DIR to --peer-path')


def _load(name: str, relative: str) -> ModuleType:
    """Import one file by path under a name of its own (the repositories reuse module names)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _authors_dir() / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class _DeformConv2dPack(nn.Module):
    """mmcv's ``DeformConv2dPack`` names and computation over torchvision's op, for LITv2's DTM."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 deformable_groups=1, im2col_step=64, bias=True, lr_mult=0.1):
        super().__init__()
        k = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        conv = nn.Conv2d(in_channels, out_channels, k)
        self.weight, self.bias = conv.weight, conv.bias
        self.conv_offset = nn.Conv2d(in_channels, deformable_groups * 2 * k[0] * k[1], k, stride, padding)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset = self.conv_offset(x)
        with torch.autocast(x.device.type, enabled=False):
            return torchvision.ops.deform_conv2d(x.float(), offset.float(), self.weight, self.bias,
                                                 self.stride, self.padding, self.dilation)


def _stub(name: str, **attrs) -> None:
    module = sys.modules.setdefault(name, types.ModuleType(name))
    for key, value in attrs.items():
        setattr(module, key, value)


def van_b0() -> nn.Module:
    return _load('authors_van', 'van/models/van.py').van_b0()


def van_b2() -> nn.Module:
    return _load('authors_van', 'van/models/van.py').van_b2()


def _litv2(depths: List[int]) -> nn.Module:
    for name in ('mm_modules', 'mm_modules.DCN', 'mm_modules.DCN.modules'):
        _stub(name)
    _stub('mm_modules.DCN.modules.deform_conv2d', DeformConv2dPack=_DeformConv2dPack)
    # its files import each other as the package `models`
    sys.path.insert(0, str(_authors_dir() / 'litv2' / 'classification'))
    try:
        from models.litv2 import LITv2
    finally:
        sys.path.pop(0)
    # classification/configs/litv2-{small,medium}.yaml over config.py's defaults
    return LITv2(img_size=224, patch_size=4, in_chans=3, num_classes=1000, embed_dim=96, depths=depths,
                 num_heads=[3, 6, 12, 24], mlp_ratio=4., qkv_bias=True, qk_scale=None, drop_rate=0.,
                 drop_path_rate=0., ape=False, patch_norm=True, use_checkpoint=False, alpha=0.9,
                 local_ws=[0, 0, 2, 1])


def litv2_s() -> nn.Module:
    return _litv2([2, 2, 6, 2])


def litv2_m() -> nn.Module:
    return _litv2([2, 2, 18, 2])


def _stvit() -> ModuleType:
    _stub('fvcore.nn', FlopCountAnalysis=None, flop_count_table=None)
    _stub('fvcore', nn=sys.modules['fvcore.nn'])
    return _load('authors_stvit', 'stvit/models/stvit.py')


def stvit_s() -> nn.Module:
    return _stvit().stvit_small(SimpleNamespace(drop=0., drop_path=0.))


def stvit_b() -> nn.Module:
    return _stvit().stvit_base(SimpleNamespace(drop=0., drop_path=0.))


def _agent_swin(depths: List[int], attn_type: str) -> nn.Module:
    # agent_transformer/cfgs/agent_swin_{t,s}.yaml over config.py's defaults
    module = _load('authors_agent_swin', 'agent/agent_transformer/models/agent_swin.py')
    return module.AgentSwinTransformer(
        img_size=224, patch_size=4, in_chans=3, num_classes=1000, embed_dim=96, depths=depths,
        num_heads=[3, 6, 12, 24], window_size=56, mlp_ratio=4., qkv_bias=True, qk_scale=None, drop_rate=0.,
        drop_path_rate=0., ape=False, patch_norm=True, use_checkpoint=False, agent_num=['9', '16', '49', '49'],
        attn_type=attn_type)


def agent_swin_t() -> nn.Module:
    return _agent_swin([2, 2, 6, 2], 'AAAB')


def agent_swin_s() -> nn.Module:
    return _agent_swin([2, 2, 18, 2], 'AABB')


def _agent_pvt(name: str) -> nn.Module:
    module = _load('authors_agent_pvt', 'agent/agent_transformer/models/agent_pvt.py')
    return getattr(module, name)(img_size=224, drop_path_rate=0., agent_num=['9', '16', '49', '49'],
                                 attn_type='AAAA', agent_sr_ratios='1111')


def agent_pvt_t() -> nn.Module:
    return _agent_pvt('agent_pvt_tiny')


def agent_pvt_s() -> nn.Module:
    return _agent_pvt('agent_pvt_small')


def _agent_deit() -> ModuleType:
    """agent_deit.py, imported inside a package of its own (it imports ``.deit``), with timm's
    ``register_model`` a no-op meanwhile: deit.py's registrations would replace timm's own
    ``deit_*`` entries."""
    import timm.models.registry as registry
    package = types.ModuleType('authors_agent_models')
    package.__path__ = [str(_authors_dir() / 'agent' / 'agent_transformer' / 'models')]
    sys.modules.setdefault('authors_agent_models', package)
    register = registry.register_model
    registry.register_model = lambda fn: fn
    try:
        return importlib.import_module('authors_agent_models.agent_deit')
    finally:
        registry.register_model = register


def _agent_deit_model(embed_dim: int, num_heads: int) -> nn.Module:
    # agent_transformer/cfgs/agent_deit_{t,s}.yaml (agents 49-49-49-49) with agent_deit_{tiny,small}'s
    # sizes; the class itself, since its timm-0.4 builder's arguments are gone from timm 1.0
    return _agent_deit().VisionTransformer(img_size=224, patch_size=16, embed_dim=embed_dim, depth=12,
                                           num_heads=num_heads, drop_path_rate=0., agent_num=['49'] * 4)


def agent_deit_t() -> nn.Module:
    return _agent_deit_model(192, 3)


def agent_deit_s() -> nn.Module:
    return _agent_deit_model(384, 6)


def copy_sources(mirrors: Path, out: Path) -> None:
    """Copy each repository's model files from its snapshot's HEAD, printing the commit of each."""
    for key, (repo, files) in SOURCES.items():
        git_dir = mirrors / repo / 'repo'
        commit = subprocess.run(['git', '-C', str(git_dir), 'rev-parse', '--short', 'HEAD'],
                                check=True, capture_output=True, text=True).stdout.strip()
        for relative in files:
            text = subprocess.run(['git', '-C', str(git_dir), 'show', f'HEAD:{relative}'],
                                  check=True, capture_output=True, text=True).stdout
            target = out / key / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        print(f'{key}: {repo.replace("+", "/")} at {commit}')


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--mirrors', type=Path, required=True, help='folder of the fetched snapshots')
    parser.add_argument('--out', type=Path, required=True, help='folder to copy the model files to')
    args = parser.parse_args()
    copy_sources(args.mirrors, args.out)
