"""The brain phantom, and the maps it yields at high SNR (NLLS through fit_maps)."""

import numpy as np
import pytest

from sklearn_crb import Sequence
from sklearn_crb.maps import fit_maps
from sklearn_crb.physics.parameters import INDEX
from sklearn_crb.phantom import (PROTON_DENSITY, TIED_TISSUES, TISSUES, make_phantom, phantom_geometry,
                                 tissue_values)
from sklearn_crb.physics.priors import resolve_prior
from sklearn_crb.physics.signal import simulate

NAMES = ("m0s", "R1f", "R2f")


def test_geometry_has_all_tissues_and_smooth_fields_in_range():
    labels, B1, omega0, _ = phantom_geometry((40, 36), b1_range=(0.8, 1.1), b0_max_hz=30)
    counts = np.bincount(labels.ravel(), minlength=4)
    assert np.all(counts > 20), counts
    assert B1.min() >= 0.8 - 1e-12 and B1.max() <= 1.1 + 1e-12
    assert np.abs(omega0).max() == pytest.approx(2 * np.pi * 30)
    assert np.abs(np.diff(B1, axis=0)).max() < 0.05  # smooth: small steps between neighbours
    with pytest.raises(ValueError, match="shape"):
        phantom_geometry((4, 40))


def test_phantom_matches_voxelwise_simulation(short_sequence):
    ph = make_phantom((20, 20), short_sequence, snr=np.inf, n_components=6, random_state=0)
    assert ph.sigma == 0 and np.array_equal(ph.coefficients, ph.clean)
    assert np.all(ph.coefficients[~ph.mask] == 0)
    rng = np.random.default_rng(1)
    vox = rng.choice(np.flatnonzero(ph.mask), 12, replace=False)
    iy, ix = np.unravel_index(vox, ph.mask.shape)
    s = simulate(short_sequence, ph.theta[iy, ix])  # independent of the unique-row batching
    expect = ph.M0[iy, ix, None] * (s @ ph.basis.conj())
    np.testing.assert_allclose(ph.coefficients[iy, ix], expect, rtol=1e-10, atol=1e-12)
    for name, lab in (("WM", 1), ("GM", 2), ("CSF", 3)):
        sel = ph.labels == lab
        assert np.allclose(np.abs(ph.M0[sel]), PROTON_DENSITY[name])
        assert np.allclose(ph.theta[sel][:, INDEX["m0s"]], TISSUES[name]["m0s"])
    assert ph.theta[..., INDEX["B1"]][ph.mask].std() > 0.02  # the B1 field is there


def test_phantom_noise_level(short_sequence):
    ph = make_phantom((24, 24), short_sequence, snr=40, n_components=6, random_state=3)
    n = (ph.coefficients - ph.clean)[ph.mask]
    assert ph.sigma == pytest.approx(1 / 40)
    assert np.std(n.real) == pytest.approx(ph.sigma, rel=0.05)
    assert np.std(n.imag) == pytest.approx(ph.sigma, rel=0.05)
    with pytest.raises(ValueError, match="uniform"):
        make_phantom((16, 16), short_sequence, uniform="bone")


@pytest.mark.parametrize("tied", [False, True])
def test_phantom_lies_inside_the_default_brain_prior(short_sequence, tied):
    """Every voxel of the phantom (tissues and fields) is inside the support of
    the "brain" prior of the model it is simulated with, and has R2f > R1f
    (the prior's rejection rule)."""
    prior = resolve_prior("brain", TR=short_sequence.TR, tied_R1=tied)
    ph = make_phantom((24, 24), short_sequence, snr=np.inf, n_components=6, tied_R1=tied, random_state=0)
    theta = ph.theta[ph.mask]
    for p, dist in prior.distributions.items():
        lo, hi = dist.support
        v = theta[:, INDEX[p]]
        assert np.all((v >= lo) & (v <= hi)), (p, v.min(), v.max(), (lo, hi))
    assert np.all(theta[:, INDEX["R2f"]] > theta[:, INDEX["R1f"]])
    if tied:
        np.testing.assert_array_equal(theta[:, INDEX["R1s"]], theta[:, INDEX["R1f"]])


def test_tied_phantom_uses_the_tied_tissue_values(short_sequence):
    """tied_R1=True: the published tied-model tissues (WM m0s 0.14, T1 1.5 s; GM 0.08, 2 s; CSF T1 4.5 s)."""
    assert tissue_values(True) is TIED_TISSUES and tissue_values(False) is TISSUES
    ph = make_phantom((20, 20), short_sequence, snr=np.inf, n_components=6, tied_R1=True, random_state=0)
    for name, (m0s, T1) in {"WM": (0.14, 1.5), "GM": (0.08, 2.0), "CSF": (0.01, 4.5)}.items():
        th = ph.theta[ph.tissue_mask(name)]
        assert np.allclose(th[:, INDEX["m0s"]], m0s) and np.allclose(1 / th[:, INDEX["R1f"]], T1), name
    wm, gm = TIED_TISSUES["WM"], TIED_TISSUES["GM"]
    assert 25 <= wm["Rex"] <= 30 and 25 <= gm["Rex"] <= 30


@pytest.fixture(scope="module")
def default_sequence():
    return Sequence.default()


def _nlls(ph, tissue, **kw):
    from sklearn_crb.estimators.nlls import NLLSFitter

    v = TISSUES[tissue]
    fixed = {p: v[p] for p in ("Rex", "R1s", "T2s")}
    fixed.update(omega0=0.0, B1=1.0)
    return NLLSFitter(ph.sequence, basis=ph.basis, estimate=NAMES, fixed=fixed, **kw).fit()


def test_phantom_maps_recover_tissue_values_at_high_snr(default_sequence):
    """SNR 1e4, nuisance parameters known: WM/GM/CSF within 1 % (m0s within 0.005 absolute)."""
    ph = make_phantom((16, 16), default_sequence, snr=1e4, fields=False, random_state=0)
    for tissue in ("WM", "GM", "CSF"):
        m = ph.tissue_mask(tissue)
        sel = np.zeros_like(m)
        sel.flat[np.flatnonzero(m)[:3]] = True
        maps = fit_maps(_nlls(ph, tissue), ph.coefficients, sel)
        for p in NAMES:
            est, true = maps.arrays[p][sel], TISSUES[tissue][p]
            if p == "m0s":
                np.testing.assert_allclose(est, true, atol=5e-3, err_msg=tissue)
            else:
                np.testing.assert_allclose(est, true, rtol=1e-2, err_msg=f"{tissue} {p}")
        assert np.all(maps.arrays["relative_residual"][sel] < 1e-3)
        assert np.all(maps.arrays["M0_abs"][sel] == pytest.approx(PROTON_DENSITY[tissue], rel=1e-2))
        assert np.all(maps.arrays[p][~sel] == 0)


@pytest.mark.slow
def test_standard_error_matches_empirical_spread_on_uniform_region(default_sequence):
    """Uniform WM, SNR 100 (WM 69): the spread of the NLLS estimates over ~100
    voxels (independent noise draws of one tissue) agrees with the median
    standard-error map sqrt(CRB(theta_hat)) within 25 % (sampling error of
    a std over 100 draws is ~7 %); sigma is estimated from the residuals."""
    ph = make_phantom((14, 14), default_sequence, snr=100, fields=False, uniform="WM", random_state=5)
    maps = fit_maps(_nlls(ph, "WM"), ph.coefficients)
    sel = maps.arrays["mask"] & (maps.arrays["flags"] == 0)
    assert sel.sum() > 80
    assert maps.sigma == pytest.approx(ph.sigma, rel=0.15)
    for p in NAMES:
        spread = np.std(maps.arrays[p][sel], ddof=1)
        se = np.median(maps.arrays[p + "_se"][sel])
        assert 0.75 < spread / se < 1.25, (p, spread, se)


def test_geometry_of_a_slab_varies_per_slice_and_contains_the_single_slice():
    labels, B1, omega0, phase = phantom_geometry((24, 20, 5), b1_range=(0.8, 1.1), b0_max_hz=30, slab=0.6)
    assert labels.shape == B1.shape == omega0.shape == phase.shape == (24, 20, 5)
    head = [np.count_nonzero(labels[..., k]) for k in range(5)]
    assert head[2] > head[0] and head[2] > head[4]  # the ellipsoidal head is widest at the centre slice
    csf = [np.count_nonzero(labels[..., k] == 3) for k in range(5)]
    assert len(set(csf)) > 1
    assert B1.min() >= 0.8 - 1e-12 and B1.max() <= 1.1 + 1e-12
    assert np.abs(omega0).max() == pytest.approx(2 * np.pi * 30)
    assert not np.allclose(omega0[..., 0], omega0[..., 4])  # B0 changes along z
    one = phantom_geometry((24, 20, 1))
    for a, b in zip(one, phantom_geometry((24, 20))):  # one slice of a slab is the 2-D phantom
        np.testing.assert_array_equal(a[..., 0], b)
    with pytest.raises(ValueError, match="slab"):
        phantom_geometry((16, 16, 3), slab=2.0)
    with pytest.raises(ValueError, match="shape"):
        phantom_geometry((16, 16, 3, 2))


def test_b1_map_option_simulates_with_the_given_field(short_sequence):
    """b1_map= replaces the smooth B1 field: the truth holds it (quantised), the data are simulated with it,
    and fixed_maps() returns it with nominal values outside the head."""
    shape = (12, 12, 2)
    field = np.linspace(0.7, 1.25, np.prod(shape)).reshape(shape)
    ph = make_phantom(shape, short_sequence, snr=np.inf, n_components=6, b1_map=field, random_state=0)
    inside = ph.mask
    np.testing.assert_allclose(ph.theta[..., INDEX["B1"]][inside], np.round(field[inside] / 0.005) * 0.005)
    fx = ph.fixed_maps(("B1", "omega0"))
    assert np.all(fx["B1"][~inside] == 1.0) and np.all(fx["omega0"][~inside] == 0.0)
    np.testing.assert_array_equal(fx["B1"][inside], ph.theta[..., INDEX["B1"]][inside])
    vox = np.flatnonzero(inside)[::7]
    idx = np.unravel_index(vox, shape)
    expect = ph.M0[idx][:, None] * (simulate(short_sequence, ph.theta[idx]) @ ph.basis.conj())
    np.testing.assert_allclose(ph.coefficients[idx], expect, rtol=1e-10, atol=1e-12)
    prior = resolve_prior("brain", TR=short_sequence.TR)
    lo, hi = prior.distributions["B1"].support
    assert lo <= ph.theta[inside][:, INDEX["B1"]].min() and ph.theta[inside][:, INDEX["B1"]].max() <= hi
    with pytest.raises(ValueError, match="b1_map must have"):
        make_phantom(shape, short_sequence, n_components=6, b1_map=field[..., 0], random_state=0)
    with pytest.raises(ValueError, match="within the brain prior"):
        make_phantom(shape, short_sequence, n_components=6, b1_map=1.5 * field, random_state=0)
    with pytest.raises(ValueError, match="names"):
        ph.fixed_maps(("m0s",))
