"""Reading coefficient images and bases, masks, and atomic NIfTI output.

MR fingerprinting reconstructions in a low-rank subspace (Zhang et al., MRM
2022; Assländer et al., MRM 2018) arrive as *coefficient images*: one complex
coefficient ``c_k = (U^H s)_k`` per basis vector per voxel. This module reads
them from

* NIfTI (``.nii``, ``.nii.gz``): complex data, or ``2 r`` real channels
  ordered ``[Re c_1 .. Re c_r, Im c_1 .. Im c_r]`` on the last axis;
* MATLAB v5 (``scipy.io.loadmat``) and v7.3 (HDF5, via ``h5py``);
* NumPy (``.npy``, ``.npz``),

always with the coefficient axis last, and checks every mismatch (rank versus
basis, basis length versus sequence, mask shape versus image) before any
work starts. Outputs are written atomically: to a temporary file in the
target directory, then moved into place with ``os.replace``
(:mod:`sklearn_crb._atomic`), so an interrupted run never leaves a partly
written file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sklearn_crb._atomic import atomic_path
from sklearn_crb.io._files import atomic_files, check_file_name

__all__ = [
    "CoefficientImage",
    "load_coefficients",
    "load_basis",
    "load_array",
    "make_mask",
    "check_rank",
    "check_same_grid",
    "load_mask",
    "AFFINE_TOL",
    "save_nifti",
    "save_maps",
    "features_from_coefficients",
]

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: Variable names tried, in order, when a MATLAB/npz file holds several arrays.
_COEF_KEYS = ("coefficients", "coef", "coeffs", "x", "img", "image", "data")
_BASIS_KEYS = ("basis", "U", "u", "V", "Phi")


@dataclass
class CoefficientImage:
    """A complex coefficient image with its spatial metadata.

    Attributes
    ----------
    data : ndarray, complex128, shape (*spatial, rank)
        Coefficients, the coefficient axis last.
    affine : ndarray, shape (4, 4)
        Voxel-to-world transform (identity for MATLAB/NumPy input).
    header : nibabel header or None
        The input NIfTI header, reused when maps are saved.
    path : str or None
        Where the data came from.
    """

    data: np.ndarray
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    header: object = None
    path: str | None = None

    @property
    def rank(self):
        return int(self.data.shape[-1])

    @property
    def spatial_shape(self):
        return tuple(self.data.shape[:-1])


# ------------------------------------------------------------------- reading
def _is_nifti(path):
    return str(path).lower().endswith(_NIFTI_SUFFIXES)


def _check_file(path, argname):
    try:
        path = Path(os.fspath(path))
    except TypeError:
        raise TypeError(f"{argname} must be a path, got {type(path).__name__}") from None
    if not path.is_file():
        raise FileNotFoundError(f"{argname}: file not found: {path}")
    return path


def _pick(variables, key, preferred, path, argname):
    if key is not None:
        if key not in variables:
            raise ValueError(f"{argname}: {path} has no variable {key!r} (found {sorted(variables)})")
        return variables[key]
    if len(variables) == 1:
        return next(iter(variables.values()))
    for k in preferred:
        if k in variables:
            return variables[k]
    raise ValueError(f"{argname}: {path} holds several arrays {sorted(variables)} and none has a name this input "
                     f"looks for {list(preferred)}: save the array to use under one of those names, or alone in "
                     "its file (Python: pass key=)")


def _h5_to_numpy(ds):
    arr = ds[()]
    if arr.dtype.names and {"real", "imag"} <= set(arr.dtype.names):
        arr = arr["real"] + 1j * arr["imag"]
    # MATLAB writes column-major: h5py sees the axes reversed
    return np.asarray(arr).transpose(tuple(range(arr.ndim))[::-1])


def _read_mat(path, argname):
    # MATLAB readers are imported on demand: most inputs are NIfTI or NumPy
    import h5py
    from scipy.io import loadmat

    # v7.3 is HDF5: tell it by its signature first, since scipy before 1.15 reads some HDF5 files as v5 garbage
    if not h5py.is_hdf5(path):
        try:
            return {k: v for k, v in loadmat(path).items() if not k.startswith("__")}
        except Exception as exc:  # noqa: BLE001 - any parse error means an unreadable file
            raise ValueError(f"{argname}: {path} is not a readable MATLAB file ({exc})") from exc

    try:
        with h5py.File(path, "r") as f:
            return {k: _h5_to_numpy(f[k]) for k in f.keys() if isinstance(f[k], h5py.Dataset)
                    and not k.startswith("#")}
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{argname}: {path} is not a readable MATLAB v7.3 (HDF5) file ({exc})") from exc


def load_array(path, key=None, argname="path", preferred=_COEF_KEYS):
    """Read one numeric (or boolean, returned as uint8) array from NIfTI, MATLAB (v5/v7.3) or NumPy.

    Returns
    -------
    array : ndarray
    affine : ndarray (4, 4)
    header : nibabel header or None
    """
    path = _check_file(path, argname)
    name = path.name.lower()
    affine, header = np.eye(4), None
    try:
        if _is_nifti(name):
            import nibabel as nib  # heavy; only NIfTI input needs it

            img = nib.load(str(path))
            affine, header = np.asarray(img.affine, dtype=float), img.header
            if not np.all(np.isfinite(affine)):  # refused here, not when the maps are written after the fit
                raise ValueError(f"{argname}: {path} has a non-finite affine (voxel-to-world transform) "
                                 f"{np.round(affine, 4).tolist()}; fix its qform/sform")
            arr = np.asanyarray(img.dataobj)
        elif name.endswith(".npy"):
            arr = np.load(path, allow_pickle=False)
        elif name.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                arr = _pick({k: z[k] for k in z.files}, key, preferred, path, argname)
        elif name.endswith(".mat"):
            arr = _pick(_read_mat(path, argname), key, preferred, path, argname)
        else:
            raise ValueError(f"{argname}: unsupported file type {path.name!r}; use .nii, .nii.gz, .mat, .npy or .npz")
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt files raise many types
        if str(exc).startswith(f"{argname}:"):  # our own, already explicit
            raise
        raise ValueError(f"{argname}: {path} is truncated or not a valid file ({type(exc).__name__}: {exc})") from exc
    arr = np.asarray(arr)
    if arr.dtype == bool:  # a boolean mask saved with NumPy or MATLAB
        arr = arr.astype(np.uint8)
    if arr.dtype.names or not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"{argname}: {path} does not hold a numeric array (dtype {arr.dtype})")
    return arr, affine, header


def _to_complex(arr, rank, argname):
    """Coefficient axis last: complex, or 2r real channels [Re..., Im...]."""
    if arr.ndim < 2:
        raise ValueError(f"{argname} must have spatial axes and a coefficient axis last, got shape {arr.shape}")
    if arr.ndim == 5 and arr.shape[3] == 1:  # NIfTI vector images: (x, y, z, 1, r)
        arr = arr[:, :, :, 0, :]
    if np.iscomplexobj(arr):
        c = arr.astype(np.complex128)
    else:
        n = arr.shape[-1]
        if rank is not None and n == rank:
            raise ValueError(f"{argname} is real with {n} channels, but rank {rank} needs complex data "
                             f"or {2 * rank} real channels [Re c1..c{rank}, Im c1..c{rank}]")
        if n % 2:
            raise ValueError(f"{argname} is real with an odd number of channels ({n}) on its last axis; "
                             "expected complex data or 2r channels [Re c1..c_r, Im c1..c_r]")
        r = n // 2
        c = arr[..., :r].astype(np.float64) + 1j * arr[..., r:].astype(np.float64)
    if rank is not None:
        check_rank(c.shape[-1], rank, argname)
    return c


def check_rank(image_rank, basis_rank, argname="coefficients"):
    """Raise ``ValueError`` if the image rank differs from the basis rank."""
    if int(image_rank) != int(basis_rank):
        raise ValueError(f"{argname} has rank {image_rank} (coefficients on its last axis) but the basis has "
                         f"rank {basis_rank}: they must come from the same reconstruction")


def load_coefficients(path, *, rank=None, basis=None, key=None):
    """Load a coefficient image.

    Parameters
    ----------
    path : str or path-like
        ``.nii``/``.nii.gz`` (complex, or ``2 r`` real channels
        ``[Re c_1..c_r, Im c_1..c_r]`` on the last axis), ``.mat`` (v5 or
        v7.3), ``.npy`` or ``.npz``. The coefficient axis is last.
    rank : int, optional
        Expected rank; also resolves a real image with ``2 r`` channels.
    basis : array_like (n_pulses, r), optional
        The reconstruction basis; its rank is checked against the image.
    key : str, optional
        Variable name inside ``.mat``/``.npz`` files.

    Returns
    -------
    CoefficientImage
    """
    if basis is not None:
        b_rank = np.shape(basis)[1] if np.ndim(basis) == 2 else None
        if rank is not None and b_rank is not None and rank != b_rank:
            raise ValueError(f"rank={rank} disagrees with the basis rank {b_rank}")
        rank = b_rank if rank is None else rank
    arr, affine, header = load_array(path, key, "coefficients")
    c = _to_complex(arr, rank, "coefficients")
    return CoefficientImage(c, affine, header, os.fspath(path))


def load_basis(path, *, n_pulses=None, rank=None, key=None, check_orthonormal=True):
    """Load a compression basis ``U`` of shape (n_pulses, r).

    Parameters
    ----------
    path : str, path-like or array_like
        A file (same formats as :func:`load_coefficients`) or an array.
    n_pulses : int, optional
        Sequence length the basis must match (e.g. ``sequence.n_pulses``).
    rank : int, optional
        Expected rank.
    key : str, optional
        Variable name inside ``.mat``/``.npz`` files.
    check_orthonormal : bool
        Require ``U^H U = I`` (to 1e-6).

    Returns
    -------
    U : ndarray, complex128, shape (n_pulses, r)
    """
    if isinstance(path, (str, os.PathLike)):
        U, _, _ = load_array(path, key, "basis", preferred=_BASIS_KEYS)
    else:
        U = np.asarray(path)
    if U.ndim != 2:
        raise ValueError(f"basis must be a 2-D array (n_pulses, rank), got shape {U.shape}")
    if not np.issubdtype(U.dtype, np.number):
        raise TypeError(f"basis must be numeric, got dtype {U.dtype}")
    U = U.astype(np.complex128)
    if n_pulses is not None and U.shape[0] != n_pulses and U.shape[1] == n_pulses:
        U = U.T  # stored as (r, n_pulses)
    if n_pulses is not None and U.shape[0] != n_pulses:
        raise ValueError(f"basis has {U.shape[0]} rows but the sequence has {n_pulses} pulses: "
                         "the basis length must equal the sequence length")
    if U.shape[1] > U.shape[0]:
        raise ValueError(f"basis must be (n_pulses, rank) with rank <= n_pulses, got {U.shape}")
    if rank is not None:
        check_rank(rank, U.shape[1], "coefficients")
    if not np.all(np.isfinite(U)):
        raise ValueError("basis contains non-finite values")
    if check_orthonormal:
        err = np.abs(U.conj().T @ U - np.eye(U.shape[1])).max()
        if err > 1e-6:
            raise ValueError(f"basis must have orthonormal columns (max |U^H U - I| = {err:.2g})")
    return U


# ---------------------------------------------------------------------- masks
#: Largest difference (mm) between the affine of a mask or map and that of the coefficient image.
AFFINE_TOL = 1e-4


def check_same_grid(affine, header, image, argname, path=None):
    """Refuse an input on another voxel grid than the coefficient image's (both NIfTI: affines within AFFINE_TOL).

    Inputs without a header (MATLAB, NumPy) carry no affine and are taken
    on the image grid; their shape is checked by the caller.

    Raises
    ------
    ValueError
        Naming ``argname`` and both affines.
    """
    if header is None or not isinstance(image, CoefficientImage) or image.header is None:
        return
    if not np.allclose(np.asarray(affine, dtype=float), image.affine, rtol=0, atol=AFFINE_TOL):
        raise ValueError(f"{argname}: the affine of {path if path is not None else 'the input'} "
                         f"{np.round(affine, 4).tolist()} differs from the coefficient image's "
                         f"{np.round(image.affine, 4).tolist()} (tolerance {AFFINE_TOL} mm): resample it onto the "
                         "image grid first")


def load_mask(path, image, argname="mask"):
    """Read a mask file for ``image``: numeric, and on its grid (:func:`check_same_grid`).

    Returns the array (non-zero = fit); its shape is checked by :func:`make_mask`.
    """
    arr, affine, header = load_array(path, None, argname, preferred=("mask",))
    check_same_grid(affine, header, image, argname, path)
    return arr


def make_mask(coefficients, mask=None, *, threshold=0.05):
    """Voxels to fit: a given mask, or an automatic one.

    Parameters
    ----------
    coefficients : ndarray, complex, shape (*spatial, r), or CoefficientImage
    mask : None, array_like of shape ``spatial`` or path
        A given mask (non-zero = fit); a NIfTI mask of a NIfTI image must
        have its affine (:func:`check_same_grid`). It is still intersected with the
        voxels whose coefficients are finite and not all zero.
    threshold : float
        Automatic mask: keep voxels whose coefficient norm ``||c||`` is at
        least ``threshold`` times the 99th percentile of the non-zero norms
        (removes background noise; ``0`` keeps every non-zero voxel).

    Returns
    -------
    mask : ndarray of bool, shape ``spatial``
    invalid : ndarray of bool, shape ``spatial``
        Voxels with non-finite or all-zero coefficients (flagged in maps).
    """
    c = coefficients.data if isinstance(coefficients, CoefficientImage) else np.asarray(coefficients)
    spatial = c.shape[:-1]
    finite = np.all(np.isfinite(c), axis=-1)
    norm = np.sqrt(np.sum(np.abs(np.where(np.isfinite(c), c, 0)) ** 2, axis=-1))
    invalid = ~finite | (norm == 0)
    if mask is not None:
        if isinstance(mask, (str, os.PathLike)):
            mask = load_mask(mask, coefficients)
        m = np.asarray(mask)
        if m.ndim == len(spatial) + 1 and m.shape[-1] == 1:
            m = m[..., 0]
        if m.shape != spatial:
            raise ValueError(f"mask has shape {m.shape} but the image has spatial shape {spatial}")
        if not np.all(np.isfinite(m)):
            raise ValueError("mask contains non-finite values")
        return (m != 0) & ~invalid, invalid
    if not (np.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"threshold must be finite and >= 0, got {threshold}")
    good = norm[~invalid]
    if good.size == 0:
        return np.zeros(spatial, bool), invalid
    level = threshold * np.percentile(good, 99)
    return ~invalid & (norm >= level), invalid


def features_from_coefficients(c):
    """Real features ``[Re c, Im c]`` (n, 2r) of complex coefficients (n, r)."""
    c = np.asarray(c)
    return np.hstack([c.real, c.imag])


# --------------------------------------------------------------------- saving
def save_nifti(path, data, affine=None, header=None, dtype=np.float32):
    """Write ``data`` as NIfTI-1 atomically, with the input's affine and header.

    Parameters
    ----------
    path : str or path-like (``.nii`` or ``.nii.gz``)
    data : ndarray
    affine : ndarray (4, 4), optional (identity)
    header : nibabel header, optional
        Copied (dimensions and data type are updated for ``data``).
    dtype : numpy dtype
        Stored data type.
    """
    import nibabel as nib  # heavy; only NIfTI output needs it

    if not _is_nifti(path):
        raise ValueError(f"NIfTI output must end in .nii or .nii.gz, got {path}")
    data = np.asarray(data)
    if not np.issubdtype(data.dtype, np.number) and data.dtype != bool:
        raise TypeError(f"data must be numeric, got dtype {data.dtype}")
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=float)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {affine.shape}")
    hdr = None
    if header is not None:
        hdr = nib.Nifti1Header.from_header(header)
        hdr.set_intent("none")
        hdr.set_slope_inter(None, None)
    img = nib.Nifti1Image(data.astype(dtype), affine, header=hdr)
    img.set_data_dtype(dtype)
    if header is not None:  # keep the input's qform/sform codes
        img.set_qform(affine, int(hdr["qform_code"]) or 1)
        img.set_sform(affine, int(hdr["sform_code"]) or 1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def save_maps(maps, outdir, *, affine=None, header=None, prefix="", names=None):
    """Save a dict of maps as NIfTI files ``<outdir>/<prefix><name>.nii.gz``.

    Every file is staged next to its target and the targets are replaced
    only when all of them have been written (``io._files.atomic_files``).
    ``prefix`` must not contain path separators.

    Returns
    -------
    dict of name -> Path
    """
    outdir = Path(outdir)
    prefix = check_file_name(prefix, "prefix") if prefix else ""
    names = list(maps) if names is None else list(names)
    files = {name: f"{prefix}{check_file_name(name, 'maps key')}.nii.gz" for name in names}
    with atomic_files(outdir, list(files.values())) as tmp:
        for name in names:
            arr = np.asarray(maps[name])
            dtype = np.uint8 if arr.dtype == bool else (np.int16 if np.issubdtype(arr.dtype, np.integer)
                                                        else np.float32)
            save_nifti(tmp[files[name]], arr, affine, header, dtype=dtype)
    return {name: outdir / f for name, f in files.items()}
