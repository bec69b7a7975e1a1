"""Every dense preset moves boxes, masks and label maps with the image: a drawn shape's box still
covers its mask, and the bright pixels of the image are still the labelled ones, after flips, crops,
rescales and pads."""
import numpy as np
import pytest

from attnzoo.recipes.data.shapes import draw_shapes
from attnzoo.recipes.transforms import IGNORE_INDEX, create_transform

SEEDS = range(12)


def _gray_shapes(seed, height=480, width=640):
    """Drawn shapes painted grey 220 on grey 40: hue and saturation jitter leave grey pixels grey
    and brightness/contrast are monotone, so after any preset the labelled pixels stay the bright ones.
    COCO's size: the presets resample it by at most 1.25, so a mask pixel stays within a pixel or
    two of the polygon it rasterises."""
    _, shapes = draw_shapes(np.random.default_rng(seed), height, width, max_shapes=3)
    fg = np.zeros((height, width), bool)
    for s in shapes:
        fg |= s.mask
    image = np.where(fg[..., None], 220, 40).astype(np.uint8).repeat(3, 2)
    return image, shapes


def _bright_matches_labels(image, labelled, valid):
    """Of the valid pixels away from label edges (interpolation blurs a pixel there), the share
    where 'brighter than the midpoint' equals 'labelled'."""
    gray = image.astype(np.float64).mean(2)
    inner = labelled.copy()
    outer = ~labelled
    for axis in (0, 1):
        for shift in (1, -1):
            inner &= np.roll(labelled, shift, axis)
            outer &= ~np.roll(labelled, shift, axis)
    keep = valid & (inner | outer)
    if not inner[keep].any() or not outer[keep].any():
        return None
    threshold = (np.median(gray[keep & inner]) + np.median(gray[keep & outer])) / 2
    return np.mean((gray[keep] > threshold) == labelled[keep])


@pytest.mark.parametrize('name,size', [('shapes', (96, 128)), ('coco', 800), ('coco_detr', 800)])
def test_detection_presets_keep_boxes_on_their_masks(name, size):
    checked = 0
    for seed in SEEDS:
        image, shapes = _gray_shapes(seed)
        preset = create_transform(name, image_size=size, seed=seed, boxes=True)
        out = preset(image=image, bboxes=np.array([s.box for s in shapes]), labels=np.array([s.label for s in shapes]),
                     ann_index=np.arange(len(shapes)), masks=[s.mask.astype(np.uint8) for s in shapes])
        h, w = out['image'].shape[:2]
        assert all(m.shape == (h, w) for m in out['masks'])
        assert len(out['bboxes']) == len(out['labels']) == len(out['ann_index'])
        for box, label, index in zip(out['bboxes'], out['labels'], out['ann_index']):
            assert label == shapes[index].label
            mask = out['masks'][index] > 0
            ys, xs = np.nonzero(mask)
            assert len(xs), 'a kept box has lost its whole mask'
            x0, y0, bw, bh = box
            # the box covers every pixel of the mask (one pixel of rounding at resampled edges) ...
            assert xs.min() >= np.floor(x0) - 1 and xs.max() + 1 <= np.ceil(x0 + bw) + 1, (name, seed, box)
            assert ys.min() >= np.floor(y0) - 1 and ys.max() + 1 <= np.ceil(y0 + bh) + 1, (name, seed, box)
            # ... and, for a shape the crop left whole, is the mask's own box, not a larger one (a cut
            # shape keeps its box clipped to the crop, which can be looser than what still shows)
            if xs.min() == 0 or ys.min() == 0 or xs.max() == w - 1 or ys.max() == h - 1:
                checked += 1
                continue
            mask_box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            inter = max(0, min(x0 + bw, mask_box[2]) - max(x0, mask_box[0])) * \
                max(0, min(y0 + bh, mask_box[3]) - max(y0, mask_box[1]))
            union = bw * bh + (mask_box[2] - mask_box[0]) * (mask_box[3] - mask_box[1]) - inter
            assert inter / union > 0.75, (name, seed, box, mask_box)
            checked += 1
        labelled = np.any([m > 0 for m in out['masks']], 0) if len(out['masks']) else np.zeros((h, w), bool)
        agreement = _bright_matches_labels(out['image'], labelled, np.ones((h, w), bool))
        # crops may drop a box whose shape still shows a sliver: compare only where that cannot be
        if len(out['bboxes']) == len(shapes) and agreement is not None:
            assert agreement > 0.99, (name, seed, agreement)
    assert checked >= len(SEEDS)


@pytest.mark.parametrize('name,size', [('shapes', (96, 128)), ('ade20k', 128)])
def test_segmentation_presets_keep_label_maps_on_the_image(name, size):
    flipped_or_moved = 0
    for seed in SEEDS:
        image, shapes = _gray_shapes(seed)
        mask = np.zeros(image.shape[:2], np.int64)
        for s in shapes:
            mask[s.mask] = s.label
        out = create_transform(name, image_size=size, seed=seed)(image=image, mask=mask)
        assert out['mask'].shape == out['image'].shape[:2] == ((size, size) if isinstance(size, int) else size)
        valid = out['mask'] != IGNORE_INDEX
        agreement = _bright_matches_labels(out['image'], out['mask'] > 0, valid)
        if agreement is not None:
            assert agreement > 0.99, (name, seed, agreement)
        # the labels still name their shapes: no class appears that was not drawn
        assert set(np.unique(out['mask'][valid])) <= {0} | {s.label for s in shapes}
        flipped_or_moved += not np.array_equal(out['mask'], mask) if out['mask'].shape == mask.shape else 1
    assert flipped_or_moved > len(SEEDS) // 2  # the presets did move things


def test_volume_preset_keeps_the_label_on_the_tumour():
    from attnzoo.recipes.data.volumes import synthetic_volume
    for seed in SEEDS:
        image, label = synthetic_volume(np.random.default_rng(seed), (28, 24, 20), noise=0.0)
        out = create_transform('volumes', image_size=16, seed=seed)(image=image[None], label=label.astype(np.int64))
        assert out['image'].shape == (1, 16, 16, 16) and out['label'].shape == (16, 16, 16)
        img, lab = out['image'][0], out['label'] > 0
        if lab.any() and (~lab).any():
            # intensity jitter is one affine map for the volume: tumour voxels stay the bright ones
            assert img[lab].min() > img[~lab].max(), seed
