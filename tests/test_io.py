"""Coefficient-image and basis I/O, masks, atomic NIfTI output."""

import gzip
import os

import h5py
import nibabel as nib
import numpy as np
import pytest
from scipy.io import savemat

from sklearn_crb._atomic import atomic_path
from sklearn_crb.io.images import load_basis, load_coefficients, make_mask, save_maps, save_nifti

RNG = np.random.default_rng(0)
AFFINE = np.array([[1.5, 0, 0, -40], [0, 1.2, 0.1, -60], [0, 0, 3.0, 10], [0, 0, 0, 1]])


def _coef(shape=(6, 5, 4), r=7):
    return RNG.standard_normal(shape + (r,)) + 1j * RNG.standard_normal(shape + (r,))


def _orthonormal(n, r, seed=1):
    rng, rng1 = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    A = rng.standard_normal((n, r)) + 1j * rng1.standard_normal((n, r))
    return np.linalg.qr(A)[0]


def test_nifti_complex_and_2r_channels_round_trip(tmp_path):
    c = _coef().astype(np.complex64)
    nib.save(nib.Nifti1Image(c, AFFINE), tmp_path / "c.nii.gz")
    img = load_coefficients(tmp_path / "c.nii.gz")
    np.testing.assert_array_equal(img.data, c.astype(np.complex128))
    np.testing.assert_allclose(img.affine, AFFINE, atol=1e-6)
    real = np.concatenate([c.real, c.imag], axis=-1).astype(np.float32)
    nib.save(nib.Nifti1Image(real, AFFINE), tmp_path / "r.nii")
    img2 = load_coefficients(tmp_path / "r.nii", rank=7)
    np.testing.assert_array_equal(img2.data, img.data)


def test_saved_maps_keep_affine_and_header(tmp_path):
    c = _coef()
    hdr = nib.Nifti1Header()
    hdr.set_xyzt_units("mm", "sec")
    hdr.set_data_dtype(np.complex64)
    src = nib.Nifti1Image(c.astype(np.complex64), AFFINE, header=hdr)
    src.header.set_zooms((1.5, 1.2, 3.0, 1.0))
    nib.save(src, tmp_path / "c.nii.gz")
    img = load_coefficients(tmp_path / "c.nii.gz")
    m = RNG.standard_normal(img.spatial_shape)
    paths = save_maps({"m0s": m, "flags": np.ones(img.spatial_shape, np.int16)}, tmp_path / "out",
                      affine=img.affine, header=img.header)
    back = nib.load(paths["m0s"])
    np.testing.assert_allclose(back.affine, AFFINE, atol=1e-5)
    np.testing.assert_allclose(back.get_fdata(), m.astype(np.float32))
    assert back.header.get_xyzt_units() == ("mm", "sec")
    assert back.shape == img.spatial_shape
    assert nib.load(paths["flags"]).get_data_dtype() == np.int16
    assert sorted(os.listdir(tmp_path / "out")) == ["flags.nii.gz", "m0s.nii.gz"]  # no staging leftovers


def test_matlab_v5_v73_and_numpy_agree(tmp_path):
    c = _coef((4, 3), 5)
    savemat(tmp_path / "v5.mat", {"coefficients": c, "other": np.ones(3)})
    # MATLAB v7.3 is HDF5, column-major (axes reversed), complex as a {real, imag} compound
    dt = np.dtype([("real", "<f8"), ("imag", "<f8")])
    rec = np.empty(c.T.shape, dt)
    rec["real"], rec["imag"] = c.T.real, c.T.imag
    with h5py.File(tmp_path / "v73.mat", "w", userblock_size=512) as f:
        f.create_dataset("x", data=rec)
    np.save(tmp_path / "c.npy", c)
    np.savez(tmp_path / "c.npz", coefficients=c)
    for name in ("v5.mat", "v73.mat", "c.npy", "c.npz"):
        np.testing.assert_array_equal(load_coefficients(tmp_path / name).data, c, err_msg=name)
    with pytest.raises(ValueError, match="no variable 'nope'"):
        load_coefficients(tmp_path / "v5.mat", key="nope")


def test_basis_loading_and_checks(tmp_path):
    U = _orthonormal(40, 6)
    np.save(tmp_path / "U.npy", U)
    np.testing.assert_allclose(load_basis(tmp_path / "U.npy", n_pulses=40), U)
    savemat(tmp_path / "Ut.mat", {"basis": U.T})  # (r, n_pulses) is transposed back
    np.testing.assert_allclose(load_basis(tmp_path / "Ut.mat", n_pulses=40), U)
    with pytest.raises(ValueError, match="basis has 40 rows but the sequence has 50 pulses"):
        load_basis(tmp_path / "U.npy", n_pulses=50)
    with pytest.raises(ValueError, match="orthonormal"):
        load_basis(2 * U)
    with pytest.raises(ValueError, match="rank 6"):
        load_basis(U, rank=5)


def test_rank_and_channel_mismatches_are_clear_errors(tmp_path):
    c = _coef((4, 4), 5)
    np.save(tmp_path / "c.npy", c)
    with pytest.raises(ValueError, match="rank 5 .* basis has rank 6"):
        load_coefficients(tmp_path / "c.npy", basis=_orthonormal(30, 6))
    np.save(tmp_path / "odd.npy", np.ones((3, 3, 7)))
    with pytest.raises(ValueError, match="odd number of channels"):
        load_coefficients(tmp_path / "odd.npy")
    np.save(tmp_path / "real.npy", np.ones((3, 3, 5)))
    with pytest.raises(ValueError, match="needs complex data or 10 real channels"):
        load_coefficients(tmp_path / "real.npy", rank=5)


def test_truncated_and_invalid_files(tmp_path):
    c = _coef()
    nib.save(nib.Nifti1Image(c.astype(np.complex64), AFFINE), tmp_path / "c.nii.gz")
    raw = gzip.decompress((tmp_path / "c.nii.gz").read_bytes())
    (tmp_path / "trunc.nii").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "trunc.nii.gz").write_bytes((tmp_path / "c.nii.gz").read_bytes()[:200])
    (tmp_path / "junk.mat").write_bytes(b"not a mat file at all" * 10)
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    for name in ("trunc.nii", "trunc.nii.gz", "junk.mat", "junk.npy"):
        with pytest.raises(ValueError, match="truncated|not a|readable"):
            load_coefficients(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        load_coefficients(tmp_path / "missing.nii")
    with pytest.raises(ValueError, match="unsupported file type"):
        (tmp_path / "c.txt").write_text("1 2 3")
        load_coefficients(tmp_path / "c.txt")


def test_masks_exclude_nan_and_zero_voxels():
    c = _coef((8, 8), 4)
    c[0, 0] = 0
    c[1, 1, 2] = np.nan
    c[2, 2] = 1e-4 * c[2, 2]  # background noise level
    auto, invalid = make_mask(c)
    assert invalid[0, 0] and invalid[1, 1] and invalid.sum() == 2
    assert not auto[0, 0] and not auto[1, 1] and not auto[2, 2]
    assert auto.sum() == 64 - 3
    given, _ = make_mask(c, np.ones((8, 8)))
    assert given.sum() == 62  # a given mask still drops invalid voxels
    with pytest.raises(ValueError, match=r"mask has shape \(8, 7\) but the image has spatial shape \(8, 8\)"):
        make_mask(c, np.ones((8, 7)))


def test_atomic_writes_leave_nothing_on_failure(tmp_path):
    target = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with pytest.raises(TypeError):
        save_nifti(target, np.array([["a"]]))
    assert os.listdir(tmp_path) == []
    save_nifti(target, np.ones((2, 2, 2)), AFFINE)
    assert os.listdir(tmp_path) == ["out.nii.gz"]
