"""What every family file shares: model building with clear pretrained-weight errors, checkpoint
checks, input checks, intermediate-index selection and the timm model contract of the stage-based
families (``StagedBackbone``)."""
import os
import pickle
import re
import zipfile
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import (
    ClassifierHead,
    LayerNorm2d,
    NormMlpClassifierHead,
    SelectAdaptivePool2d,
    register_notrace_function,
    trunc_normal_,
)
from timm.models import build_model_with_cfg, checkpoint_seq, resolve_pretrained_cfg

__all__ = [
    'ChannelsLastStage', 'CheckpointMismatchError', 'CheckpointReadError', 'PretrainedWeightsNotFoundError',
    'StagedBackbone', 'TimmHeadBackbone',
    'build_backbone', 'check_input', 'check_state_dict', 'fill_out_norms', 'take_indices', 'unwrap_checkpoint',
]


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's tensors do not fit the model: the message names every key and shape that differs."""


class PretrainedWeightsNotFoundError(FileNotFoundError):
    """The published weights could not be found locally nor fetched."""


class CheckpointReadError(RuntimeError):
    """A checkpoint file exists but cannot be read: damaged, truncated or not a checkpoint."""


# it branches on the input's shape, which an FX proxy cannot answer: a leaf when traced; and its
# messages format shapes as TorchScript cannot: a Python call from scripted code
@register_notrace_function
@torch.jit.ignore
def check_input(x: torch.Tensor, in_chans: int, min_size: int, model_name: str) -> None:
    """Raise a ValueError stating expected and actual shapes unless x is (B, in_chans, H, W), H, W >= min_size."""
    if x.dim() != 4:
        raise ValueError(
            f'{model_name} expects an image batch of shape (B, {in_chans}, H, W), got a {x.dim()}-D tensor '
            f'of shape {tuple(x.shape)}')
    if x.shape[1] != in_chans:
        raise ValueError(
            f'{model_name} expects {in_chans} input channels, (B, {in_chans}, H, W), got shape {tuple(x.shape)}')
    if x.shape[2] < min_size or x.shape[3] < min_size:
        raise ValueError(
            f'{model_name} needs H and W of at least {min_size}, got shape {tuple(x.shape)}')


def take_indices(num_stages: int, indices: Optional[Union[int, Sequence[int]]]) -> Tuple[List[int], int]:
    """Stage indices to return and the last one needed.

    None takes all stages, an int n the last n, a sequence those indices (negative from the end).
    """
    if indices is None:
        indices = num_stages
    if isinstance(indices, int):
        if not 0 < indices <= num_stages:
            raise ValueError(f'cannot take the last {indices} of {num_stages} stages')
        taken = list(range(num_stages - indices, num_stages))
    else:
        taken = []
        for i in indices:
            j = num_stages + i if i < 0 else i
            if not 0 <= j < num_stages:
                raise ValueError(f'stage index {i} is out of range for {num_stages} stages')
            taken.append(j)
    return taken, max(taken)


def unwrap_checkpoint(checkpoint: Mapping[str, Any], keys: Iterable[str] = ('model', 'state_dict')) -> Dict[str, Any]:
    """The state dict inside a training checkpoint ({'model': sd}, {'state_dict': sd}) or the dict itself."""
    for key in keys:
        inner = checkpoint.get(key)
        if isinstance(inner, Mapping):
            return dict(inner)
    return dict(checkpoint)


def check_state_dict(
        state_dict: Mapping[str, torch.Tensor],
        model: nn.Module,
        source: str = 'checkpoint',
        ignore_shape: Iterable[str] = (),
        ignore_prefixes: Iterable[str] = (),
) -> None:
    """Raise CheckpointMismatchError naming the missing and unexpected keys and the differing shapes,
    and CheckpointReadError where a tensor holds NaN or infinity.

    ``ignore_shape`` are keys whose shape may differ (the first conv, adapted later to in_chans);
    keys under ``ignore_prefixes`` are skipped entirely (a classifier that is reset or removed).
    """
    prefixes = tuple(ignore_prefixes)
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    given = {k: v for k, v in state_dict.items() if not k.startswith(prefixes)}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    ignore_shape = set(ignore_shape)
    shapes = sorted(
        f'{k}: {source} {tuple(given[k].shape)} vs model {tuple(expected[k])}'
        for k in set(expected) & set(given)
        if k not in ignore_shape and tuple(given[k].shape) != tuple(expected[k]))
    # a file damaged inside a tensor's data loads without complaint: its values are the only sign
    damaged = sorted(k for k in set(expected) & set(given)
                     if given[k].is_floating_point() and not torch.isfinite(given[k]).all())
    if damaged:
        names = ', '.join(damaged[:5]) + (', ...' if len(damaged) > 5 else '')
        raise CheckpointReadError(f'{source} holds non-finite values in {len(damaged)} tensors ({names}): '
                                  'the file is damaged')
    if missing or unexpected or shapes:
        lines = [f'{source} does not fit {type(model).__name__}:']
        if missing:
            lines.append(f'  missing keys ({len(missing)}): ' + _first(missing, ', '))
        if unexpected:
            lines.append(f'  unexpected keys ({len(unexpected)}): ' + _first(unexpected, ', '))
        if shapes:
            lines.append(f'  shapes that differ ({len(shapes)}): ' + _first(shapes, '; '))
        raise CheckpointMismatchError('\n'.join(lines))


def _first(items: Sequence[str], sep: str, limit: int = 25) -> str:
    """The first ``limit`` items joined: a checkpoint of another architecture differs in every key,
    and a message of thousands of names helps no one."""
    more = f'{sep}... and {len(items) - limit} more' if len(items) > limit else ''
    return sep.join(items[:limit]) + more


def fill_out_norms(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Give a checkpoint without per-stage output norms those of ``model`` (in place).

    The dense settings of some families add a norm to every stage output (``out_norms``) that their
    ImageNet checkpoints do not have; as in the official dense code those norms start from their
    fresh init (weight one, bias zero) and the rest of the checkpoint loads strictly. A checkpoint
    that has some of them is left alone, so that ``check_state_dict`` names what is missing.
    """
    if getattr(model, 'out_norms', None) is not None and not any(k.startswith('out_norms.') for k in state_dict):
        state_dict.update({f'out_norms.{k}': v for k, v in model.out_norms.state_dict().items()})
    return state_dict


def _is_offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE) or os.environ.get('HF_HUB_OFFLINE', '0').upper() in ('1', 'ON', 'YES', 'TRUE')


def _read_error(e: Optional[BaseException]) -> Optional[BaseException]:
    """The checkpoint reader's complaint about a damaged file in ``e`` or what caused it, if any.

    The causes count: timm re-raises torch.load's UnpicklingError of a file that is no checkpoint at
    all as a RuntimeError that suggests ``weights_only=False``, advice that is wrong for a damaged
    file and unsafe for one of unknown origin."""
    while e is not None:
        if (isinstance(e, (pickle.UnpicklingError, EOFError, zipfile.BadZipFile))
                or type(e).__name__ == 'SafetensorError'):
            return e
        if isinstance(e, RuntimeError) and any(m in str(e) for m in ('PytorchStreamReader', 'invalid load key')):
            return e
        e = e.__cause__
    return None


def describe_read_error(e: BaseException) -> str:
    """``Type: what the reader found`` for a damaged file's error, without torch's advice to load
    with ``weights_only=False`` (which is for trusted files that hold other objects, not for damage)."""
    text = str(e)
    found = re.search(r'WeightsUnpickler error:\s*(.+?)\s*(?:Check the documentation|$)', text, re.S)
    detail = found.group(1) if found else text.strip().splitlines()[0] if text.strip() else ''
    return f'{type(e).__name__}: {detail[:200]}'


def _raise_if_damaged(e: BaseException, what: str, file_exists: bool) -> None:
    """Raise CheckpointReadError for ``e`` where it says the file named by ``what`` is damaged.
    torch reports a truncated zip as an OSError, which counts as damage where the file exists."""
    damaged = _read_error(e) or (e if file_exists and isinstance(e, OSError) else None)
    if damaged is not None:
        raise CheckpointReadError(f'{what} could not be read: corrupt, truncated or not a checkpoint '
                                  f'({describe_read_error(damaged)})') from e


def raise_read_failure(e: BaseException, what: str, hint: str) -> None:
    """Raise CheckpointReadError for ``e``, raised while reading the existing file named by ``what``
    (e.g. ``'checkpoint /x/y.pth'``), where the file holds other objects than tensors (``hint`` says
    how to load such a file when it is trusted) or is damaged; return for any other error, which
    the caller re-raises."""
    if 'Unsupported global' in str(e):
        raise CheckpointReadError(
            f'{what} holds objects other than tensors and plain values; if you trust it, load it with '
            f'torch.load(path, weights_only=False) and {hint}') from e
    _raise_if_damaged(e, what, file_exists=True)


def build_backbone(
        model_cls: Callable[..., nn.Module],
        variant: str,
        pretrained: bool,
        filter_fn: Callable,
        feature_cfg: Dict[str, Any],
        **kwargs,
) -> nn.Module:
    """timm's build_model_with_cfg, with errors that say which weights could not be had and why.

    ``output_stride`` (which timm's feature extraction and smp's encoders pass for dilated models) may
    only be 32: no family here trades its last downsamplings for dilation.
    """
    output_stride = kwargs.pop('output_stride', None)
    if output_stride not in (None, 32):
        raise ValueError(f'{variant} does not support dilated mode: output_stride must be 32, got {output_stride}')
    if pretrained:
        cfg = resolve_pretrained_cfg(
            variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
            pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
        if not (cfg.file or cfg.url or cfg.hf_hub_id or cfg.state_dict):
            # timm would warn and carry on with random weights; say where the published file is instead
            raise PretrainedWeightsNotFoundError(
                f'pretrained weights for {variant} cannot be downloaded: {" ".join(cfg.notes or ())}')
    try:
        return build_model_with_cfg(
            model_cls, variant, pretrained, pretrained_filter_fn=filter_fn, feature_cfg=feature_cfg, **kwargs)
    except (CheckpointMismatchError, PretrainedWeightsNotFoundError):
        raise
    except Exception as e:
        if not pretrained:
            raise
        cfg = resolve_pretrained_cfg(
            variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
            pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
        if cfg.file:
            source = f'pretrained weights for {variant}: local file {cfg.file}'
        elif cfg.hf_hub_id:
            file = cfg.hf_hub_filename or 'model.safetensors (or pytorch_model.bin)'
            source = f'pretrained weights for {variant}: {file} from Hugging Face repository {cfg.hf_hub_id!r}'
        else:
            source = f'pretrained weights for {variant}: URL {cfg.url}'
        # a file that is there but fails to load is damaged
        _raise_if_damaged(e, source, file_exists=bool(cfg.file) and os.path.isfile(cfg.file))
        if not isinstance(e, OSError):
            raise
        if cfg.file:
            reason = 'does not exist or cannot be opened'
        elif _is_offline():
            reason = ('is not in the local Hugging Face cache and this machine is offline (HF_HUB_OFFLINE=1); '
                      'fetch it once while online, or pass pretrained_cfg_overlay=dict(file=PATH)')
        else:
            reason = f'could not be fetched ({type(e).__name__}: {e})'
        raise PretrainedWeightsNotFoundError(f'{source} {reason}') from e


class ChannelsLastStage(nn.Module):
    """A stage whose blocks run channels-last: ``self.downsample`` on the NCHW map, ``self.blocks`` on
    ``(B, H, W, C)`` tokens, and an NCHW view of their result handed on. Subclasses build both
    modules and the ``grad_checkpointing`` flag."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x).permute(0, 2, 3, 1)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x.permute(0, 3, 1, 2)


# timm's head modules pool, drop and classify in one module and keep the classifier as ``.fc``
_TIMM_HEADS = (ClassifierHead, NormMlpClassifierHead)


class StagedBackbone(nn.Module):
    """The timm model contract shared by the stage-based families.

    A subclass is a stem, ``self.stages`` (an ``nn.Sequential`` of stages, each NCHW in and out and
    each with a ``grad_checkpointing`` flag for the blocks inside it), an optional final norm and a
    classifier head. Its ``__init__`` builds every module itself, so that module names and
    state_dict order stay the family's own, and sets ``in_chans`` and ``num_classes``; this class
    builds nothing. What differs between families a subclass states with these class attributes
    and hooks:

    * ``family_name``: the family's name in error messages (``'Agent-PVT'``);
    * ``_stem(x)``: ``self.stem`` here; a family whose stem is ``self.patch_embed``, or which has
      none, overrides it;
    * ``has_final_norm`` and ``_final_norm(x)``: a family with a final norm after the last stage
      keeps it in ``self.norm`` as a module of NCHW maps and sets ``has_final_norm`` (so that
      ``prune_norm`` replaces it by the identity); ``_final_norm`` applies it, or nothing;
    * ``_head_features(x)``: the map ``forward_features`` returns and the head pools, here the last
      stage's output after the final norm;
    * ``checkpoint_stage_sequence``: whether grad checkpointing also runs ``checkpoint_seq`` over
      the stage sequence as a whole (under the model's own ``grad_checkpointing`` flag), not only
      over the blocks inside each stage;
    * ``out_norms``: a family whose official dense code normalises every stage output (NAT/DiNAT,
      DaViT, LITv2, Agent-Swin: their ``norm0..norm3``) keeps them in ``self.out_norms``, built by
      ``_make_out_norms`` when its ``out_norms`` constructor argument is set (None otherwise);
      ``forward_intermediates`` then returns each stage's output through its norm (and ``norm``
      has no further effect). The classification forward never uses them.

    The head is ``self.global_pool`` and a bare classifier ``self.head`` on ``num_features``
    channels, with dropout at ``self.drop_rate`` between them; or, in a ``TimmHeadBackbone``, one
    of timm's head modules (``ClassifierHead`` or ``NormMlpClassifierHead``: pooling, dropout and
    the classifier ``.fc`` in one).
    """

    family_name: str
    min_input_size: int
    has_final_norm: bool = False
    checkpoint_stage_sequence: bool = False
    # class attributes TorchScript reads as constants (it sees only an instance's own attributes)
    __constants__ = ['has_final_norm', 'checkpoint_stage_sequence']

    def _make_out_norms(self, dims: Sequence[int]) -> nn.ModuleList:
        """One LayerNorm per stage output (``nn.LayerNorm``'s eps, as the official dense code), NCHW."""
        return nn.ModuleList([LayerNorm2d(d, eps=1e-5) for d in dims])

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """Truncated-normal linear weights (std .02) and zero biases; other layers keep PyTorch's init."""
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return set()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if self.checkpoint_stage_sequence:
            self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc if isinstance(self.head, _TIMM_HEADS) else self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if isinstance(self.head, _TIMM_HEADS):
            self.head.reset(num_classes, global_pool)
            return
        self._make_pooled_head(num_classes, self.global_pool.pool_type if global_pool is None else global_pool)

    def _make_pooled_head(self, num_classes: int, global_pool: str,
                          classifier: Callable[[int, int], nn.Module] = nn.Linear) -> None:
        """``self.global_pool`` and the bare ``self.head`` after it: ``classifier(in, num_classes)`` on
        ``num_features`` channels per pooled statistic (two for 'catavgmax'), or the identity."""
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        width = self.num_features * self.global_pool.feat_mult()
        self.head = classifier(width, num_classes) if num_classes > 0 else nn.Identity()

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        """The image ``(B, in_chans, H, W)`` to the first stage's NCHW input."""
        return self.stem(x)

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm of the last stage's NCHW output, where the family has one."""
        return self.norm(x) if self.has_final_norm else x

    def _head_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's NCHW output to the NCHW map ``forward_features`` returns and the head pools."""
        return self._final_norm(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (NCHW) for ``indices`` (None: all, int n: last n, list: those), and unless
        ``intermediates_only`` the final features (the map ``forward_features`` returns) too. ``norm``
        applies the final norm to the last stage's intermediate when it is taken; without a final
        norm it has no effect. A model built with per-stage output norms (``out_norms``) returns
        every intermediate through its stage's norm.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"{self.family_name} intermediates are NCHW, output_fmt {output_fmt!r} is not supported")
        check_input(x, self.in_chans, self.min_input_size, type(self).__name__)
        taken, max_index = take_indices(len(self.stages), indices)
        stages = self.stages[:max_index + 1] if stop_early else self.stages
        last = len(self.stages) - 1
        out_norms = getattr(self, 'out_norms', None)
        intermediates = []
        x = self._stem(x)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in taken:
                if out_norms is not None:
                    intermediates.append(out_norms[i](x))
                else:
                    intermediates.append(self._final_norm(x) if norm and i == last else x)
        if intermediates_only:
            return intermediates
        return self._head_features(x), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last index needed, the final norm (where there is one) if
        ``prune_norm``, and the classifier unless ``prune_head=False``. Output norms of stages that
        are not taken become the identity: the official dense code builds only those of its
        ``out_indices``."""
        taken, max_index = take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if getattr(self, 'out_norms', None) is not None:
            self.out_norms = nn.ModuleList([n if i in taken else nn.Identity() for i, n in enumerate(self.out_norms)])
        if prune_norm and self.has_final_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return taken

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``(B, in_chans, H, W)`` to the NCHW map the head pools."""
        # TorchScript compiles neither block under `not is_scripting()`: the input checks name the
        # model's class, which it cannot read, and it cannot checkpoint
        if not torch.jit.is_scripting():
            check_input(x, self.in_chans, self.min_input_size, type(self).__name__)
        x = self._stem(x)
        if not torch.jit.is_scripting():
            if self.checkpoint_stage_sequence and self.grad_checkpointing:
                return self._head_features(checkpoint_seq(self.stages, x))
        return self._head_features(self.stages(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The NCHW map ``forward_features`` returns to logits, or with ``pre_logits`` to the pooled
        features the classifier takes."""
        x = self.global_pool(x)
        x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class TimmHeadBackbone(StagedBackbone):
    """A ``StagedBackbone`` whose ``self.head`` is one of timm's head modules (pooling, dropout and
    the classifier in one). Its own class, not a test of the head's type in ``forward_head``: the
    other kind's call would not compile under TorchScript, which compiles both branches of a test
    it cannot decide (an isinstance of a module class it has not compiled)."""

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)
