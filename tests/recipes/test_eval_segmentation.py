"""Segmentation evaluation as mmseg defines it: dataset-level mIoU/mAcc/aAcc on hand-made label maps,
ADE20K's zero-label shift, sliding windows and multi-scale + flip."""
import pytest
import torch

from attnzoo.recipes.evaluation.segmentation import (
    SegmentationMeter,
    keep_ratio_size,
    predict_segmentation,
    reduce_zero_label,
    seg_logits,
)

I = 255  # noqa: E741  (the ignore label, short so the maps below line up)


def test_miou_macc_aacc_over_a_dataset_equal_the_hand_computed_values():
    meter = SegmentationMeter(num_classes=5, class_names=['a', 'b', 'c', 'd', 'e'])
    meter.update(torch.tensor([[0, 1, 1, 1],
                               [0, 0, 1, 2],
                               [3, 0, 2, 2]]),
                 torch.tensor([[0, 0, 1, 1],
                               [0, I, 1, 2],
                               [3, 3, I, 2]]))
    meter.update(torch.tensor([[1, 2, 0],
                               [0, 2, 1]]),
                 torch.tensor([[1, 1, I],
                               [0, 2, 2]]))
    # by hand, over the 15 labelled pixels of both images (the three 255s count nowhere):
    # class        a    b    c    d    e
    # intersect    3    4    3    1    0
    # predicted    4    6    4    1    0
    # labelled     4    5    4    2    0
    # union        5    7    5    2    0  -> IoU 3/5 4/7 3/5 1/2 NaN, Acc 3/4 4/5 3/4 1/2 NaN
    got = meter.compute()
    assert got['mIoU'] == round(100 * (3 / 5 + 4 / 7 + 3 / 5 + 1 / 2) / 4, 2) == 56.79
    assert got['mAcc'] == round(100 * (3 / 4 + 4 / 5 + 3 / 4 + 1 / 2) / 4, 2) == 70.0
    assert got['aAcc'] == round(100 * 11 / 15, 2) == 73.33
    assert got['per_class']['b'] == {'IoU': 57.14, 'Acc': 80.0}
    assert got['per_class']['e'] == {'IoU': None, 'Acc': None}  # in neither map: out of both means


def test_a_class_predicted_but_never_labelled_counts_zero_iou_and_no_accuracy():
    meter = SegmentationMeter(num_classes=3)
    meter.update(torch.tensor([[0, 2, 1, 1]]), torch.tensor([[0, 0, 1, 1]]))
    # IoU 1/2, 2/2, 0/1 -> 50; Acc 1/2, 2/2, NaN -> 75; aAcc 3/4
    assert {k: v for k, v in meter.compute().items() if k != 'per_class'} == {'aAcc': 75.0, 'mIoU': 50.0, 'mAcc': 75.0}


def test_reduce_zero_label_is_ade20k_shift():
    raw = torch.tensor([[0, 1, 2], [150, 255, 0]])
    assert reduce_zero_label(raw).tolist() == [[255, 0, 1], [149, 255, 255]]


def test_sliding_windows_cover_flush_to_the_border_and_average_their_logits():
    # channel 0 holds each pixel's column; the "model" answers each window with the mean column it
    # saw, so the result shows which windows covered a pixel. Width 10, crop 4, stride 3: windows
    # [0, 4), [3, 7) and the last pushed back to [6, 10), means 1.5, 4.5, 7.5.
    image = torch.arange(10.).expand(1, 1, 4, 10).clone()
    out = seg_logits(lambda x: x.mean((2, 3), keepdim=True).expand(-1, 1, *x.shape[2:]), image, 1,
                     mode='slide', crop_size=(4, 4), stride=(3, 3))
    want = [1.5, 1.5, 1.5, (1.5 + 4.5) / 2, 4.5, 4.5, (4.5 + 7.5) / 2, 7.5, 7.5, 7.5]
    assert out[0, 0].tolist() == [want] * 4

    # a pointwise model gives the same logits whichever windows run it
    conv = torch.nn.Conv2d(3, 4, 1)
    x = torch.randn(1, 3, 13, 17)
    with torch.no_grad():
        slide = seg_logits(conv, x, 4, mode='slide', crop_size=(5, 7), stride=(3, 4))
        torch.testing.assert_close(slide, conv(x), rtol=1e-6, atol=1e-6)


def test_keep_ratio_sizes_are_mmcvs():
    # ADE20K's 683x512 image at the papers' test scales (2048, 512) x ratio: short edge 512 r
    assert keep_ratio_size(512, 683, (2048, 512)) == (512, 683)
    assert keep_ratio_size(512, 683, (1024, 256)) == (256, 342)  # 341.5 rounds half up
    assert keep_ratio_size(512, 683, (3584, 896)) == (896, 1195)
    assert keep_ratio_size(300, 2000, (2048, 512)) == (307, 2048)  # the long edge bounds it


def test_flipped_views_are_mirrored_back_before_averaging():
    # a pointwise model on an image whose left half says class 1 and right half class 0: its flipped
    # view, mirrored back, agrees with the plain one; not mirrored back, it would swap the halves
    def logits(x):
        return torch.cat([x[:, :1], -x[:, :1]], 1)

    image = torch.linspace(-1, 1, 9).expand(1, 3, 6, 9) + 0.05 * torch.randn(1, 3, 6, 9)
    single = predict_segmentation(logits, image, 2, scale=None)
    assert single.tolist() == logits(image)[0].argmax(0).tolist()
    assert single[:, 0].tolist() == [1] * 6 and single[:, -1].tolist() == [0] * 6
    assert predict_segmentation(logits, image, 2, scale=None, flip=True).tolist() == single.tolist()
    multi = predict_segmentation(logits, image, 2, scale=(18, 12), ratios=(0.5, 1.0, 1.5), flip=True)
    assert multi.shape == (6, 9) and multi[:, :2].eq(1).all() and multi[:, -2:].eq(0).all()


def test_meter_refuses_what_it_cannot_measure():
    meter = SegmentationMeter(num_classes=2)
    with pytest.raises(ValueError, match='differ in shape'):
        meter.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    meter.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), I))
    with pytest.raises(ValueError, match='no labelled pixel'):
        meter.compute()
