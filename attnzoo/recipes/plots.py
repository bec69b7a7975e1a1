"""Figures of training runs: loss and metric curves, confusion matrices, and predictions drawn over
images (masks, boxes, volume slices with contours). matplotlib's object API (no pyplot state, no
display needed); every function returns a ``matplotlib.figure.Figure``."""
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from matplotlib.figure import Figure

__all__ = ['plot_boxes', 'plot_confusion_matrix', 'plot_curves', 'plot_masks', 'plot_volume_slices']

History = Dict[str, List[Tuple[int, float]]]


def plot_curves(history: History, title: str = '') -> Figure:
    """Loss curves (left) and metric curves (right) over optimizer steps.

    ``history`` maps a name to its (step, value) points: ``train_loss_step`` (running), the
    per-epoch ``*_loss`` and the per-epoch metrics (``val_acc1``, ``val_miou``...).
    """
    losses = {k: v for k, v in history.items() if k.endswith('loss') or k.endswith('loss_step')}
    metrics = {k: v for k, v in history.items() if k not in losses and k != 'lr'}
    fig = Figure(figsize=(11, 4), layout='constrained')
    ax_l, ax_m = fig.subplots(1, 2)
    for name, points in sorted(losses.items()):
        if not points:
            continue
        steps, values = zip(*points)
        style = dict(alpha=0.4, lw=1) if name.endswith('_step') else dict(marker='o', ms=3)
        ax_l.plot(steps, values, label=name.replace('_step', ' (running)'), **style)
    ax_l.set(xlabel='optimizer step', ylabel='loss', title='loss')
    if any(v > 0 for points in losses.values() for _, v in points):
        ax_l.set_yscale('log')
    for name, points in sorted(metrics.items()):
        if points:
            steps, values = zip(*points)
            ax_m.plot(steps, values, marker='o', ms=3, label=name)
    ax_m.set(xlabel='optimizer step', title='metrics')
    for ax in (ax_l, ax_m):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def plot_confusion_matrix(confusion: torch.Tensor, class_names: Optional[Sequence[str]] = None,
                          title: str = '') -> Figure:
    """A (K, K) confusion matrix (rows true, columns predicted), shaded per true class, with counts."""
    cm = confusion.detach().cpu().numpy().astype(np.int64)
    k = cm.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    rate = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = min(12, 2 + 0.45 * k)
    fig = Figure(figsize=(size + 1, size), layout='constrained')
    ax = fig.subplots()
    im = ax.imshow(rate, cmap='Blues', vmin=0, vmax=1)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha='center', va='center', fontsize=7,
                            color='white' if rate[i, j] > 0.5 else 'black')
        ax.set_xticks(range(k), names, rotation=90 if k > 10 else 0)
        ax.set_yticks(range(k), names)
    acc = np.trace(cm) / max(cm.sum(), 1)
    ax.set(xlabel='predicted', ylabel='true', title=f'{title} confusion matrix, accuracy {100 * acc:.2f} %'.strip())
    fig.colorbar(im, ax=ax, shrink=0.8, label='fraction of the true class')
    return fig


def _image(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) float in [0, 1] to (H, W, 3) for imshow."""
    a = x.detach().cpu().float().clamp(0, 1).numpy()
    return np.repeat(a[:1], 3, 0).transpose(1, 2, 0) if a.shape[0] != 3 else a.transpose(1, 2, 0)


def _palette(n: int) -> np.ndarray:
    return np.array([(0, 0, 0)] + [tuple(int(255 * c) for c in _hsv(i / max(n - 1, 1))) for i in range(n - 1)],
                    dtype=np.uint8)


def _hsv(h: float) -> Tuple[float, float, float]:
    import colorsys
    return colorsys.hsv_to_rgb(0.9 * h, 0.75, 0.95)


def plot_masks(images: torch.Tensor, targets: torch.Tensor, preds: torch.Tensor, num_classes: int,
               ignore_index: int = 255) -> Figure:
    """Rows of image / ground truth / prediction for (B, C, H, W) images and (B, H, W) label maps;
    labels over a dimmed grey copy of the image, so that their colours never blend with the
    image's own (class 0 transparent, ``ignore_index`` hatched grey), and a legend of the classes."""
    from matplotlib.patches import Patch

    n = len(images)
    palette = _palette(num_classes)
    fig = Figure(figsize=(9, 3 * n + 0.4), layout='constrained')
    axes = np.atleast_2d(fig.subplots(n, 3))
    for i in range(n):
        img = _image(images[i])
        for ax, labels, name in zip(axes[i], (None, targets[i], preds[i]), ('image', 'ground truth', 'prediction')):
            if labels is None:
                ax.imshow(img)
            else:
                ax.imshow(img.mean(-1), cmap='gray', vmin=-0.5, vmax=1.5)  # grey, low contrast
                lab = labels.detach().cpu().numpy()
                over = np.zeros((*lab.shape, 4))
                valid = (lab > 0) & (lab != ignore_index) & (lab < num_classes)
                over[valid, :3] = palette[lab[valid]] / 255
                over[valid, 3] = 0.85
                over[lab == ignore_index] = (0.5, 0.5, 0.5, 0.6)
                ax.imshow(over)
            ax.set_title(name, fontsize=9)
            ax.axis('off')
    fig.legend(handles=[Patch(color=palette[c] / 255, label=f'class {c}') for c in range(1, num_classes)],
               loc='outside lower center', ncols=min(num_classes - 1, 8), fontsize=8, frameon=False)
    return fig


def plot_boxes(images: torch.Tensor, targets: List[Dict[str, torch.Tensor]], preds: List[Dict[str, torch.Tensor]],
               class_names: Sequence[str], score_threshold: float = 0.5) -> Figure:
    """Images with ground-truth boxes (dashed) and predicted boxes above ``score_threshold``
    (solid, with class and score); boxes are absolute x0, y0, x1, y1. Predicted masks, when
    present, are blended in."""
    from matplotlib.patches import Rectangle
    n = len(images)
    palette = _palette(len(class_names) + 1)[1:] / 255
    fig = Figure(figsize=(4.5 * n, 4.5), layout='constrained')
    axes = np.atleast_1d(fig.subplots(1, n))
    for ax, img, tgt, pred in zip(axes, images, targets, preds):
        ax.imshow(_image(img))
        keep = pred['scores'] >= score_threshold
        if 'masks' in pred and keep.any():
            masks = pred['masks'][keep].detach().cpu()
            masks = (masks[:, 0] if masks.dim() == 4 else masks) > 0.5
            over = np.zeros((*masks.shape[-2:], 4))
            for m, label in zip(masks.numpy(), pred['labels'][keep].tolist()):
                over[m, :3] = palette[(label - 1) % len(palette)]
                over[m, 3] = 0.45
            ax.imshow(over)
        for box, label in zip(tgt['boxes'].tolist(), tgt['labels'].tolist()):
            x0, y0, x1, y1 = box
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ls='--', lw=1, ec='white'))
        for box, label, score in zip(pred['boxes'][keep].tolist(), pred['labels'][keep].tolist(),
                                     pred['scores'][keep].tolist()):
            x0, y0, x1, y1 = box
            color = palette[(label - 1) % len(palette)]
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.5, ec=color))
            name = class_names[label - 1] if 0 < label <= len(class_names) else str(label)
            ax.text(x0, y0, f'{name} {score:.2f}', fontsize=7, color='black', va='bottom',
                    bbox=dict(facecolor=color, alpha=0.8, pad=1, lw=0))
        ax.axis('off')
    fig.suptitle('dashed: ground truth, solid: predictions', fontsize=9)
    return fig


def plot_volume_slices(image: torch.Tensor, target: torch.Tensor, pred: torch.Tensor, num_slices: int = 3) -> Figure:
    """Axial slices of a (C, D, H, W) volume through the labelled region, with ground-truth (green)
    and predicted (red) contours of the foreground, for (D, H, W) label maps."""
    vol = image[0].detach().cpu().float().numpy()
    gt = target.detach().cpu().numpy() > 0
    pr = pred.detach().cpu().numpy() > 0
    depth = vol.shape[0]
    z = np.flatnonzero(gt.any((1, 2)) | pr.any((1, 2)))
    lo, hi = (z.min(), z.max()) if len(z) else (0, depth - 1)
    slices = np.unique(np.linspace(lo, hi, num_slices + 2)[1:-1].round().astype(int))
    fig = Figure(figsize=(3.5 * len(slices), 3.8), layout='constrained')
    axes = np.atleast_1d(fig.subplots(1, len(slices)))
    for ax, s in zip(axes, slices):
        ax.imshow(vol[s], cmap='gray')
        if gt[s].any():
            ax.contour(gt[s], levels=[0.5], colors='lime', linewidths=1)
        if pr[s].any():
            ax.contour(pr[s], levels=[0.5], colors='red', linewidths=1)
        ax.set_title(f'slice {s}', fontsize=9)
        ax.axis('off')
    fig.suptitle('green: ground truth, red: prediction', fontsize=9)
    return fig
