"""The Hugging Face Hub: save and push zoo models with a model card, load them back, offline too.

A classifier (any timm model, ``az_*`` included) is saved by timm's own ``save_for_hf``: a
``config.json`` naming the architecture and its constructor arguments, and ``model.safetensors``.
``timm.create_model('hf-hub:ORG/NAME', pretrained=True)`` and ``'local-dir:PATH'`` load it, the
architecture registered by ``import attnzoo``. A task model (segmentation, detection, medical)
has no timm entry point: its ``config.json`` holds ``model.attnzoo_cfg``, the arguments that
rebuild it (``attnzoo.zoo.create_task_model``), beside the same ``model.safetensors``.
``from_pretrained`` loads either kind from a Hub repository, its local cache or a folder.

Every saved folder carries a ``README.md`` model card (huggingface_hub's ``ModelCard``): paper,
license, parameter count, GMACs, and the evaluation results of the eval scripts' output files
as the card's ``model-index``.
"""
import csv
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, hf_hub_download
from safetensors.torch import load_file, save_file
from timm.models import get_pretrained_cfg, parse_model_name, save_for_hf
from torch.utils.flop_counter import FlopCounterMode

from attnzoo.backbones import CheckpointReadError, PretrainedWeightsNotFoundError
from attnzoo.backbones._helpers import _is_offline, check_state_dict

from .tasks import create_task_model

__all__ = ['eval_results_from', 'from_pretrained', 'make_model_card', 'push_to_hub', 'save_pretrained']

_logger = logging.getLogger(__name__)

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'model.safetensors'
MetricsSource = Union[str, Path, Mapping[str, Any]]

# per task: the Hub pipeline tag, the card's task name and the default (dataset id, dataset name, split)
_TASKS = {
    'classification': ('image-classification', 'Image Classification', ('imagenet-1k', 'ImageNet-1k', 'validation')),
    'detection': ('object-detection', 'Object Detection', ('detection-datasets/coco', 'COCO', 'val2017')),
    'segmentation': ('image-segmentation', 'Semantic Segmentation', ('scene_parse_150', 'ADE20K', 'validation')),
    'medical': ('image-segmentation', 'Medical Image Segmentation', (None, None, None)),
}
# torchmetrics' COCO names shown on the card, with the label papers use
_COCO_METRICS = (('map', 'AP'), ('map_50', 'AP50'), ('map_75', 'AP75'),
                 ('map_small', 'APs'), ('map_medium', 'APm'), ('map_large', 'APl'))


def _task_of(model: nn.Module) -> str:
    cfg = getattr(model, 'attnzoo_cfg', None)
    return cfg['task'] if cfg else 'classification'


# ---------------------------------------------------------------------------------------------
# evaluation results for the card


def _read_metrics(source: MetricsSource) -> Any:
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f'metrics file {path} does not exist')
    if path.suffix == '.csv':
        with path.open(newline='') as f:
            return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]
    with path.open() as f:
        return json.load(f)


def _number(text: str) -> Any:
    try:
        return float(text)
    except (TypeError, ValueError):
        return text


def eval_results_from(
        metrics: Union[MetricsSource, Sequence[MetricsSource]],
        model_names: Sequence[str] = (),
        dataset: Optional[Tuple[Optional[str], Optional[str], Optional[str]]] = None,
) -> List[EvalResult]:
    """The card's evaluation results from the eval scripts' outputs (files or the dicts they hold).

    Recognised by their keys: ``scripts/eval_imagenet.py``'s results (validate.py's columns, a row,
    a list of rows or a csv: the only row, or the one whose model is one of ``model_names``, pretrained
    tag aside), ``scripts/eval_coco.py``'s
    ``--out`` (torchmetrics' names, flat with ``iou_type`` or under ``bbox``/``segm``; AP shown in
    percent) and ``scripts/eval_segmentation.py``'s ``--out`` (mmseg's ``mIoU``, ``mAcc``, ``aAcc``).
    ``dataset`` is (Hub dataset id, name, split); each task has a default (ImageNet-1k, COCO, ADE20K),
    and a results file may name its own under ``dataset``.
    """
    sources = [metrics] if isinstance(metrics, (str, Path, Mapping)) else list(metrics)
    results: List[EvalResult] = []
    for source in sources:
        data = _read_metrics(source)
        if isinstance(data, list) or 'top1' in data:
            results += _classification_results(data, model_names, dataset, source)
        elif {'bbox', 'segm'} & set(data) or 'map' in data:
            results += _detection_results(data, dataset)
        elif 'mIoU' in data:
            results += _segmentation_results(data, dataset)
        else:
            raise ValueError(
                f'metrics {source} are none of the eval scripts\' outputs (no top1, map/bbox/segm or mIoU entry)')
    return results


def _dataset(task: str, data: Mapping[str, Any], dataset) -> Tuple[str, str, Optional[str]]:
    own = data.get('dataset') if isinstance(data, Mapping) else None
    ds_id, ds_name, split = dataset or (own and (own.get('id'), own.get('name'), own.get('split'))) or _TASKS[task][2]
    if not ds_id:
        raise ValueError(f'name the dataset of these {task} metrics: dataset=(hub_id, name, split)')
    return ds_id, ds_name or ds_id, split


def _result(task: str, ds, metric_type: str, name: str, value: float, task_name: Optional[str] = None) -> EvalResult:
    return EvalResult(
        task_type=_TASKS[task][0], task_name=task_name or _TASKS[task][1], dataset_type=ds[0], dataset_name=ds[1],
        dataset_split=ds[2], metric_type=metric_type, metric_name=name, metric_value=round(float(value), 4))


def _classification_results(data, model_names, dataset, source) -> List[EvalResult]:
    rows = data if isinstance(data, list) else [data]
    # by name, a single named row too: another model's results must not reach this model's card;
    # one row without a name is the caller's word that it is this model's
    names = {n.split('.')[0] for n in model_names if n}
    wanted = [r for r in rows
              if str(r.get('model', '')).split('.')[0] in names or (len(rows) == 1 and 'model' not in r)]
    if len(wanted) != 1:
        raise ValueError(
            f'{source} holds {len(rows)} result rows, {len(wanted)} of them named {" or ".join(sorted(names))}; '
            'give the results of this model alone')
    row = wanted[0]
    ds = _dataset('classification', row, dataset)
    return [_result('classification', ds, 'accuracy', 'Top-1 accuracy', row['top1']),
            _result('classification', ds, 'top_5_accuracy', 'Top-5 accuracy', row['top5'])]


def _detection_results(data, dataset) -> List[EvalResult]:
    per_type = {k: data[k] for k in ('bbox', 'segm') if k in data} or {data.get('iou_type', 'bbox'): data}
    ds = _dataset('detection', data, dataset)
    results = []
    for iou_type, values in per_type.items():
        prefix, task_name = ('box', 'Object Detection') if iou_type == 'bbox' else ('mask', 'Instance Segmentation')
        for key, label in _COCO_METRICS:
            if values.get(key) is not None and values[key] >= 0:  # COCOeval's -1: no such objects
                results.append(_result('detection', ds, f'{prefix}_{key}', f'{prefix} {label}', 100 * values[key],
                                       task_name))
    return results


def _segmentation_results(data, dataset) -> List[EvalResult]:
    ds = _dataset('segmentation', data, dataset)
    names = (('mIoU', 'mean_iou', 'mIoU'), ('mAcc', 'mean_accuracy', 'mAcc'), ('aAcc', 'overall_accuracy', 'aAcc'))
    return [_result('segmentation', ds, t, n, data[k]) for k, t, n in names if data.get(k) is not None]


# ---------------------------------------------------------------------------------------------
# the model card


def _paper_facts(model: nn.Module) -> Dict[str, Any]:
    """License, paper and origin of the model (a task model: of its backbone)."""
    cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
    task_cfg = getattr(model, 'attnzoo_cfg', None)
    if task_cfg and task_cfg.get('backbone'):
        backbone = parse_model_name(task_cfg['backbone'])[1]
        cfg = (get_pretrained_cfg(backbone) or get_pretrained_cfg(backbone.split('.')[0]))
        cfg = cfg.to_dict() if cfg is not None else {}
    return {k: cfg.get(k) for k in ('license', 'paper_ids', 'paper_name', 'origin_url', 'architecture')}


def _default_input_size(model: nn.Module) -> Tuple[int, ...]:
    task_cfg = getattr(model, 'attnzoo_cfg', None)
    if task_cfg:
        chans = task_cfg.get('in_chans', 3)
        if task_cfg['task'] == 'detection':
            # the detector resizes its input to these bounds (torchvision's 800, 1333: the COCO test size
            # the papers quote their GFLOPs at)
            return (chans, task_cfg.get('min_size', 800), task_cfg.get('max_size', 1333))
        if task_cfg['task'] == 'medical' and task_cfg.get('spatial_dims') == 3:
            return (chans, 96, 96, 96)
        return (chans, 512, 512)
    return tuple(getattr(model, 'pretrained_cfg', {}).get('input_size') or (3, 224, 224))


def _count_gmacs(model: nn.Module, input_size: Sequence[int]) -> Optional[float]:
    """Giga multiply-adds of one forward pass on one input (the papers' "GFLOPs"), on a copy of the
    model rebuilt on the meta device, so nothing is computed; None where the model cannot run there.

    A detector is counted through its backbone and FPN only: its post-processing (score filtering,
    NMS) has data-dependent shapes that the meta device cannot follow (``_gmacs_scope`` says so).
    """
    try:
        with torch.device('meta'):
            if getattr(model, 'attnzoo_cfg', None):
                twin = create_task_model(model.attnzoo_cfg)
            else:
                twin = timm.create_model(model.pretrained_cfg['architecture'], **timm.models.get_model_args(model))
            x = torch.empty(1, *input_size)
        if _task_of(model) == 'detection':
            twin = twin.backbone
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            twin.eval()(x)
        return counter.get_total_flops() / 2e9
    except Exception as e:  # a meta kernel missing in some op: the card goes without the figure
        _logger.warning(f'GMACs not counted ({type(e).__name__}: {e}); pass gmacs= to state them')
        return None


def _gmacs_scope(task: str) -> str:
    return 'backbone and FPN, ' if task == 'detection' else ''


def make_model_card(
        model: nn.Module,
        name: str,
        *,
        repo_id: Optional[str] = None,
        metrics: Optional[Union[MetricsSource, Sequence[MetricsSource]]] = None,
        dataset: Optional[Tuple[Optional[str], Optional[str], Optional[str]]] = None,
        license: Optional[str] = None,
        description: Optional[str] = None,
        gmacs: Optional[float] = None,
        input_size: Optional[Sequence[int]] = None,
        tags: Sequence[str] = (),
) -> ModelCard:
    """The model card of ``model``, published as ``name`` (``repo_id`` when pushed).

    Carries the paper (title and arXiv link), license, parameter count, GMACs at ``input_size``
    (counted unless ``gmacs`` is given) and, from ``metrics`` (see ``eval_results_from``), the
    evaluation results both as the card's ``model-index`` and as a table.
    """
    task = _task_of(model)
    facts = _paper_facts(model)
    input_size = tuple(input_size or _default_input_size(model))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    if gmacs is None:
        gmacs = _count_gmacs(model, input_size)
    eval_results = eval_results_from(metrics, [name, facts['architecture'] or ''], dataset) if metrics else None
    license = (license or facts['license'] or 'unknown').lower()
    loader = ('timm' if task == 'classification' else 'attnzoo')
    card_data = ModelCardData(
        library_name=loader, license=license, pipeline_tag=_TASKS[task][0],
        tags=list(dict.fromkeys([_TASKS[task][0], 'attnzoo', *(['timm'] if loader == 'timm' else []), *tags])),
        model_name=name if eval_results else None, eval_results=eval_results,
        datasets=sorted({r.dataset_type for r in eval_results}) if eval_results else None)

    where = f'hf-hub:{repo_id}' if repo_id else 'local-dir:PATH'
    lines = [f'# {name}', '']
    lines += [description or _describe(model, task, facts), '']
    lines += ['## Model details', '']
    if task == 'classification':
        arch = facts['architecture'] or type(model).__name__
    else:
        arch = model.attnzoo_cfg['arch'] + _backbone_phrase(model.attnzoo_cfg)
    lines.append(f'- **Architecture:** {arch}')
    lines.append(f'- **Task:** {_TASKS[task][1]}')
    lines.append(f'- **Parameters (M):** {params:.2f}')
    size = 'x'.join(str(s) for s in input_size)
    if gmacs is not None:
        lines.append(f'- **GMACs:** {gmacs:.2f} at {size} ({_gmacs_scope(task)}multiply-adds, what the papers call '
                     'GFLOPs)')
    else:
        lines.append(f'- **GMACs:** not counted at {size}')
    if facts['paper_name'] or facts['paper_ids']:
        lines.append(f'- **Paper:** {_paper_link(facts)}')
    lines.append(f'- **License:** {license}')
    if facts['origin_url']:
        lines.append(f'- **Original code:** {facts["origin_url"]}')
    lines += ['', '## Usage', '', '```python', 'import attnzoo']
    if task == 'classification':
        lines += ['import timm', '', f"model = timm.create_model('{where}', pretrained=True).eval()"]
    else:
        lines += ['', f"model = attnzoo.zoo.from_pretrained('{where}').eval()"]
    lines += ['```', '']
    if eval_results:
        lines += ['## Evaluation', '', '| dataset | split | metric | value |', '|---|---|---|---|']
        lines += [f'| {r.dataset_name} | {r.dataset_split or "-"} | {r.metric_name} | {r.metric_value:g} |'
                  for r in eval_results]
        lines.append('')
    return ModelCard(f'---\n{card_data.to_yaml()}\n---\n\n' + '\n'.join(lines))


def _paper_link(facts: Mapping[str, Any]) -> str:
    title = facts['paper_name'] or facts['paper_ids']
    ids = str(facts['paper_ids'] or '')
    arxiv = [p.split(':', 1)[1] for p in ids.split(',') if p.strip().lower().startswith('arxiv:')]
    return f'[{title}](https://arxiv.org/abs/{arxiv[0]})' if arxiv else title


def _describe(model: nn.Module, task: str, facts: Mapping[str, Any]) -> str:
    if task == 'classification':
        return f'An image classifier from attnzoo, a timm model (`{facts["architecture"]}`).'
    cfg = model.attnzoo_cfg
    kind = _TASKS[task][1].lower()
    return (f'{"An" if kind[0] in "aeiou" else "A"} {kind} model from attnzoo: `{cfg["arch"]}`{_backbone_phrase(cfg)}, '
            f'{cfg.get("num_classes")} classes.')


def _backbone_phrase(cfg: Mapping[str, Any]) -> str:
    return f' on the `{cfg["backbone"]}` backbone' if cfg.get('backbone') else ' (its own convolutional encoder)'


# ---------------------------------------------------------------------------------------------
# save, push, load


def save_pretrained(
        model: nn.Module,
        save_directory: Union[str, Path],
        *,
        name: Optional[str] = None,
        card: bool = True,
        **card_kwargs: Any,
) -> Path:
    """Write ``config.json``, ``model.safetensors`` and a ``README.md`` model card to ``save_directory``.

    A timm model goes through timm's ``save_for_hf`` (its architecture, constructor arguments and
    data config); a task model writes its ``attnzoo_cfg``. ``card_kwargs`` go to ``make_model_card``
    (``metrics=``, ``dataset=``, ``license=``, ``repo_id=``, ...). Returns the folder.
    """
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    task_cfg = getattr(model, 'attnzoo_cfg', None)
    if task_cfg:
        json.dumps(task_cfg)  # fail here, not in a half-written folder, if an argument is not JSON
        config = {'library_name': 'attnzoo', 'attnzoo_version': _version(), 'attnzoo_cfg': dict(task_cfg)}
        # clones: safetensors refuses tensors that share storage, which a state dict may hold
        save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
                  str(save_directory / WEIGHTS_NAME))
        (save_directory / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    elif hasattr(model, 'pretrained_cfg'):
        save_for_hf(model, str(save_directory), safe_serialization=True)
    else:
        raise TypeError(
            f'{type(model).__name__} is neither a timm model (no pretrained_cfg) nor an attnzoo task model '
            '(no attnzoo_cfg); build it with timm.create_model or an attnzoo.zoo.create_*_model builder')
    if card:
        name = name or (card_kwargs.get('repo_id') or save_directory.resolve().name).split('/')[-1]
        make_model_card(model, name, **card_kwargs).save(save_directory / 'README.md')
    return save_directory


def _version() -> str:
    from attnzoo import __version__
    return __version__


def push_to_hub(
        model: nn.Module,
        repo_id: str,
        *,
        metrics: Optional[Union[MetricsSource, Sequence[MetricsSource]]] = None,
        commit_message: str = 'Add model',
        token: Optional[str] = None,
        private: bool = False,
        revision: Optional[str] = None,
        create_pr: bool = False,
        **card_kwargs: Any,
):
    """Save ``model`` (``save_pretrained``, card with ``metrics``) and upload it to ``repo_id``,
    creating the repository if needed, as timm's ``push_to_hf_hub`` does. Returns the commit info."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp, repo_id=repo_id, metrics=metrics, **card_kwargs)
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision, create_pr=create_pr,
                                 commit_message=commit_message)


def _locate(name: str) -> Tuple[str, str]:
    """(source, id) of ``hf-hub:ORG/NAME``, ``local-dir:PATH`` or a plain folder path."""
    source, ident = parse_model_name(name) if ':' in name else (None, name)
    if source is None:
        if not os.path.isdir(name):
            raise PretrainedWeightsNotFoundError(
                f'{name} is not a folder; name a Hub repository as hf-hub:ORG/NAME or a folder as local-dir:PATH')
        return 'local-dir', name
    return source, ident


def _fetch(source: str, ident: str, filename: str) -> str:
    """The local path of ``filename`` of a saved model, downloaded (or taken from the cache) for hf-hub."""
    if source == 'local-dir':
        path = Path(ident) / filename
        if not path.is_file():
            raise PretrainedWeightsNotFoundError(f'{filename} of saved model {ident} does not exist')
        return str(path)
    repo, _, revision = ident.partition('@')
    try:
        return hf_hub_download(repo, filename, revision=revision or None)
    except OSError as e:
        if _is_offline():
            reason = ('is not in the local Hugging Face cache and this machine is offline (HF_HUB_OFFLINE=1); '
                      'fetch it once while online')
        else:
            reason = f'could not be fetched ({type(e).__name__}: {e})'
        raise PretrainedWeightsNotFoundError(f'{filename} of Hugging Face repository {repo!r} {reason}') from e


def from_pretrained(name: str, **kwargs: Any) -> nn.Module:
    """Load a saved model, classifier or task model, from ``hf-hub:ORG/NAME``, ``local-dir:PATH`` or a folder.

    A classifier comes from ``timm.create_model(name, pretrained=True, **kwargs)``; a task model is
    rebuilt from its ``attnzoo_cfg`` and its weights loaded strictly. Offline (``HF_HUB_OFFLINE=1``)
    the files come from the Hugging Face cache; one that is not there raises
    PretrainedWeightsNotFoundError naming the repository and file; weights that do not fit raise
    CheckpointMismatchError.
    """
    source, ident = _locate(name)
    config_file = _fetch(source, ident, CONFIG_NAME)
    try:
        with open(config_file) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointReadError(f'{config_file} of saved model {name} is not valid json: {e}') from e
    if not isinstance(config, dict) or ('attnzoo_cfg' not in config and 'architecture' not in config):
        raise CheckpointReadError(f'{config_file} of saved model {name} names no architecture (a timm model\'s '
                                  "'architecture' or a task model's 'attnzoo_cfg')")
    if 'attnzoo_cfg' not in config:
        # fetch the weights first so that a missing file is named for any architecture and source
        # (timm's loader tries model.safetensors, then pytorch_model.bin, as here)
        try:
            _fetch(source, ident, WEIGHTS_NAME)
        except PretrainedWeightsNotFoundError as e:
            try:
                _fetch(source, ident, 'pytorch_model.bin')
            except PretrainedWeightsNotFoundError:
                raise e from None
        try:
            return timm.create_model(f'{source}:{ident}', pretrained=True, **kwargs)
        except (PretrainedWeightsNotFoundError, CheckpointReadError):
            raise
        except OSError as e:  # a timm architecture's weights, missing: timm's own error is less plain
            where = f'Hugging Face repository {ident!r}' if source == 'hf-hub' else f'folder {ident}'
            raise PretrainedWeightsNotFoundError(f'the weights of {where} could not be loaded ({e})') from e
    if kwargs:
        raise TypeError(f'a task model is rebuilt from its saved arguments only; got {sorted(kwargs)}')
    model = create_task_model(config['attnzoo_cfg'])
    weights = _fetch(source, ident, WEIGHTS_NAME)
    try:
        state_dict = load_file(weights)
    except Exception as e:
        raise CheckpointReadError(f'{weights} could not be read: corrupt, truncated or not safetensors ({e})') from e
    check_state_dict(state_dict, model, source=f'{name} weights')
    model.load_state_dict(state_dict)
    return model
