"""Semantic segmentation evaluation as mmseg defines it: mIoU, mAcc and aAcc over a whole dataset,
whole-image or sliding-window inference, single scale or the papers' multi-scale + flip.

The metric follows mmseg's ``IoUMetric``: per image, pixels labelled ``ignore_index`` (255) are left
out and the intersection, prediction and label histograms over the classes ``0..K-1`` are taken;
they are summed over the dataset before any ratio, so a class's IoU is its total intersection over
its total union. A class with no union (absent from both labels and predictions) has a NaN IoU
and is left out of the mean, as ``np.nanmean`` does in mmseg; a class absent from the labels has a
NaN accuracy. Reported values are percentages rounded to two decimals, as mmseg prints them.
Counts are exact int64 here, where mmseg sums float32 histograms (exact up to 2^24 pixels per class).

``reduce_zero_label`` is ADE20K's label shift (mmseg's ``LoadAnnotations``): label 0 ("other")
becomes 255, every other label drops by one, 255 stays 255.

Inference follows mmseg 0.x's ``EncoderDecoder``, which the papers' ADE20K numbers come from:
``whole`` runs the image at once; ``slide`` runs crops of ``crop_size`` every ``stride`` pixels, the
last crop of a row or column flush with the border, and divides the summed logits by how many
crops covered each pixel. Logits are resized (bilinear) to the original image. Multi-scale resizes
the image for each ratio r to fit mmcv's ``keep_ratio`` scale ``(2048 r, 512 r)`` (long edge, short
edge), runs it as is and flipped, and averages the softmax probabilities at the original size.
"""
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .common import ClassCountMismatchError

__all__ = [
    'PAPER_RATIOS', 'SegmentationMeter', 'evaluate_segmentation', 'intersect_and_union', 'keep_ratio_size',
    'load_segmenter', 'predict_segmentation', 'reduce_zero_label', 'seg_logits',
]

IGNORE_INDEX = 255
# mmseg's ADE20K multi-scale test: ratios of the (2048, 512) test scale
PAPER_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)

Logits = Callable[[torch.Tensor], torch.Tensor]


def reduce_zero_label(label: torch.Tensor) -> torch.Tensor:
    """ADE20K's labels as its models predict them: 0 -> 255 (ignored), k -> k - 1, 255 stays 255."""
    out = label.clone()
    out[label == 0] = IGNORE_INDEX
    out = out - 1
    out[out == IGNORE_INDEX - 1] = IGNORE_INDEX
    return out


def intersect_and_union(pred: torch.Tensor, label: torch.Tensor, num_classes: int,
                        ignore_index: int = IGNORE_INDEX) -> Tuple[torch.Tensor, ...]:
    """mmseg's per-image areas of one (H, W) prediction against its (H, W) label: intersection, union,
    prediction and label pixel counts per class (int64, (num_classes,)). Pixels labelled
    ``ignore_index`` count nowhere; values outside ``0..num_classes-1`` fall in no class (mmseg's
    ``histc`` range)."""
    if pred.shape != label.shape:
        raise ValueError(f'prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape')
    keep = label != ignore_index
    pred, label = pred[keep].long(), label[keep].long()

    def hist(values: torch.Tensor) -> torch.Tensor:
        values = values[(values >= 0) & (values < num_classes)]
        return torch.bincount(values, minlength=num_classes)

    area_intersect = hist(pred[pred == label])
    area_pred, area_label = hist(pred), hist(label)
    return area_intersect, area_pred + area_label - area_intersect, area_pred, area_label


class SegmentationMeter:
    """Sums mmseg's areas over a dataset and computes its metrics from the totals."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX,
                 class_names: Optional[Sequence[str]] = None):
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f'{len(class_names)} class names for {num_classes} classes')
        if class_names is not None and len(set(class_names)) != len(class_names):
            # the per-class results are keyed by name: a repeated one would hide a class
            repeated = sorted({n for n in class_names if list(class_names).count(n) > 1})
            raise ValueError(f'class names must differ, {", ".join(map(repr, repeated))} repeats')
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self.totals = torch.zeros(4, num_classes, dtype=torch.int64)
        self.images = 0

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """Add one image: ``pred`` and ``label`` (H, W) integer maps."""
        self.totals += torch.stack(intersect_and_union(pred.cpu(), label.cpu(), self.num_classes, self.ignore_index))
        self.images += 1

    def per_class(self) -> Dict[str, np.ndarray]:
        """IoU and Acc per class as fractions (float64, NaN where undefined)."""
        inter, union, _, label = self.totals.double().numpy()
        with np.errstate(invalid='ignore', divide='ignore'):
            return {'IoU': inter / union, 'Acc': inter / label}

    def compute(self) -> Dict[str, object]:
        """``aAcc``, ``mIoU``, ``mAcc`` in percent rounded to two decimals as mmseg reports them, and
        ``per_class``: ``{name: {'IoU': ..., 'Acc': ...}}`` likewise (None where NaN)."""
        inter, _, _, label = self.totals.double().numpy()
        if label.sum() == 0:
            raise ValueError('no labelled pixel was seen: every label was the ignore index (or none was given)')
        per_class = self.per_class()
        miou, macc = _nanmean(per_class['IoU']), _nanmean(per_class['Acc'])

        def pct(value: float) -> Optional[float]:
            return None if np.isnan(value) else float(np.round(value * 100, 2))

        return {
            'aAcc': pct(inter.sum() / label.sum()), 'mIoU': pct(miou), 'mAcc': pct(macc),
            'per_class': {name: {'IoU': pct(iou), 'Acc': pct(acc)}
                          for name, iou, acc in zip(self.class_names, per_class['IoU'], per_class['Acc'])},
        }


def _nanmean(values: np.ndarray) -> float:
    """np.nanmean without its warning when every value is NaN (then NaN)."""
    return float('nan') if np.isnan(values).all() else float(np.nanmean(values))


def keep_ratio_size(height: int, width: int, scale: Tuple[int, int]) -> Tuple[int, int]:
    """mmcv's ``rescale_size``: the (H, W) of an image resized, aspect kept, as large as fits ``scale``
    = (long edge, short edge) bounds, rounded half up."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def seg_logits(logits_fn: Logits, image: torch.Tensor, num_classes: int, mode: str = 'whole',
               crop_size: Optional[Tuple[int, int]] = None, stride: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Logits (1, K, H, W) of one (1, C, H, W) input at its own size, by ``whole`` or ``slide`` inference.

    ``logits_fn`` maps (1, C, h, w) to (1, K, h', w') logits at any stride; they are resized
    (bilinear, align_corners=False) to the input's h, w, as mmseg's ``encode_decode`` does.
    """
    def run(x: torch.Tensor) -> torch.Tensor:
        out = logits_fn(x)
        if out.dim() != 4 or out.shape[:2] != (x.shape[0], num_classes):
            raise ValueError(f'the model returned {tuple(out.shape)} for input {tuple(x.shape)}; expected '
                             f'(B, {num_classes}, h, w) logits')
        if out.shape[-2:] != x.shape[-2:]:
            out = F.interpolate(out, size=x.shape[-2:], mode='bilinear', align_corners=False)
        return out

    if mode == 'whole':
        return run(image)
    if mode != 'slide':
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    if crop_size is None or stride is None:
        raise ValueError('slide inference needs crop_size and stride')
    (h_crop, w_crop), (h_stride, w_stride) = crop_size, stride
    _, _, h_img, w_img = image.shape
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = image.new_zeros((1, num_classes, h_img, w_img))
    count = image.new_zeros((1, 1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            # the last window of a row or column is pushed back to end at the border
            y2, x2 = min(h_idx * h_stride + h_crop, h_img), min(w_idx * w_stride + w_crop, w_img)
            y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
            preds[:, :, y1:y2, x1:x2] += run(image[:, :, y1:y2, x1:x2])
            count[:, :, y1:y2, x1:x2] += 1
    return preds / count


def predict_segmentation(
        logits_fn: Logits,
        image: torch.Tensor,
        num_classes: int,
        *,
        scale: Optional[Tuple[int, int]] = (2048, 512),
        ratios: Sequence[float] = (1.0,),
        flip: bool = False,
        mode: str = 'whole',
        crop_size: Optional[Tuple[int, int]] = None,
        stride: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    """The (H, W) label map of one (1, C, H, W) image, as mmseg 0.x's ``simple_test``/``aug_test``.

    ``image`` is what the model takes (normalised as it expects). For each ratio r it is resized to
    ``keep_ratio_size`` of ``(scale[0] r, scale[1] r)`` (``scale=None``: only by r), and with ``flip``
    also run mirrored and mirrored back; with one view the argmax of its logits at the original size
    is the prediction, with several the argmax of their mean softmax probabilities.
    """
    _, _, height, width = image.shape
    views = [(r, f) for r in ratios for f in ((False, True) if flip else (False,))]
    total = None
    for ratio, flipped in views:
        if scale is None:
            size = (int(height * ratio + 0.5), int(width * ratio + 0.5))
        else:
            size = keep_ratio_size(height, width, (int(scale[0] * ratio), int(scale[1] * ratio)))
        x = image if size == (height, width) else F.interpolate(image, size=size, mode='bilinear',
                                                                  align_corners=False)
        if flipped:
            x = x.flip(-1)
        logits = seg_logits(logits_fn, x, num_classes, mode, crop_size, stride)
        if flipped:
            logits = logits.flip(-1)
        if logits.shape[-2:] != (height, width):
            logits = F.interpolate(logits, size=(height, width), mode='bilinear', align_corners=False)
        view = logits if len(views) == 1 else logits.softmax(dim=1)
        total = view if total is None else total + view
    return total[0].argmax(dim=0)


def load_segmenter(arch: str, backbone: str, num_classes: int, checkpoint: str, **kwargs: Any) -> nn.Module:
    """``create_segmentation_model(arch, backbone, num_classes, **kwargs)`` with the trained weights of
    ``checkpoint``: the model's own state dict (bare, in a training checkpoint or a Lightning
    checkpoint of the recipes) or a paper's mmseg checkpoint (``load_segmentation_checkpoint``)."""
    from attnzoo.zoo.segmentation import create_segmentation_model, load_segmentation_checkpoint
    from attnzoo.zoo.tasks import model_state_from, read_checkpoint
    state_dict = read_checkpoint(checkpoint)
    model = create_segmentation_model(arch, backbone, num_classes, **kwargs)
    load_segmentation_checkpoint(model, model_state_from(state_dict, model))
    return model


def _first(batch):
    return batch[0]


@torch.inference_mode()
def evaluate_segmentation(
        model: nn.Module,
        dataset: Dataset,
        num_classes: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        class_names: Optional[Sequence[str]] = None,
        scale: Optional[Tuple[int, int]] = (2048, 512),
        ratios: Sequence[float] = (1.0,),
        flip: bool = False,
        mode: str = 'whole',
        crop_size: Optional[Tuple[int, int]] = None,
        stride: Optional[Tuple[int, int]] = None,
        workers: int = 2,
        device: Union[str, torch.device] = 'cpu',
        progress: bool = True,
) -> Dict[str, Any]:
    """mmseg's mIoU, mAcc and aAcc of ``model`` over ``dataset``, with per-class IoU and Acc.

    ``dataset`` yields ``(image, mask)``: ``image`` float (3, H, W) in [0, 1], normalised here with
    ``mean`` and ``std`` before the model sees it; ``mask`` int (H, W) with 255 where ignored (ADE20K:
    read with ``reduce_zero_label``). ``model`` maps (1, 3, h, w) to (1, num_classes, h', w') logits.
    Inference options as ``predict_segmentation``. Adds ``images`` and ``images_per_sec``.
    Raises ClassCountMismatchError for a label the model cannot predict (neither 255 nor below
    ``num_classes``), which mmseg would silently leave out.
    """
    device = torch.device(device)
    model = model.to(device).eval()
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
    meter = SegmentationMeter(num_classes, class_names=class_names)
    loader = DataLoader(dataset, batch_size=1, num_workers=workers, collate_fn=_first)
    start = time.perf_counter()
    for index, (image, mask) in enumerate(tqdm(loader, desc='segmenting', unit='img', disable=not progress,
                                                leave=False)):
        labelled = mask[mask != IGNORE_INDEX]
        if labelled.numel() and (labelled.max() >= num_classes or labelled.min() < 0):
            raise ClassCountMismatchError(
                f'image {index} of the dataset has label {int(labelled.max())}, but the model predicts '
                f'{num_classes} classes (0..{num_classes - 1}, 255 ignored); ADE20K-style labels with 0 for '
                '"other" need reduce_zero_label')
        x = (image[None].to(device) - mean_t) / std_t
        pred = predict_segmentation(model, x, num_classes, scale=scale, ratios=ratios, flip=flip, mode=mode,
                                    crop_size=crop_size, stride=stride)
        meter.update(pred.cpu(), mask)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return dict(meter.compute(), images=meter.images, images_per_sec=meter.images / seconds)
