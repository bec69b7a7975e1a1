"""The shape drawer's geometry: polygon, mask and box agree, shapes stay inside and never touch."""
import numpy as np
import pytest

from attnzoo.recipes.data.shapes import SHAPE_CLASSES, draw_shapes


@pytest.mark.parametrize('size', [(64, 64), (48, 80), (16, 16)])
def test_shapes_are_exact_inside_and_apart(size):
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(20):
        image, shapes = draw_shapes(rng, *size, max_shapes=4)
        assert image.shape == (*size, 3) and image.dtype == np.uint8
        assert 1 <= len(shapes) <= 4
        union = np.zeros(size, dtype=int)
        for s in shapes:
            seen.add(s.label)
            assert 1 <= s.label <= len(SHAPE_CLASSES)
            x, y, w, h = s.box
            assert x >= 0 and y >= 0 and x + w <= size[1] and y + h <= size[0]
            ys, xs = np.nonzero(s.mask)
            # the filled mask lies within the polygon's bounds (pixel centres, one pixel of rounding)
            assert xs.min() >= np.floor(x) - 1 and xs.max() <= np.ceil(x + w) + 1
            assert ys.min() >= np.floor(y) - 1 and ys.max() <= np.ceil(y + h) + 1
            union += s.mask
        assert union.max() <= 1  # no overlap
    assert seen == {1, 2, 3}


def test_drawing_is_seeded():
    a = draw_shapes(np.random.default_rng(3), 40, 56)
    b = draw_shapes(np.random.default_rng(3), 40, 56)
    assert np.array_equal(a[0], b[0]) and len(a[1]) == len(b[1])
    assert all(np.array_equal(s.polygon, t.polygon) for s, t in zip(a[1], b[1]))


def test_too_small_an_image_is_refused():
    with pytest.raises(ValueError, match='at least 16'):
        draw_shapes(np.random.default_rng(0), 8, 32)
