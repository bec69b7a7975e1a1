"""ADE20K-layout segmentation folders (attnzoo.recipes.data.segmentation)."""
import numpy as np
import pytest
import torch
from PIL import Image

from attnzoo.recipes.data.segmentation import (
    IGNORE_INDEX,
    SHAPES_SEGMENTATION_CLASSES,
    SegmentationFolder,
    write_shapes_segmentation,
)


def test_shapes_set_round_trip(tmp_path):
    root = write_shapes_segmentation(tmp_path / 'shapes', num_train=3, num_val=2, size=(40, 56), seed=1)
    train = SegmentationFolder(root, 'training', classes=SHAPES_SEGMENTATION_CLASSES)
    val = SegmentationFolder(root, 'validation')
    assert len(train) == 3 and len(val) == 2 and train.num_classes == 4
    image, mask = train[0]
    assert image.dtype == torch.float32 and image.shape == (3, 40, 56) and 0 <= image.min() and image.max() <= 1
    assert mask.dtype == torch.int64 and mask.shape == (40, 56)
    labels = set(mask.unique().tolist())
    assert 0 in labels and labels - {0} and labels <= {0, 1, 2, 3}
    # the same seed writes the same set
    again = write_shapes_segmentation(tmp_path / 'again', num_train=3, num_val=2, size=(40, 56), seed=1)
    assert torch.equal(SegmentationFolder(again)[0][1], mask)


def test_reduce_zero_label_and_transform(tmp_path):
    # ADE20K: 0 is "other" (ignored), 1..150 become 0..149
    for d in ('images/training', 'annotations/training'):
        (tmp_path / d).mkdir(parents=True)
    ann = np.array([[0, 1, 150], [2, 0, 255]], dtype=np.uint8)
    Image.fromarray(np.full((2, 3, 3), 100, dtype=np.uint8)).save(tmp_path / 'images/training/a.jpg')
    Image.fromarray(ann).save(tmp_path / 'annotations/training/a.png')
    _, mask = SegmentationFolder(tmp_path, reduce_zero_label=True)[0]
    assert mask.tolist() == [[IGNORE_INDEX, 0, 149], [1, IGNORE_INDEX, IGNORE_INDEX]]
    flip = SegmentationFolder(tmp_path, transform=lambda image, mask: dict(image=image[:, ::-1], mask=mask[:, ::-1]))
    assert flip[0][1].tolist() == [[150, 1, 0], [255, 0, 2]]


def test_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match='images/training'):
        SegmentationFolder(tmp_path)
    for d in ('images/training', 'annotations/training'):
        (tmp_path / d).mkdir(parents=True)
    with pytest.raises(ValueError, match='no \\*.jpg images'):
        SegmentationFolder(tmp_path)
    Image.fromarray(np.zeros((4, 5, 3), dtype=np.uint8)).save(tmp_path / 'images/training/a.jpg')
    with pytest.raises(ValueError, match='have no annotation: .*a.png'):
        SegmentationFolder(tmp_path)
    Image.fromarray(np.zeros((4, 6), dtype=np.uint8)).save(tmp_path / 'annotations/training/a.png')
    with pytest.raises(ValueError, match='is 6x4 but its image'):
        SegmentationFolder(tmp_path)[0]
    Image.fromarray(np.zeros((4, 5, 3), dtype=np.uint8)).save(tmp_path / 'annotations/training/a.png')
    with pytest.raises(ValueError, match='one class index per pixel'):
        SegmentationFolder(tmp_path)[0]
