"""A numerical brain phantom for MT fingerprinting: one slice or a small slab.

White matter (WM), cortical and deep grey matter (GM) and cerebrospinal
fluid (CSF) on an elliptical head, with smooth B0 and B1 fields and a smooth
M0 phase, simulated with the generalized-Bloch model through a sequence and
a compression basis, with complex Gaussian noise at a chosen SNR. It is the
test image of the I/O → maps pipeline (``sklearn_crb.maps``).

``shape=(nx, ny)`` gives one slice; ``shape=(nx, ny, nz)`` a multi-slice
slab through an ellipsoidal head (``slab`` sets its thickness), whose slices
differ: the head, the cortex and the ventricles shrink away from the centre
slice, and B1, B0 and the phase vary along z. The true B1 map (used to
simulate the data) is returned as ``Phantom.fixed_maps()["B1"]``, so that a
fit can take it as a measured, fixed B1 map; ``b1_map=`` replaces the
built-in smooth field by any field.

Tissue values (3 T, the unconstrained two-pool generalized-Bloch model):

* WM: m0s = 0.20, T1f = 1.92 s, T2f = 77.6 ms, Rex = 16.5 1/s,
  T1s = 0.337 s, T2s = 12.4 µs — the typical white matter quoted by
  Mao, Flassbeck & Assländer, arXiv 2312.11468 (their in vivo fits), in line
  with Assländer et al., "Rapid quantitative magnetization transfer imaging:
  utilizing the hybrid state and the generalized Bloch model", MRM 2024;
  91:1478-1497.
* GM: m0s ≈ 0.10, T1f ≈ 2.3 s, T2f ≈ 90 ms, Rex ≈ 14 1/s, T1s ≈ 0.34 s,
  T2s ≈ 12 µs — approximately half the WM semi-solid fraction and a longer
  free-pool T1 and T2, as reported for cortical GM by Assländer et al.
  (MRM 2024, above) and, for m0s, by Gloor, Scheffler & Bieri, MRM 2008;
  60:691-700 (bSSFP qMT: F ≈ 15 % in WM versus ≈ 7 % in GM).
* CSF: no semi-solid pool (m0s = 0), T1 ≈ 4 s, T2 ≈ 0.5 s (lower end of the
  0.5-2 s reported at 3 T; e.g. Spijkerman et al., MAGMA 2018;31:415-424).
  With m0s = 0 the semi-solid parameters (Rex, R1s, T2s) have no effect
  and are set to the WM values.
* Proton density |M0| (relative to CSF = 1): WM 0.69, GM 0.80, CSF 1.0
  (e.g. Neeb et al., NeuroImage 2006;29:910-922).

Tissue values of the tied model (``tied_R1=True``: one T1, R1s = R1f),
``TIED_TISSUES``. A tied fit absorbs the fast semi-solid T1 into a shorter
apparent T1 and a larger exchange rate, so its maps differ from the
unconstrained model's. The values are chosen to match published tied-model
(single-T1) maps of in-vivo brain at 3 T (WM m0s ≈ 0.13-0.15, T1 ≈ 1.5 s;
GM m0s ≈ 0.07-0.08, T1 ≈ 2 s), which the package's tied NLLS reproduces to
about 5 % on an in-vivo slice of the hybrid-state sequence (Assländer et
al., MRM 2022); the WM/GM m0s ratio is that of bSSFP qMT (Gloor et al.,
above). Rex ≈ 25-30 1/s is what tied in-vivo fits give:

* WM: m0s = 0.14, T1 = 1.5 s, T2f = 70 ms, Rex = 28 1/s, T2s = 12 µs;
* GM: m0s = 0.08, T1 = 2.0 s, T2f = 90 ms, Rex = 25 1/s, T2s = 12 µs;
* CSF: m0s = 0.01, T1 = 4.5 s (Lu et al., JMRI 2005;22:13-22: 4.3-4.4 s
  at 3 T; Rooney et al., MRM 2007;57:308-318), T2f = 1.5 s, Rex = 25 1/s,
  T2s = 12 µs. m0s = 0.01 (not 0) keeps the CRB finite (it is singular at
  m0s = 0, where Rex and T2s drop out); in-vivo tied fits give ≈ 0.01.
* Proton densities as for the unconstrained model.

Both tissue sets lie inside the ``"brain"`` prior of their model
(``resolve_prior("brain", tied_R1=...)``), so a network trained on that
prior can represent every phantom voxel.

The noise has standard deviation ``sigma = 1 / snr`` per real component of
the coefficients, so ``snr`` is the SNR of a voxel with ``|M0| = 1`` (CSF);
WM voxels have SNR ``0.69 snr`` (``snr = 116`` gives the in-vivo
``|M0|/sigma ≈ 80`` in WM).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sklearn_crb._validation import check_basis
from sklearn_crb.physics.parameters import INDEX, PARAMETERS, tie_R1
from sklearn_crb.physics.sequence import Sequence
from sklearn_crb.physics.signal import simulate
from sklearn_crb.simulator import MTFingerprintSimulator

__all__ = ["TISSUES", "TIED_TISSUES", "tissue_values", "PROTON_DENSITY", "LABELS", "Phantom", "make_phantom",
           "phantom_geometry", "NOMINAL_FIELDS"]

#: Tissue parameters in ``PARAMETERS`` order without the fields (omega0, B1).
TISSUES = {
    "WM": {"m0s": 0.20, "R1f": 1 / 1.92, "R2f": 1 / 77.6e-3, "Rex": 16.5, "R1s": 1 / 0.337, "T2s": 12.4e-6},
    "GM": {"m0s": 0.10, "R1f": 1 / 2.3, "R2f": 1 / 90e-3, "Rex": 14.0, "R1s": 1 / 0.34, "T2s": 12.0e-6},
    "CSF": {"m0s": 0.0, "R1f": 1 / 4.0, "R2f": 1 / 0.5, "Rex": 16.5, "R1s": 1 / 0.337, "T2s": 12.4e-6},
}
#: Tissue parameters of the tied model (R1s = R1f), see the module docstring.
TIED_TISSUES = {
    "WM": {"m0s": 0.14, "R1f": 1 / 1.5, "R2f": 1 / 70e-3, "Rex": 28.0, "R1s": 1 / 1.5, "T2s": 12e-6},
    "GM": {"m0s": 0.08, "R1f": 1 / 2.0, "R2f": 1 / 90e-3, "Rex": 25.0, "R1s": 1 / 2.0, "T2s": 12e-6},
    "CSF": {"m0s": 0.01, "R1f": 1 / 4.5, "R2f": 1 / 1.5, "Rex": 25.0, "R1s": 1 / 4.5, "T2s": 12e-6},
}
PROTON_DENSITY = {"WM": 0.69, "GM": 0.80, "CSF": 1.0}
#: Label values of ``Phantom.labels``.
LABELS = {"background": 0, "WM": 1, "GM": 2, "CSF": 3}
#: Field values outside the head in ``Phantom.fixed_maps`` (nominal B1, on resonance).
NOMINAL_FIELDS = {"B1": 1.0, "omega0": 0.0}


def tissue_values(tied_R1=False):
    """The tissue table of a model: ``TIED_TISSUES`` if ``tied_R1`` else ``TISSUES``."""
    return TIED_TISSUES if tied_R1 else TISSUES


@dataclass
class Phantom:
    """A simulated coefficient image and its ground truth.

    Attributes
    ----------
    ``spatial`` is the phantom's ``shape``: (nx, ny) or (nx, ny, nz).

    coefficients : ndarray, complex128, shape (*spatial, r)
        Noisy coefficients ``M0 U^H s(theta) + noise``; exactly zero outside
        the head (as in reconstructions).
    clean : ndarray, complex128, shape (*spatial, r)
        The same without noise.
    theta : ndarray, shape (*spatial, 8)
        True parameters (``PARAMETERS`` order, SI units); zero outside the head.
    M0 : ndarray, complex128, shape spatial
    labels : ndarray of int, shape spatial
        See ``LABELS``.
    sigma : float
        Noise standard deviation per real component.
    basis : ndarray, complex128, shape (n_pulses, r)
    sequence : Sequence
    tied_R1 : bool
        Whether the tied-model tissues (``TIED_TISSUES``) were simulated.
    """

    coefficients: np.ndarray
    clean: np.ndarray
    theta: np.ndarray
    M0: np.ndarray
    labels: np.ndarray
    sigma: float
    basis: np.ndarray
    sequence: Sequence
    tied_R1: bool = False

    @property
    def mask(self):
        """Voxels inside the head."""
        return self.labels > 0

    def tissue_mask(self, name):
        """Boolean mask of one tissue (``"WM"``, ``"GM"`` or ``"CSF"``)."""
        if name not in TISSUES:
            raise ValueError(f"name must be one of {tuple(TISSUES)}, got {name!r}")
        return self.labels == LABELS[name]

    def parameter_map(self, name):
        """True map of one parameter (zero outside the head)."""
        if name not in INDEX:
            raise ValueError(f"name must be one of {PARAMETERS}, got {name!r}")
        return self.theta[..., INDEX[name]]

    def fixed_maps(self, names=("B1",)):
        """True field maps to pass as measured, fixed maps: ``{name: map}``.

        Inside the head the values that simulated the data (``B1``
        relative, 1 = nominal; ``omega0`` in rad/s); outside it the nominal
        values ``NOMINAL_FIELDS``, so the maps are finite everywhere.
        """
        out = {}
        for name in names:
            if name not in NOMINAL_FIELDS:
                raise ValueError(f"names must be among {tuple(NOMINAL_FIELDS)}, got {name!r}")
            out[name] = np.where(self.mask, self.parameter_map(name), NOMINAL_FIELDS[name])
        return out


def phantom_geometry(shape=(64, 64), b1_range=(0.8, 1.15), b0_max_hz=40.0, slab=0.5):
    """Tissue labels and smooth fields of the head phantom.

    Parameters
    ----------
    shape : (int, int) or (int, int, int)
        One slice (n0, n1), each >= 8, or a slab of ``nz >= 1`` slices
        (n0, n1, nz).
    b1_range : (float, float)
        B1 scaling spans this range over the image: highest at the centre
        (dielectric centre brightening at 3 T), lowest at the edge.
    b0_max_hz : float
        Peak |off-resonance| in Hz: a linear plus quadratic (frontal-sinus
        like) field.
    slab : float
        Slab thickness in units of the in-plane head half-width (the head
        is an ellipsoid with semi-axes 0.85, 0.95 and 0.8); its slices are
        evenly spaced over ``[-slab/2, slab/2]`` around the centre slice.
        Ignored for one slice (which is the centre slice).

    Returns
    -------
    labels : ndarray of int, shape ``shape``
    B1 : ndarray, shape ``shape`` (relative, 1 = nominal)
    omega0 : ndarray, shape ``shape``, rad/s
    phase : ndarray, shape ``shape``, rad (smooth M0 phase)
    """
    try:
        dims = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise TypeError(f"shape must be a tuple of 2 or 3 ints, got {shape!r}") from None
    if len(dims) not in (2, 3):
        raise ValueError(f"shape must be (n0, n1) or (n0, n1, nz), got {shape}")
    if dims[0] < 8 or dims[1] < 8 or (len(dims) == 3 and dims[2] < 1):
        raise ValueError(f"shape must be at least (8, 8) in-plane with nz >= 1, got {shape}")
    slab = float(slab)
    if not (np.isfinite(slab) and 0 <= slab <= 1.2):
        raise ValueError(f"slab must be in [0, 1.2] (the head is 1.6 high), got {slab}")
    ny, nx = dims[:2]
    nz = dims[2] if len(dims) == 3 else 1
    zs = np.linspace(-slab / 2, slab / 2, nz) if nz > 1 else np.zeros(1)
    y, x, z = np.meshgrid(np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), zs, indexing="ij")
    # elliptical (ellipsoidal in a slab) "radius" of the head; z = 0 adds exactly 0 on the centre slice
    rho = np.sqrt((x / 0.85) ** 2 + (y / 0.95) ** 2 + (z / 0.8) ** 2)
    labels = np.zeros(rho.shape, dtype=np.int16)
    labels[rho <= 1.0] = LABELS["CSF"]  # outer CSF
    labels[rho <= 0.90] = LABELS["GM"]  # cortex
    labels[rho <= 0.72] = LABELS["WM"]
    for sx in (-1, 1):
        deep_gm = ((x - sx * 0.30) / 0.12) ** 2 + ((y + 0.05) / 0.16) ** 2 + (z / 0.3) ** 2 <= 1.0  # thalamus-like
        labels[deep_gm & (rho <= 0.72)] = LABELS["GM"]
        ventricle = ((x - sx * 0.12) / 0.07) ** 2 + ((y + 0.10) / 0.30) ** 2 + (z / 0.35) ** 2 <= 1.0
        labels[ventricle] = LABELS["CSF"]
    lo, hi = (float(v) for v in b1_range)
    if not (0 < lo <= hi <= 1.4):
        raise ValueError(f"b1_range must satisfy 0 < low <= high <= 1.4, got {b1_range}")
    B1 = lo + (hi - lo) * np.exp(-(rho**2) / 0.5)
    B1 = lo + (B1 - B1.min()) / max(np.ptp(B1), 1e-12) * (hi - lo)
    b0 = 0.5 * x + 0.3 * y + 0.8 * np.exp(-((x / 0.3) ** 2 + ((y - 0.75) / 0.2) ** 2)) + 0.6 * z
    b0 = b0 / np.abs(b0).max() * float(b0_max_hz)
    omega0 = 2 * np.pi * b0
    phase = 0.6 * x - 0.4 * y + 0.3 + 0.5 * z
    if len(dims) == 2:
        labels, B1, omega0, phase = (a[..., 0] for a in (labels, B1, omega0, phase))
    return labels, B1, omega0, phase


def make_phantom(shape=(64, 64), sequence=None, basis=None, *, snr=100.0, n_components=13, tied_R1=False,
                 fields=True, b1_range=(0.8, 1.15), b0_max_hz=40.0, b1_step=0.005, b0_step_hz=0.5,
                 uniform=None, b1_map=None, slab=0.5, backend="auto", random_state=None):
    """Simulate the brain phantom as a noisy coefficient image.

    Every distinct (tissue, B0, B1) combination is simulated once: the smooth
    fields are quantised to ``b1_step`` and ``b0_step_hz`` (the truth maps
    hold the quantised values, so they are exact) and the unique rows of
    ``theta`` go through the batched physics in one call.

    Parameters
    ----------
    shape : (int, int) or (int, int, int)
        One slice (n0, n1) or a slab of slices (n0, n1, nz); see
        :func:`phantom_geometry`.
    sequence : Sequence, optional
        Default ``Sequence.default()``.
    basis : array_like (n_pulses, r) or fitted MTFingerprintSimulator, optional
        Compression basis; default: a rank-``n_components`` SVD basis learnt
        by ``MTFingerprintSimulator`` from the ``"brain"`` prior of the model
        (seeded by ``random_state``).
    snr : float
        ``1 / sigma``: SNR of a voxel with ``|M0| = 1`` (CSF); ``np.inf`` for
        a noise-free image.
    n_components : int
        Rank of the default basis.
    tied_R1 : bool
        Simulate the tied model (``R1s = R1f``, the paper's single T1) with
        its tissue values ``TIED_TISSUES``; False: ``TISSUES``.
    fields : bool
        Smooth B0/B1 fields (False: omega0 = 0, B1 = 1 everywhere).
    b1_range, b0_max_hz
        See :func:`phantom_geometry`.
    b1_step, b0_step_hz : float
        Field quantisation (B1 units, Hz).
    uniform : {"WM", "GM", "CSF"}, optional
        Fill the whole head with one tissue (a uniform region for
        noise-statistics tests).
    b1_map : array_like of shape ``shape``, optional
        A B1 field (relative, 1 = nominal) replacing the built-in smooth
        one (also with ``fields=False``); it must be finite and within the
        ``"brain"`` prior's B1 range [0.6, 1.3] inside the head. It is
        quantised to ``b1_step`` like the built-in field.
    slab : float
        Slab thickness of a multi-slice phantom (see :func:`phantom_geometry`).
    backend : str
        Physics backend.
    random_state : int, Generator or None

    Returns
    -------
    Phantom
    """
    rng = np.random.default_rng(random_state)
    seq = Sequence.default() if sequence is None else sequence
    if not isinstance(seq, Sequence):
        raise TypeError(f"sequence must be a Sequence, got {type(seq).__name__}")
    snr = float(snr)
    if not snr > 0:
        raise ValueError(f"snr must be positive, got {snr}")
    if uniform is not None and uniform not in TISSUES:
        raise ValueError(f"uniform must be None or one of {tuple(TISSUES)}, got {uniform!r}")
    U = _resolve_basis(basis, seq, n_components, rng, backend, tied_R1)
    labels, B1, omega0, phase = phantom_geometry(shape, b1_range, b0_max_hz, slab)
    if uniform is not None:
        labels = np.where(labels > 0, LABELS[uniform], 0).astype(np.int16)
    B1, omega0 = _quantised_fields(labels, B1, omega0, fields, b1_map, b1_step, b0_step_hz)

    theta = np.zeros(labels.shape + (len(PARAMETERS),))
    M0 = np.zeros(labels.shape, dtype=np.complex128)
    for name, values in tissue_values(tied_R1).items():
        sel = labels == LABELS[name]
        for p, v in values.items():
            theta[sel, INDEX[p]] = v
        M0[sel] = PROTON_DENSITY[name] * np.exp(1j * phase[sel])
    theta[..., INDEX["omega0"]] = np.where(labels > 0, omega0, 0.0)
    theta[..., INDEX["B1"]] = np.where(labels > 0, B1, 0.0)
    if tied_R1:
        theta[labels > 0] = tie_R1(theta[labels > 0])

    head = labels > 0
    rows, inverse = np.unique(theta[head], axis=0, return_inverse=True)
    sig = simulate(seq, rows, backend=backend)  # (n_unique, n_pulses) at M0 = 1
    c_unique = sig @ U.conj()
    clean = np.zeros(labels.shape + (U.shape[1],), dtype=np.complex128)
    clean[head] = M0[head][:, None] * c_unique[np.ravel(inverse)]
    sigma = 0.0 if np.isinf(snr) else 1.0 / snr
    noisy = clean.copy()
    if sigma > 0:
        n = head.sum()
        noisy[head] += sigma * (rng.standard_normal((n, U.shape[1])) + 1j * rng.standard_normal((n, U.shape[1])))
    return Phantom(noisy, clean, theta, M0, labels, sigma, U, seq, bool(tied_R1))


def _quantised_fields(labels, B1, omega0, fields, b1_map, b1_step, b0_step_hz):
    """The B1 (relative) and omega0 (rad/s) fields: built-in or given, quantised so that few rows are simulated."""
    if not fields:
        B1, omega0 = np.ones_like(B1), np.zeros_like(omega0)
    if b1_map is not None:
        B1 = _check_b1_map(b1_map, labels)
    if b1_step > 0:
        B1 = np.round(B1 / b1_step) * b1_step
    if b0_step_hz > 0:
        step = 2 * np.pi * b0_step_hz
        omega0 = np.round(omega0 / step) * step
    return B1, omega0


def _check_b1_map(b1_map, labels):
    B1 = np.asarray(b1_map, dtype=float)
    if B1.shape != labels.shape:
        raise ValueError(f"b1_map must have the phantom's shape {labels.shape}, got {B1.shape}")
    inside = B1[labels > 0]
    if not np.all(np.isfinite(inside)) or inside.min() < 0.6 or inside.max() > 1.3:
        raise ValueError("b1_map must be finite and within the brain prior's B1 range [0.6, 1.3] inside the head, "
                         f"got [{np.nanmin(inside):.3g}, {np.nanmax(inside):.3g}]")
    return np.where(labels > 0, B1, 1.0)


def _resolve_basis(basis, seq, n_components, rng, backend="auto", tied_R1=False):
    if basis is None:
        sim = MTFingerprintSimulator(seq, n_components=n_components, backend=backend, prior="brain", tied_R1=tied_R1,
                                     n_basis_samples=max(300, 4 * n_components),
                                     random_state=int(rng.integers(2**31))).fit()
        return sim.basis_
    if isinstance(basis, MTFingerprintSimulator):
        if not hasattr(basis, "basis_"):
            raise ValueError("basis: the MTFingerprintSimulator is not fitted; call fit() first")
        if basis.sequence_ != seq:
            raise ValueError("basis: the simulator was fitted for a different sequence")
        return basis.basis_
    return check_basis(basis, seq.n_pulses)
