"""NIfTI volumes: round trips keep data, affine and spacing; HD95 in millimetres from that spacing;
the synthetic tumours; the folder dataset and its transform hook; clear errors for bad folders."""
import gzip

import numpy as np
import pytest
import torch

from attnzoo.recipes.data.volumes import (
    VolumeDataset,
    read_nifti,
    synthetic_volume,
    write_nifti,
    write_synthetic_volumes,
)


def _random_affine(rng):
    rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    spacing = rng.uniform(0.4, 3.0, size=3)
    affine = np.eye(4)
    affine[:3, :3] = rotation * spacing  # column j: the direction and length of voxel axis j
    affine[:3, 3] = rng.uniform(-100, 100, size=3)
    return affine, spacing


@pytest.mark.parametrize('suffix', ['.nii', '.nii.gz'])
@pytest.mark.parametrize('dtype,shape', [
    (np.float32, (7, 6, 5)), (np.int16, (5, 8, 3)), (np.uint8, (4, 4, 4)), (np.float32, (6, 5, 4, 2))])
def test_nifti_round_trip_keeps_data_affine_and_spacing(tmp_path, suffix, dtype, shape):
    rng = np.random.default_rng(0)
    data = (rng.normal(size=shape) * 50).astype(dtype)
    affine, spacing = _random_affine(rng)
    path = write_nifti(tmp_path / f'vol{suffix}', data, affine=affine)
    vol = read_nifti(path)
    assert vol.data.dtype == dtype and vol.data.shape == shape
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, affine, rtol=1e-6, atol=1e-4)  # the header stores float32
    np.testing.assert_allclose(vol.spacing, spacing, rtol=1e-6)
    if suffix == '.nii.gz':
        with gzip.open(path) as f:
            f.read(4)  # really gzipped


def test_spacing_alone_and_int64_labels(tmp_path):
    labels = np.random.default_rng(1).integers(0, 5, size=(6, 7, 8))
    vol = read_nifti(write_nifti(tmp_path / 'lab.nii.gz', labels, spacing=(0.5, 0.8, 2.5)))
    np.testing.assert_array_equal(vol.data, labels)
    np.testing.assert_allclose(vol.spacing, (0.5, 0.8, 2.5), rtol=1e-7)  # float32 in the header
    np.testing.assert_allclose(vol.affine, np.diag([0.5, 0.8, 2.5, 1]), rtol=1e-7)


def test_nifti_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match='no NIfTI file'):
        read_nifti(tmp_path / 'missing.nii.gz')
    (tmp_path / 'junk.nii.gz').write_bytes(b'not a nifti file at all')
    with pytest.raises(ValueError, match='not a readable NIfTI'):
        read_nifti(tmp_path / 'junk.nii.gz')
    with pytest.raises(ValueError, match='ends with .nii'):
        write_nifti(tmp_path / 'vol.npy', np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match='not both'):
        write_nifti(tmp_path / 'v.nii', np.zeros((2, 2, 2)), affine=np.eye(4), spacing=(1, 1, 1))
    with pytest.raises(ValueError, match='3D, or 4D'):
        write_nifti(tmp_path / 'v.nii', np.zeros((2, 2)))


def test_hd95_is_in_millimetres_from_the_files_spacing(tmp_path):
    from monai.metrics import HausdorffDistanceMetric

    spacing = (1.5, 0.7, 2.0)
    label, pred = np.zeros((12, 12, 12), np.uint8), np.zeros((12, 12, 12), np.uint8)
    label[3, 4, 5] = 1
    pred[3 + 4, 4, 5 + 1] = 1  # 4 voxels along the first axis, 1 along the last
    write_nifti(tmp_path / 'label.nii.gz', label, spacing=spacing)
    write_nifti(tmp_path / 'pred.nii.gz', pred, spacing=spacing)
    lab, prd = read_nifti(tmp_path / 'label.nii.gz'), read_nifti(tmp_path / 'pred.nii.gz')

    def onehot(a):
        t = torch.as_tensor(a.astype(np.int64))
        return torch.stack([t == 0, t == 1])[None].float()

    metric = HausdorffDistanceMetric(include_background=False, percentile=95)
    hd = metric(onehot(prd.data), onehot(lab.data), spacing=lab.spacing)
    torch.testing.assert_close(hd, torch.tensor([[np.hypot(4 * 1.5, 1 * 2.0)]], dtype=hd.dtype))
    # in voxels (no spacing) the same pair is 4.12 apart: the spacing is what makes it millimetres
    assert abs(metric(onehot(prd.data), onehot(lab.data)).item() - np.hypot(4, 1)) < 1e-6


def test_synthetic_volumes_hold_bright_ellipsoids_inside_the_volume():
    rng = np.random.default_rng(0)
    for _ in range(5):
        image, label = synthetic_volume(rng, (20, 24, 16), max_tumours=3)
        assert image.dtype == np.float32 and label.dtype == np.uint8 and image.shape == label.shape == (20, 24, 16)
        assert 0 <= image.min() and image.max() <= 1
        assert set(np.unique(label)) == {0, 1}
        # tumours stay inside: the border is background
        border = np.ones_like(label, bool)
        border[1:-1, 1:-1, 1:-1] = False
        assert not label[border].any()
        assert image[label == 1].mean() > image[label == 0].mean() + 0.2
    a = synthetic_volume(np.random.default_rng(3), (16, 16, 16))
    b = synthetic_volume(np.random.default_rng(3), (16, 16, 16))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match='at least 8'):
        synthetic_volume(rng, (4, 16, 16))


def test_volume_dataset_reads_the_folder_through_the_transform_hook(tmp_path):
    paths = write_synthetic_volumes(tmp_path, num_cases=3, shape=(12, 10, 8), spacing=(0.9, 0.9, 2.0), seed=1)
    ds = VolumeDataset(tmp_path)
    assert len(ds) == 3
    item = ds[1]
    assert item['case'] == 'case_001'
    assert item['image'].shape == (1, 12, 10, 8) and item['image'].dtype == torch.float32
    assert item['label'].shape == (12, 10, 8) and item['label'].dtype == torch.int64
    np.testing.assert_array_equal(item['label'].numpy(), read_nifti(paths[1][1]).data)
    torch.testing.assert_close(item['spacing'], torch.tensor([0.9, 0.9, 2.0], dtype=torch.float64))
    assert item['shape'].tolist() == [12, 10, 8]

    seen = {}

    def flip(image, label):
        seen.update(image=(image.shape, image.dtype), label=(label.shape, label.dtype))
        return {'image': image[:, ::-1], 'label': label[::-1]}

    flipped = VolumeDataset(tmp_path, cases=['case_001'], transform=flip)[0]
    assert seen == {'image': ((1, 12, 10, 8), np.float32), 'label': ((12, 10, 8), np.int64)}
    torch.testing.assert_close(flipped['label'], item['label'].flip(0))

    # MONAI's dict transforms, wrapped as the hook's docstring says
    from monai.transforms import NormalizeIntensityd

    z = VolumeDataset(tmp_path, transform=lambda **s: NormalizeIntensityd(keys='image')(s))[0]['image']
    assert abs(z.mean().item()) < 1e-4 and abs(z.std(unbiased=False).item() - 1) < 1e-3


def test_bad_volume_folders_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match='imagesTr'):
        VolumeDataset(tmp_path)
    write_synthetic_volumes(tmp_path, num_cases=2, shape=(8, 8, 8))
    with pytest.raises(FileNotFoundError, match='have no image'):
        VolumeDataset(tmp_path, cases=['case_009'])
    (tmp_path / 'labelsTr' / 'case_001.nii.gz').unlink()
    with pytest.raises(FileNotFoundError, match='has no label'):
        VolumeDataset(tmp_path)
    write_nifti(tmp_path / 'labelsTr' / 'case_001.nii.gz', np.zeros((8, 8, 9), np.uint8))
    with pytest.raises(ValueError, match='differ in size'):
        VolumeDataset(tmp_path)[1]
    write_nifti(tmp_path / 'labelsTr' / 'case_001.nii.gz', np.zeros((8, 8, 8), np.uint8), spacing=(2, 2, 2))
    with pytest.raises(ValueError, match='affines differ'):
        VolumeDataset(tmp_path)[1]


def test_spacing_is_the_affines_where_qform_and_sform_disagree(tmp_path):
    # nibabel's affine is the sform; the header's zooms are the qform's: the spacing goes with the affine
    import nibabel as nib
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.diag([1., 1., 1., 1.]))
    img.set_sform(np.diag([0.8, 0.9, 3.0, 1.]), code=1)
    nib.save(img, tmp_path / 'v.nii.gz')
    volume = read_nifti(tmp_path / 'v.nii.gz')
    np.testing.assert_allclose(volume.affine, np.diag([0.8, 0.9, 3.0, 1.]))
    assert volume.spacing == pytest.approx((0.8, 0.9, 3.0))


def _task(num_classes=3):
    from attnzoo.recipes.tasks import MedicalSegmentationTask
    task = MedicalSegmentationTask(arch='agunet', spatial_dims=2, in_chans=1, num_classes=num_classes,
                                   model_kwargs={'channels': [4, 8]})
    task.configure_models()
    return task


def test_case_dice_counts_false_positives_and_leaves_out_classes_absent_from_both():
    from monai.metrics import compute_dice
    from monai.networks.utils import one_hot
    label = torch.zeros(3, 8, 8, dtype=torch.long)
    pred = torch.zeros(3, 8, 8, dtype=torch.long)
    label[0, :4], pred[0, :4] = 1, 1          # class 1 found exactly; class 2 absent from both
    pred[1, 2:5, 2:5] = 2                     # a tumour-free case with a false positive of class 2
    label[2, :2], pred[2, 1:3] = 2, 2         # class 2 half found; class 1 absent from both
    logits = one_hot(pred[:, None], 3) * 10.
    dice, _ = _task()._scores(logits, label, None)
    # MONAI's ignore_empty=False per class, with the classes absent from both left out
    per_class = compute_dice(one_hot(pred[:, None], 3), one_hot(label[:, None], 3), include_background=False,
                             ignore_empty=False)
    torch.testing.assert_close(dice, torch.stack([per_class[0, 0], per_class[1, 1], per_class[2, 1]]))
    torch.testing.assert_close(dice, torch.tensor([1.0, 0.0, 0.5]))


def test_labels_outside_the_class_count_and_one_class_are_refused():
    task = _task()
    label = torch.zeros(1, 8, 8, dtype=torch.long)
    label[0, 0, 0] = 4
    with pytest.raises(ValueError, match='labels hold values from 0 to 4, outside 0..2 of num_classes=3'):
        task._scores(torch.randn(1, 3, 8, 8), label, None)
    with pytest.raises(ValueError, match='outside 0..2'):
        task.training_step({'image': torch.randn(1, 1, 8, 8), 'label': label}, 0)
    with pytest.raises(ValueError, match='num_classes counts the background too: at least 2, got 1'):
        _task(num_classes=1)


def test_predictions_on_another_grid_than_the_image_are_not_written(tmp_path):
    from attnzoo.recipes.tasks import MedicalSegmentationTask
    batch = {'labels': torch.zeros(1, 6, 5, 4, dtype=torch.uint8), 'cases': ['case_000'],
             'affines': torch.eye(4)[None], 'shapes': [[12, 10, 8]]}
    with pytest.raises(ValueError, match=r'case case_000: predicted on a \(6, 5, 4\) grid, its image is \(12, 10, 8\)'):
        MedicalSegmentationTask.write_predictions([batch], str(tmp_path / 'out'))
    batch['shapes'] = [[6, 5, 4]]
    MedicalSegmentationTask.write_predictions([batch], str(tmp_path / 'out'))
    assert read_nifti(tmp_path / 'out' / 'case_000.nii.gz').data.shape == (6, 5, 4)


def test_ras_reorients_cases_stored_in_other_orientations_alike(tmp_path):
    # one volume written RAS and LPS-flipped with the matching affine: the same voxels in the same
    # world positions, which ras=True reads as the same arrays (MONAI's Orientation('RAS') agrees)
    from monai.transforms import Orientation
    rng = np.random.default_rng(0)
    data = rng.random((6, 5, 4)).astype(np.float32)
    label = (data > 0.5).astype(np.int64)
    ras_affine = np.diag([0.8, 0.9, 2.0, 1.0])
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps_affine = ras_affine @ flip
    lps_affine[:2, 3] = [0.8 * 5, 0.9 * 4]  # voxel (i, j) of the flipped array sits where (5 - i, 4 - j) did
    for name, volume, affine in (('ras', data, ras_affine), ('lps', data[::-1, ::-1].copy(), lps_affine)):
        for folder, array in (('imagesTr', volume), ('labelsTr', (volume > 0.5).astype(np.int64))):
            (tmp_path / name / folder).mkdir(parents=True, exist_ok=True)
            write_nifti(tmp_path / name / folder / 'case.nii.gz', array, affine=affine)
    items = [VolumeDataset(tmp_path / name, ras=True)[0] for name in ('ras', 'lps')]
    for key in ('image', 'label', 'spacing', 'affine'):
        torch.testing.assert_close(items[0][key], items[1][key])
    np.testing.assert_array_equal(items[1]['label'].numpy(), label)
    # MONAI's own loading and reorientation of the LPS file gives the same array
    from monai.transforms import EnsureChannelFirst, LoadImage
    monai = Orientation('RAS')(EnsureChannelFirst()(LoadImage(image_only=True)(tmp_path / 'lps' / 'imagesTr' /
                                                                             'case.nii.gz')))
    np.testing.assert_allclose(np.asarray(monai), items[1]['image'].numpy())
    # without ras the arrays are as stored
    assert torch.equal(VolumeDataset(tmp_path / 'lps')[0]['image'][0], torch.from_numpy(data[::-1, ::-1].copy()))


@pytest.mark.parametrize('num_classes', [2, 3])
def test_a_class_count_above_every_label_is_warned_after_validation(num_classes):
    import warnings

    import pytorch_lightning as pl
    from torch.utils.data import DataLoader
    rng = torch.Generator().manual_seed(0)
    cases = [{'image': torch.rand(1, 16, 16, generator=rng), 'label': (torch.rand(16, 16, generator=rng) > 0.7).long()}
             for _ in range(4)]
    trainer = pl.Trainer(accelerator='cpu', logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        trainer.validate(_task(num_classes), DataLoader(cases, batch_size=2), verbose=False)
    warned = [str(w.message) for w in seen if 'never occur' in str(w.message)]
    # labels 0 and 1 only: a third class is warned about, once; two classes fit them
    assert warned == ([] if num_classes == 2 else [
        'num_classes=3, but no label of the validation split (nor of the first training batch) is above 1: '
        'classes 2..2 never occur, and their outputs only learn to be absent; set num_classes to the largest '
        'label + 1 if that is not meant'])
