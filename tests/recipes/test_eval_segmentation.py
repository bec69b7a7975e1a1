"""Segmentation evaluation as mmseg defines it: dataset-level mIoU/mAcc/aAcc on hand-made label maps,
ADE20K's zero-label shift, sliding windows and multi-scale + flip."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from attnzoo.recipes.evaluation.segmentation import (
    SegmentationMeter,
    keep_ratio_size,
    predict_segmentation,
    reduce_zero_label,
    seg_logits,
)

from ..conftest import load_script

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
    # the per-class results are keyed by name
    with pytest.raises(ValueError, match="class names must differ, 'a' repeats"):
        SegmentationMeter(num_classes=3, class_names=['a', 'a', 'b'])


SMALL = dict(channels=16, fpn_channels=16)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _oracle(model, root, mean, std, size):
    """mIoU/mAcc/aAcc by a confusion matrix over the split (numpy), each image run at ``size`` and its
    logits resized back: the metric computed apart from SegmentationMeter."""
    from attnzoo.recipes.data.segmentation import SegmentationFolder
    conf = np.zeros((4, 4), np.int64)
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    for image, mask in SegmentationFolder(root, 'validation'):
        x = F.interpolate((image[None] - mean) / std, size=size, mode='bilinear', align_corners=False)
        with torch.no_grad():
            logits = F.interpolate(model(x), size=mask.shape, mode='bilinear', align_corners=False)
        keep = (mask != I).numpy()
        conf += np.bincount(4 * mask.numpy()[keep] + logits[0].argmax(0).numpy()[keep], minlength=16).reshape(4, 4)
    inter, label, pred = np.diag(conf), conf.sum(1), conf.sum(0)
    with np.errstate(invalid='ignore'):
        iou, acc = inter / (label + pred - inter), inter / label
    return {'aAcc': round(100 * inter.sum() / label.sum(), 2), 'mIoU': round(100 * np.nanmean(iou), 2),
            'mAcc': round(100 * np.nanmean(acc), 2)}


def test_script_end_to_end_on_the_synthetic_set_and_a_saved_model(tmp_path, capsys, one_thread):
    from timm.models import resolve_pretrained_cfg

    from attnzoo.recipes.data.segmentation import write_shapes_segmentation
    from attnzoo.zoo import save_pretrained
    from attnzoo.zoo.segmentation import create_segmentation_model
    script = load_script('eval_segmentation')

    root = write_shapes_segmentation(tmp_path / 'shapes', num_train=0, num_val=4, size=(64, 96), seed=0)
    torch.manual_seed(0)
    model = create_segmentation_model('fpn', 'az_van_b0', 4, **SMALL).eval()
    checkpoint = tmp_path / 'last.ckpt'  # attnzoo-train's layout: the model under model.
    torch.save({'state_dict': {f'model.{k}': v for k, v in model.state_dict().items()}}, checkpoint)
    cfg = resolve_pretrained_cfg('az_van_b0')
    # the test scale 192x128 doubles the 96x64 images (mmcv's keep-ratio rule), so resizing is exercised
    want = _oracle(model, root, cfg.mean, cfg.std, (128, 192))

    common = [str(root), '--scale', '192', '128', '-j', '0', '--device', 'cpu', '--no-progress']
    out = tmp_path / 'arch.json'
    assert script.main(common + ['--model', 'fpn', '--backbone', 'az_van_b0', '--num-classes', '4', '--checkpoint',
                                 str(checkpoint), '--model-kwargs', 'channels=16', 'fpn_channels=16',
                                 '--out', str(out)]) == 0
    got = json.loads(out.read_text())
    assert {k: got[k] for k in want} == want and got['images'] == 4 and len(got['per_class']) == 4
    printed = capsys.readouterr().out
    assert 'per class results:' in printed and f'{want["mIoU"]:.2f}' in printed

    folder = save_pretrained(model, tmp_path / 'saved', card=False)
    again = tmp_path / 'saved.json'
    assert script.main(common + ['--model', f'local-dir:{folder}', '--out', str(again)]) == 0
    assert json.loads(again.read_text())['per_class'] == got['per_class']

    # the papers' test options run end to end: slide windows, two scales, flip
    assert script.main(common + ['--model', f'local-dir:{folder}', '--mode', 'slide', '--crop-size', '64', '64',
                                 '--stride', '48', '48', '--ratios', '0.75', '1.0', '--flip']) == 0
    assert 'slide 64x64 every 48x48, scale 192x128, ratios 0.75,1.0, flip' in capsys.readouterr().out

    assert script.main(common + ['--model', 'fpn', '--backbone', 'az_van_b0', '--num-classes', '3', '--checkpoint',
                                 str(checkpoint), '--model-kwargs', 'channels=16', 'fpn_channels=16']) == 1
    assert 'does not fit' in capsys.readouterr().err
    code = script.main(common[:1] + ['--split', 'test', '--model', f'local-dir:{folder}'])
    assert code == 1 and 'images/test does not exist' in capsys.readouterr().err
    # an annotation of another size than its image, read in a worker: one line, not its traceback
    annotation = sorted((root / 'annotations' / 'validation').iterdir())[0]
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(annotation)
    code = script.main(common[:1] + ['-j', '1', '--no-progress', '--model', f'local-dir:{folder}'])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith('error: ') and err.count('\n') == 1 and annotation.stem in err, err


def test_labels_the_model_cannot_predict_are_refused_not_dropped():
    from attnzoo.recipes.evaluation.common import ClassCountMismatchError
    from attnzoo.recipes.evaluation.segmentation import evaluate_segmentation
    data = [(torch.rand(3, 8, 8), torch.full((8, 8), 3))]  # label 3 for a 3-class model (0..2)
    with pytest.raises(ClassCountMismatchError, match='label 3, but the model predicts 3 classes'):
        evaluate_segmentation(torch.nn.Conv2d(3, 3, 1), data, 3, mean=(0, 0, 0), std=(1, 1, 1), scale=None,
                              workers=0, progress=False)
