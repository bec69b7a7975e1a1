"""Images of drawn shapes with exact geometry: the embedded data of the dense recipes, demos and tests.

Every image holds a few non-overlapping shapes (rectangles, ellipses, triangles) on a noisy
background. Each shape is a polygon (an ellipse a 32-gon), painted as one: the polygon is what a
COCO annotation stores, the box is the polygon's bounds, and the mask is the polygon filled by
Pillow, which counts the pixels its edges touch. pycocotools' fill of the same polygon can be a
pixel thinner along the edges (IoU 0.83 to 1.0 between the two at these sizes), so evaluations
read masks through one rasteriser: the COCO reader's come from pycocotools. Shapes never
overlap, so no mask is cut by another and every annotation describes what is visible. Each class
has its own hue (with jitter), so a small model learns the task in a few dozen steps.

Only numpy and Pillow: the COCO writer (``coco.py``), the segmentation-folder writer and the
tests build on this one drawer.
"""
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

__all__ = ['SHAPE_CLASSES', 'DrawnShape', 'draw_shapes']

# class names; label ids are 1-based (0 is the background of semantic label maps)
SHAPE_CLASSES: Tuple[str, ...] = ('rectangle', 'ellipse', 'triangle')
# one base colour per class (RGB), jittered per shape
_CLASS_COLORS = np.array([(220, 60, 60), (60, 200, 80), (70, 90, 230)], dtype=np.float64)


@dataclass(frozen=True)
class DrawnShape:
    """One shape: its 1-based class ``label``, its ``polygon`` as (N, 2) x, y pixel coordinates,
    its ``mask`` (H, W) bool (the polygon filled) and its COCO ``box`` (x, y, w, h), the
    polygon's bounds."""
    label: int
    polygon: np.ndarray
    mask: np.ndarray
    box: Tuple[float, float, float, float]


def _polygon(kind: str, cx: float, cy: float, rx: float, ry: float, angle: float) -> np.ndarray:
    """The vertices of a shape of half-extent (rx, ry) about (cx, cy), rotated by ``angle`` radians."""
    if kind == 'rectangle':
        pts = np.array([(-rx, -ry), (rx, -ry), (rx, ry), (-rx, ry)])
    elif kind == 'ellipse':
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        pts = np.stack([rx * np.cos(t), ry * np.sin(t)], 1)
    else:  # triangle: apex up, base down
        pts = np.array([(0., -ry), (rx, ry), (-rx, ry)])
    c, s = np.cos(angle), np.sin(angle)
    pts = pts @ np.array([[c, s], [-s, c]])
    return pts + (cx, cy)


def _fill(polygon: np.ndarray, height: int, width: int) -> np.ndarray:
    canvas = Image.new('1', (width, height), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in polygon], fill=1)
    return np.array(canvas, dtype=bool)


def draw_shapes(
        rng: np.random.Generator,
        height: int,
        width: int,
        max_shapes: int = 3,
        classes: Sequence[int] = (1, 2, 3),
        min_extent: float = 0.12,
        max_extent: float = 0.3,
        noise: float = 12.,
) -> Tuple[np.ndarray, List[DrawnShape]]:
    """Draw one image: ``(H, W, 3)`` uint8 and its shapes (between 1 and ``max_shapes``).

    Shape half-extents are drawn between ``min_extent`` and ``max_extent`` of the shorter side;
    shapes are placed inside the image without overlapping (a placement that would overlap is
    drawn again, and given up after a few tries, so an image may hold fewer shapes than drawn).
    ``classes`` are the 1-based labels to draw from.
    """
    if height < 16 or width < 16:
        raise ValueError(f'images of drawn shapes need sides of at least 16 pixels, got {height}x{width}')
    short = min(height, width)
    image = rng.uniform(40, 160, size=3) + rng.normal(0, noise, size=(height, width, 3))
    occupied = np.zeros((height, width), dtype=bool)
    shapes: List[DrawnShape] = []
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        for _attempt in range(10):
            label = int(rng.choice(classes))
            rx, ry = rng.uniform(min_extent, max_extent, size=2) * short
            reach = np.hypot(rx, ry) + 1  # every vertex, at any rotation, lies within this radius
            if 2 * reach >= short:
                rx, ry = rx * short / (2 * reach + 2), ry * short / (2 * reach + 2)
                reach = np.hypot(rx, ry) + 1
            cx, cy = rng.uniform(reach, width - reach), rng.uniform(reach, height - reach)
            polygon = _polygon(SHAPE_CLASSES[label - 1], cx, cy, rx, ry, rng.uniform(0, np.pi))
            mask = _fill(polygon, height, width)
            # one pixel of margin: shapes neither overlap nor touch
            grown = mask | np.roll(mask, 1, 0) | np.roll(mask, -1, 0) | np.roll(mask, 1, 1) | np.roll(mask, -1, 1)
            if mask.any() and not (grown & occupied).any():
                break
        else:
            continue
        occupied |= mask
        color = _CLASS_COLORS[label - 1] + rng.normal(0, 15, size=3)
        image[mask] = color + rng.normal(0, noise, size=(int(mask.sum()), 3))
        x0, y0 = polygon.min(0)
        x1, y1 = polygon.max(0)
        shapes.append(DrawnShape(label, polygon, mask, (float(x0), float(y0), float(x1 - x0), float(y1 - y0))))
    return np.clip(image, 0, 255).astype(np.uint8), shapes
