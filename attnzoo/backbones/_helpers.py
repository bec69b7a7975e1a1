"""What every family file shares: model building with clear pretrained-weight errors, checkpoint
checks, input checks and intermediate-index selection."""
import os
import pickle
import zipfile
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, resolve_pretrained_cfg

__all__ = [
    'CheckpointMismatchError', 'CheckpointReadError', 'PretrainedWeightsNotFoundError', 'build_backbone', 'check_input',
    'check_state_dict', 'take_indices', 'unwrap_checkpoint',
]


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's tensors do not fit the model: the message names every key and shape that differs."""


class PretrainedWeightsNotFoundError(FileNotFoundError):
    """The published weights could not be found locally nor fetched."""


class CheckpointReadError(RuntimeError):
    """A checkpoint file exists but cannot be read: damaged, truncated or not a checkpoint."""


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
    """Raise CheckpointMismatchError naming the missing and unexpected keys and the differing shapes.

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
    if missing or unexpected or shapes:
        lines = [f'{source} does not fit {type(model).__name__}:']
        if missing:
            lines.append(f'  missing keys ({len(missing)}): ' + ', '.join(missing))
        if unexpected:
            lines.append(f'  unexpected keys ({len(unexpected)}): ' + ', '.join(unexpected))
        if shapes:
            lines.append(f'  shapes that differ ({len(shapes)}): ' + '; '.join(shapes))
        raise CheckpointMismatchError('\n'.join(lines))


def _is_offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE) or os.environ.get('HF_HUB_OFFLINE', '0').upper() in ('1', 'ON', 'YES', 'TRUE')


def _is_read_error(e: Exception) -> bool:
    """Whether an exception is a checkpoint reader's complaint about a damaged file."""
    if isinstance(e, (pickle.UnpicklingError, EOFError, zipfile.BadZipFile)) or type(e).__name__ == 'SafetensorError':
        return True
    return isinstance(e, RuntimeError) and any(s in str(e) for s in ('PytorchStreamReader', 'invalid load key'))


def build_backbone(
        model_cls: Callable[..., nn.Module],
        variant: str,
        pretrained: bool,
        filter_fn: Callable,
        feature_cfg: Dict[str, Any],
        **kwargs,
) -> nn.Module:
    """timm's build_model_with_cfg, with errors that say which weights could not be had and why."""
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
        # a file that is there but fails to load is damaged; torch reports a truncated zip as an OSError
        if _is_read_error(e) or (cfg.file and os.path.isfile(cfg.file) and isinstance(e, OSError)):
            raise CheckpointReadError(
                f'{source} could not be read: corrupt, truncated or not a checkpoint ({type(e).__name__}: {e})') from e
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
