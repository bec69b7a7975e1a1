"""NIfTI volumes: read and write through nibabel keeping data, affine and spacing; synthetic tumour
volumes; a torch Dataset over an image + label folder.

Folder layout (the Medical Segmentation Decathlon's, which MONAI's ``DecathlonDataset`` reads)::

    root/imagesTr/<case>.nii.gz    image, 3D (one channel) or 4D (x, y, z, channels)
    root/labelsTr/<case>.nii.gz    label map, 3D integers, 0 the background

Arrays keep the file's voxel axes (i, j, k), called (D, H, W) here; ``spacing`` is the voxel
size along those axes in millimetres (the header's zooms, i.e. the affine's column norms), so a
distance computed on the array with that spacing (MONAI's ``HausdorffDistanceMetric(...)(pred,
label, spacing=spacing)``) is in millimetres.

nibabel is imported inside the functions that read or write, so importing this module (or
``attnzoo``) never imports it.
"""
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    'Volume', 'read_nifti', 'write_nifti', 'to_ras', 'synthetic_volume', 'write_synthetic_volumes', 'VolumeDataset',
]

PathLike = Union[str, os.PathLike]
_SUFFIXES = ('.nii.gz', '.nii')


@dataclass(frozen=True)
class Volume:
    """A NIfTI volume: ``data`` as stored (3D, or 4D with channels last), the voxel-to-world
    ``affine`` (4, 4) and the voxel ``spacing`` (3,) in millimetres along the array's first three axes."""
    data: np.ndarray
    affine: np.ndarray
    spacing: Tuple[float, float, float]


def read_nifti(path: PathLike) -> Volume:
    """Read a ``.nii`` / ``.nii.gz`` file: its voxels (on-disk dtype, or float where the header
    scales them), affine and spacing."""
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'no NIfTI file at {path}')
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises several types for truncated or foreign files
        raise ValueError(f'{path} is not a readable NIfTI file: {e}') from e
    if data.ndim not in (3, 4):
        raise ValueError(f'{path} holds a {data.ndim}-D array; volumes are 3D, or 4D with channels last')
    affine = np.asarray(img.affine, dtype=np.float64)
    # the affine's own spacing: a header whose qform and sform disagree has zooms of the qform while
    # nibabel's affine is the sform, and predictions are written on that affine
    spacing = tuple(float(z) for z in np.linalg.norm(affine[:3, :3], axis=0))
    return Volume(np.asarray(data), affine, spacing)


def to_ras(volume: Volume) -> Volume:
    """``volume`` with its array axes permuted and flipped to the closest RAS orientation (as MONAI's
    ``Orientation('RAS')`` and nibabel's ``as_closest_canonical`` do), its affine and spacing with
    them: the same voxels in the same world positions, so volumes stored LPS, RAS or another way
    reach a model alike."""
    from nibabel import orientations as orient
    transform = orient.ornt_transform(orient.io_orientation(volume.affine), orient.axcodes2ornt('RAS'))
    data = orient.apply_orientation(volume.data, transform)  # the first three axes; channels stay last
    affine = volume.affine @ orient.inv_ornt_aff(transform, volume.data.shape[:3])
    spacing = tuple(float(z) for z in np.linalg.norm(affine[:3, :3], axis=0))
    return Volume(np.ascontiguousarray(data), affine, spacing)


def write_nifti(
        path: PathLike,
        data: np.ndarray,
        affine: Optional[np.ndarray] = None,
        spacing: Optional[Sequence[float]] = None,
) -> Path:
    """Write ``data`` (3D, or 4D channels last) as NIfTI (gzipped for a ``.nii.gz`` name).

    Give ``affine`` (4, 4), or ``spacing`` (3,) for a diagonal affine at the origin, or neither
    (1 mm isotropic); the written header's spacing is the affine's column norms. int64 data is
    stored as int32 (NIfTI tools read no int64), the values checked to fit.
    """
    import nibabel as nib

    path = Path(path)
    if not path.name.endswith(_SUFFIXES):
        raise ValueError(f'a NIfTI file name ends with .nii or .nii.gz, got {path.name}')
    data = np.asarray(data)
    if data.ndim not in (3, 4):
        raise ValueError(f'volumes are 3D, or 4D with channels last; got shape {data.shape}')
    if affine is not None and spacing is not None:
        raise ValueError('give affine or spacing, not both (the spacing is the affine\'s column norms)')
    if affine is None:
        affine = np.diag([*(spacing if spacing is not None else (1., 1., 1.)), 1.])
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f'affine must be 4 x 4, got shape {affine.shape}')
    if data.dtype == np.int64:
        if data.size and (data.min() < np.iinfo(np.int32).min or data.max() > np.iinfo(np.int32).max):
            raise ValueError('int64 data outside the int32 range cannot be written as NIfTI')
        data = data.astype(np.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    # both the qform and the sform carry the affine, so every reader finds the same geometry
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def synthetic_volume(
        rng: np.random.Generator,
        shape: Sequence[int] = (32, 32, 32),
        max_tumours: int = 2,
        min_radius: float = 0.12,
        max_radius: float = 0.25,
        noise: float = 0.06,
) -> Tuple[np.ndarray, np.ndarray]:
    """One synthetic case: ``(image float32 (D, H, W) in [0, 1], label uint8 (D, H, W))``.

    A background of random mean intensity with Gaussian noise holds 1 to ``max_tumours``
    ellipsoid "tumours", each with random semi-axes (between ``min_radius`` and ``max_radius`` of
    the shortest side), a random orientation and a random intensity brighter than the background
    (as a contrast-enhanced meningioma in T1). The label is 1 inside any tumour, 0 elsewhere.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f'synthetic volumes are 3D with sides of at least 8 voxels, got shape {shape}')
    if max_tumours < 1:
        raise ValueError(f'max_tumours must be at least 1, got {max_tumours}')
    short = min(shape)
    background = rng.uniform(0.15, 0.35)
    intensity = np.full(shape, background)
    label = np.zeros(shape, dtype=np.uint8)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing='ij'), -1)
    for _ in range(rng.integers(1, max_tumours + 1)):
        radii = rng.uniform(min_radius, max_radius, size=3) * short
        # the centre keeps the whole ellipsoid inside the volume, whatever its orientation
        centre = np.array([rng.uniform(radii.max(), s - 1 - radii.max()) for s in shape])
        rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        inside = ((((grid - centre) @ rotation) / radii) ** 2).sum(-1) <= 1
        intensity[inside] = rng.uniform(background + 0.25, 0.9)
        label[inside] = 1
    image = intensity + rng.normal(0, noise, size=shape)
    return np.clip(image, 0, 1).astype(np.float32), label


def write_synthetic_volumes(
        root: PathLike,
        num_cases: int = 4,
        shape: Sequence[int] = (32, 32, 32),
        spacing: Sequence[float] = (1., 1., 1.5),
        seed: int = 0,
        **kwargs: Any,
) -> List[Tuple[Path, Path]]:
    """Write ``num_cases`` synthetic cases (``synthetic_volume(**kwargs)``) into ``root`` in the
    Decathlon layout, ``case_000.nii.gz`` etc., with the given voxel ``spacing`` (mm); returns the
    (image, label) paths."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    paths = []
    for i in range(num_cases):
        image, label = synthetic_volume(rng, shape, **kwargs)
        name = f'case_{i:03d}.nii.gz'
        paths.append((write_nifti(root / 'imagesTr' / name, image, spacing=spacing),
                      write_nifti(root / 'labelsTr' / name, label, spacing=spacing)))
    return paths


def _case_name(path: Path) -> str:
    for suffix in _SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[:-len(suffix)]
    return path.name


class VolumeDataset(Dataset):
    """Image + label volumes of a Decathlon-layout folder (see the module docstring), as tensors.

    Each item is a dict: ``image`` float32 ``(C, D, H, W)`` (intensities as stored: normalising
    them, e.g. z-scoring, is the transform's or the recipe's business; the synthetic volumes lie in
    [0, 1]), ``label`` int64 ``(D, H, W)``, ``spacing`` float64 ``(3,)`` (mm, along D, H, W),
    ``affine`` float64 ``(4, 4)`` and ``shape`` ``(3,)`` (all three the image file's: a transform
    that resamples changes them, which the caller accounts for) and ``case`` (the file name without
    suffix). ``cases`` picks
    case names (default: every image). ``transform`` is called as ``sample = transform(**sample)``
    on ``{'image': (C, D, H, W) float32, 'label': (D, H, W) int64}`` numpy arrays before the
    conversion to tensors, and returns such a dict (to use MONAI's dict transforms, which take one
    dict and want a channel axis on the label, wrap them: ``lambda **s: tf(s)``). ``ras``: every
    case reoriented to RAS first (``to_ras``), its affine, spacing and shape with it, so cases
    stored in different orientations reach the model alike; predictions written on that affine
    still overlay the image.
    """

    def __init__(
            self,
            root: PathLike,
            cases: Optional[Sequence[str]] = None,
            transform: Optional[Callable[..., Dict[str, Any]]] = None,
            ras: bool = False,
    ):
        self.root = Path(root)
        images, labels = self.root / 'imagesTr', self.root / 'labelsTr'
        for folder in (images, labels):
            if not folder.is_dir():
                raise FileNotFoundError(
                    f'{self.root} is not a volume folder: {folder.name}/ is missing (expected imagesTr/ and labelsTr/)')
        found = {_case_name(p): p for p in sorted(images.iterdir()) if p.name.endswith(_SUFFIXES)}
        if not found:
            raise FileNotFoundError(f'no .nii / .nii.gz images in {images}')
        if cases is not None:
            missing = [c for c in cases if c not in found]
            if missing:
                raise FileNotFoundError(f'cases {missing} have no image in {images}')
            found = {c: found[c] for c in cases}
        self.samples: List[Tuple[str, Path, Path]] = []
        for name, image_path in found.items():
            label_path = next((labels / (name + s) for s in _SUFFIXES if (labels / (name + s)).is_file()), None)
            if label_path is None:
                raise FileNotFoundError(f'image {image_path.name} has no label {name}.nii(.gz) in {labels}')
            self.samples.append((name, image_path, label_path))
        self.transform = transform
        self.ras = ras

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        name, image_path, label_path = self.samples[index]
        image, label = read_nifti(image_path), read_nifti(label_path)
        if label.data.ndim != 3:
            raise ValueError(f'label {label_path} must be 3D, got shape {label.data.shape}')
        if image.data.shape[:3] != label.data.shape:
            raise ValueError(
                f'case {name}: image {image.data.shape} and label {label.data.shape} differ in size')
        if not np.allclose(image.affine, label.affine, atol=1e-4):
            raise ValueError(f'case {name}: image and label affines differ, the label is not on the image grid')
        if not np.issubdtype(label.data.dtype, np.integer) and not np.array_equal(label.data, np.round(label.data)):
            raise ValueError(f'label {label_path} holds non-integer values')
        if self.ras:
            image, label = to_ras(image), to_ras(label)
        data = image.data.astype(np.float32)
        data = data[None] if data.ndim == 3 else np.moveaxis(data, -1, 0)
        sample: Dict[str, Any] = {'image': np.ascontiguousarray(data), 'label': label.data.astype(np.int64)}
        if self.transform is not None:
            sample = self.transform(**sample)
        return {
            'image': torch.as_tensor(np.ascontiguousarray(sample['image']), dtype=torch.float32),
            'label': torch.as_tensor(np.ascontiguousarray(sample['label']), dtype=torch.int64),
            'spacing': torch.tensor(image.spacing, dtype=torch.float64),
            'affine': torch.from_numpy(image.affine),
            'shape': torch.tensor(label.data.shape),
            'case': name,
        }
