"""Image inputs refused before any work: a mask on another grid, a non-finite affine, an ambiguous .mat."""

import nibabel as nib
import numpy as np
import pytest
from scipy.io import savemat

from sklearn_crb.io.images import load_coefficients, load_mask, make_mask

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


@pytest.fixture
def image(tmp_path):
    c = (np.arange(4 * 5 * 2 * 3) + 1j).reshape(4, 5, 2, 3).astype(np.complex64)
    nib.save(nib.Nifti1Image(c, AFFINE), tmp_path / "c.nii.gz")
    return load_coefficients(tmp_path / "c.nii.gz")


def test_a_mask_on_another_grid_is_refused_like_field_maps(image, tmp_path):
    shifted = AFFINE.copy()
    shifted[0, 3] = 2.0  # one voxel along x
    nib.save(nib.Nifti1Image(np.ones((4, 5, 2), np.uint8), shifted), tmp_path / "m.nii.gz")
    with pytest.raises(ValueError, match=r"^mask: the affine of .*m.nii.gz .* differs from the coefficient image"):
        make_mask(image, tmp_path / "m.nii.gz")
    with pytest.raises(ValueError, match=r"^--mask: the affine"):
        load_mask(tmp_path / "m.nii.gz", image, "--mask")
    nib.save(nib.Nifti1Image(np.ones((4, 5, 2), np.uint8), AFFINE), tmp_path / "same.nii.gz")
    assert make_mask(image, tmp_path / "same.nii.gz")[0].any()
    np.save(tmp_path / "m.npy", np.ones((4, 5, 2)))  # no affine: taken on the image grid, its shape checked
    assert make_mask(image, tmp_path / "m.npy")[0].all()


def test_a_nifti_with_a_non_finite_affine_is_refused_when_read(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((3, 3, 1, 2), np.complex64), AFFINE), tmp_path / "nan.nii")
    raw = bytearray((tmp_path / "nan.nii").read_bytes())  # nibabel writes finite affines: patch the header
    raw[252:256] = np.array([0, 1], "<i2").tobytes()  # qform_code 0, sform_code 1: the sform is the affine
    raw[280:284] = np.array([np.nan], "<f4").tobytes()  # srow_x[0]
    (tmp_path / "nan.nii").write_bytes(bytes(raw))
    assert not np.all(np.isfinite(nib.load(tmp_path / "nan.nii").affine))
    with pytest.raises(ValueError, match=r"^coefficients: .*nan.nii has a non-finite affine"):
        load_coefficients(tmp_path / "nan.nii")


def test_a_mat_file_with_several_arrays_says_how_to_pick_one(tmp_path):
    savemat(tmp_path / "c.mat", {"a": np.ones((3, 3, 4)), "b": np.ones((3, 3, 4))})
    with pytest.raises(ValueError, match=r"several arrays \['a', 'b'\].*under one of those names.*key="):
        load_coefficients(tmp_path / "c.mat")
