"""fit_maps: named maps, standard errors, residuals and flags, checked independently."""

import numpy as np
import pytest
from conftest import train_small_model

from sklearn_crb.crb import cramer_rao_bound
from sklearn_crb.maps import FLAGS, fit_maps, map_names
from sklearn_crb.phantom import make_phantom
from sklearn_crb.physics.parameters import INDEX
from sklearn_crb.physics.signal import simulate

NAMES = ("m0s", "R1f", "R2f")


@pytest.fixture(scope="module")
def setup(short_sequence):
    sim, net, _ = train_small_model(short_sequence, n_basis_samples=300, n_train=400, hidden=(32,), max_epochs=3)
    ph = make_phantom((16, 16), short_sequence, basis=sim, snr=50, random_state=2)
    return sim, net, ph


def test_maps_names_and_independent_residual_and_se(setup):
    sim, net, ph = setup
    sigma = ph.sigma
    maps = fit_maps(net, ph.coefficients, sigma=sigma)
    for key in (*NAMES, *(p + "_se" for p in NAMES), "M0_abs", "M0_phase", "relative_residual", "flags", "mask"):
        assert maps.arrays[key].shape == ph.labels.shape, key
    assert np.array_equal(maps.arrays["mask"], ph.mask)
    sel = maps.arrays["mask"]
    pred = net.predict(np.hstack([ph.coefficients[sel].real, ph.coefficients[sel].imag]))
    np.testing.assert_allclose(np.stack([maps.arrays[p][sel] for p in NAMES], 1), pred)
    # residual and M0, recomputed by hand for a few voxels
    vox = np.flatnonzero(sel)[:5]
    iy, ix = np.unravel_index(vox, sel.shape)
    # theta the estimator's model fingerprint used (its nuisance values included), from the protocol
    # (all masked voxels in one pass, as fit_maps's one chunk: a float32 forward pass of another batch size
    # rounds differently, and the nuisance polish can amplify that)
    th = net.predict_details(np.hstack([ph.coefficients[sel].real, ph.coefficients[sel].imag]),
                             compute_crb=False).theta[:5]
    np.testing.assert_allclose(th[:, [INDEX[p] for p in NAMES]], pred[:5], rtol=1e-6)
    u = simulate(ph.sequence, th) @ sim.basis_.conj()
    c = ph.coefficients[iy, ix]
    M0 = np.sum(u.conj() * c, 1) / np.sum(np.abs(u) ** 2, 1)
    rel = np.linalg.norm(c - M0[:, None] * u, axis=1) / np.linalg.norm(c, axis=1)
    np.testing.assert_allclose(maps.arrays["relative_residual"][iy, ix], rel, rtol=1e-8)
    np.testing.assert_allclose(maps.arrays["M0_abs"][iy, ix], np.abs(M0), rtol=1e-8)
    # the network's standard error: its delta-method spread, checked by central differences of predict
    X5 = np.hstack([c.real, c.imag])
    h = 1e-3 * np.linalg.norm(X5, axis=1, keepdims=True)
    g2 = np.zeros((5, len(NAMES)))
    for d in range(X5.shape[1]):
        e = np.zeros_like(X5)
        e[:, d] = h[:, 0]
        g2 += ((net.predict(X5 + e) - net.predict(X5 - e)) / (2 * h)) ** 2
    np.testing.assert_allclose(np.stack([maps.arrays[p + "_se"][iy, ix] for p in NAMES], 1), sigma * np.sqrt(g2),
                               rtol=0.05)
    assert np.all(maps.arrays["m0s"][~sel] == 0)
    assert np.all(maps.arrays["flags"][~sel] == FLAGS["invalid_input"])  # background is exactly zero


def test_network_crb_standard_errors_are_the_crb_at_the_estimate(setup):
    from sklearn_crb.estimators.net.details import network_details

    sim, net, ph = setup
    sel = ph.mask
    X = np.hstack([ph.coefficients[sel].real, ph.coefficients[sel].imag])[:5]
    det = network_details(net, X, se="crb")
    assert det.var_unit is None
    crb = cramer_rao_bound(ph.sequence, det.theta, estimate=NAMES, basis=sim.basis_)
    np.testing.assert_allclose(det.crb_unit, crb, rtol=1e-6)
    with pytest.raises(ValueError, match="se must be one of"):
        network_details(net, X, se="bootstrap")


def test_linearised_residual_removes_the_misfit_of_an_offset_estimate(short_sequence):
    """Noise-free data and an estimate off the truth: the residual is the misfit, its part orthogonal to the
    tangent space is second order; pure noise orthogonal to the tangent space is kept whole."""
    from sklearn_crb.estimators.net.details import linearised_residual
    from sklearn_crb.physics.signal import jacobian
    from sklearn_crb.simulator import MTFingerprintSimulator

    sim = MTFingerprintSimulator(short_sequence, n_components=10, n_basis_samples=200, random_state=0).fit()
    U = sim.basis_
    th = np.array([[0.12, 0.6, 14.0, 20.0, 2.0, 12e-6, 30.0, 0.95], [0.05, 0.4, 9.0, 25.0, 3.0, 10e-6, -50.0, 1.05]])
    free = ("m0s", "R1f", "R2f", "Rex", "R1s", "T2s", "omega0", "B1")
    M0 = np.array([0.7 * np.exp(0.3j), 1.1 * np.exp(-1j)])
    c = M0[:, None] * (simulate(short_sequence, th) @ U.conj())
    off = th * (1 + 2e-3 * np.array([1, -1, 1, -1, 1, -1, 1, 1]))
    s, J = jacobian(short_sequence, off)
    u = s @ U.conj()
    M0_hat = np.sum(u.conj() * c, 1) / np.sum(np.abs(u) ** 2, 1)
    Ju = np.einsum("npk,pr->nrk", J, U.conj())
    full = np.linalg.norm(c - M0_hat[:, None] * u, axis=1)
    lin = linearised_residual(c, M0_hat, u, Ju, free, tied=False)
    assert np.all(full > 0) and np.all(lin < 0.05 * full)
    # noise orthogonal to every tangent column is left whole
    A = np.concatenate([np.stack([M0_hat[:, None] * Ju[..., k] for k in range(8)] + [u, 1j * u], -1).real,
                        np.stack([M0_hat[:, None] * Ju[..., k] for k in range(8)] + [u, 1j * u], -1).imag], 1)
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 2 * U.shape[1]))
    Q, _ = np.linalg.qr(A)
    z -= np.einsum("nik,nk->ni", Q, np.einsum("nik,ni->nk", Q, z))
    cz = M0_hat[:, None] * u + (z[:, :U.shape[1]] + 1j * z[:, U.shape[1]:])
    np.testing.assert_allclose(linearised_residual(cz, M0_hat, u, Ju, free, tied=False), np.linalg.norm(z, axis=1),
                               rtol=1e-8)


def test_nan_and_zero_voxels_are_masked_and_flagged(setup):
    sim, net, ph = setup
    c = ph.coefficients.copy()
    c[8, 8] = 0
    c[7, 7, 1] = np.nan
    maps = fit_maps(net, c, mask=ph.mask, sigma=ph.sigma)
    for y, x in ((8, 8), (7, 7)):
        assert not maps.arrays["mask"][y, x]
        assert maps.arrays["flags"][y, x] & FLAGS["invalid_input"]
        assert maps.arrays["m0s"][y, x] == 0
    inside = maps.arrays["mask"]
    assert all(np.all(np.isfinite(maps.arrays[k][inside])) for k in ("m0s", "R1f", "R2f", "relative_residual"))


def test_an_image_with_nothing_to_fit_is_refused_by_name(setup):
    sim, net, ph = setup
    with pytest.raises(ValueError, match=r"no voxel to fit \(256 of 256 are non-finite or all zero"):
        fit_maps(net, np.full_like(ph.coefficients, np.nan))
    with pytest.raises(ValueError, match="no voxel to fit"):  # a mask that selects only invalid voxels
        fit_maps(net, ph.coefficients, mask=~ph.mask)
    empty = fit_maps(net, np.zeros_like(ph.coefficients), sigma=ph.sigma)  # with sigma: empty maps, all flagged
    assert not empty.arrays["mask"].any() and np.all(empty.arrays["flags"] & FLAGS["invalid_input"])


def test_chunking_does_not_change_results(setup, monkeypatch):
    """Chunks only bound memory: every step after the network is voxel by voxel.

    What chunking may change is the network's float32 forward pass, which rounds differently for another batch
    size (measured: <= 5e-7 relative); the five LM iterations of the nuisance polish that follow are
    ill-conditioned in T2s and omega0 and amplify such a difference up to 6e-5 in M0 and the residual (a 5e-7
    perturbation of the network's outputs moves them as much). With the network's outputs held to one batch's,
    chunk sizes 7 and 4096 give the same maps to float64 rounding, and the same flags and mask exactly.
    """
    sim, net, ph = setup
    kw = dict(compute_se=False, sigma=0.02)
    a = fit_maps(net, ph.coefficients, chunk_size=7, **kw)
    b = fit_maps(net, ph.coefficients, chunk_size=4096, **kw)
    for k in ("flags", "mask"):
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k])
    for k in NAMES:  # the network's own outputs: float32 rounding of the batch
        np.testing.assert_allclose(a.arrays[k], b.arrays[k], rtol=4e-6, atol=0)
    # the network's outputs of one full batch, served row by row whatever the chunk
    sel = ph.mask
    X = np.hstack([ph.coefficients[sel].real, ph.coefficients[sel].imag])
    table = {x.tobytes(): p for x, p in zip(X, net.predict(X))}
    monkeypatch.setattr(net, "predict", lambda Z: np.stack([table[z.tobytes()] for z in np.asarray(Z)]))
    a = fit_maps(net, ph.coefficients, chunk_size=7, **kw)
    b = fit_maps(net, ph.coefficients, chunk_size=4096, **kw)
    for k in a.arrays:
        np.testing.assert_allclose(a.arrays[k], b.arrays[k], rtol=1e-10, atol=0, err_msg=k)


def test_fixed_values_are_checked_like_the_cli(setup):
    """fit_maps refuses a fixed map outside the physical bounds, as the CLI refuses --b1-map (issue 29: B1 = 100,
    a map in percent, was accepted in Python), and a fixed parameter that the estimator estimates."""
    sim, net, ph = setup
    with pytest.raises(ValueError, match=r"fixed\['B1'\].*outside the physical bounds.*not in percent"):
        fit_maps(net, ph.coefficients, fixed={"B1": 100})
    with pytest.raises(ValueError, match="estimated by the estimator"):
        fit_maps(net, ph.coefficients, fixed={"R1f": 1.0})


def test_maps_object(setup, tmp_path):
    """Maps: named arrays with units, sigma and how it was estimated, provenance; writes itself to NIfTI; the 0.1
    dict access still works, with a DeprecationWarning."""
    import nibabel as nib

    sim, net, ph = setup
    m = fit_maps(net, ph.coefficients)
    assert m.sigma_method == "residuals" or m.sigma_method == "noise_residuals"
    assert fit_maps(net, ph.coefficients, sigma=0.02).sigma_method == "given"
    assert set(m.units) >= set(NAMES) and m.units["M0_phase"] == "rad"
    assert m.estimate == NAMES and m.provenance["rank"] == sim.basis_.shape[1]
    assert m.provenance["sequence_sha256"] == ph.sequence.sha256()
    assert m.m0s is m.arrays["m0s"]
    paths = m.to_nifti(tmp_path / "out", prefix="x_")
    assert set(paths) == set(m.arrays)
    np.testing.assert_array_equal(nib.load(paths["flags"]).get_fdata(), m.arrays["flags"])
    with pytest.warns(DeprecationWarning, match="maps.sigma"):
        assert m["sigma"] == m.sigma
    with pytest.warns(DeprecationWarning, match=r"maps.arrays\['m0s'\]"):
        assert m["m0s"] is m.arrays["m0s"]
    s = m.summary()
    assert s["sigma_method"] == m.sigma_method and s["n_voxels_fitted"] == int(m.arrays["mask"].sum())


def test_sigma_estimate_tracks_the_noise(setup):
    sim, net, ph = setup
    hi = make_phantom((16, 16), ph.sequence, basis=sim, snr=20, random_state=4)
    s_lo = fit_maps(net, ph.coefficients, compute_se=False).sigma
    s_hi = fit_maps(net, hi.coefficients, compute_se=False).sigma
    assert s_lo >= 0.5 * ph.sigma and s_hi > 1.5 * s_lo  # 2.5x the noise gives a clearly larger estimate


def test_bad_inputs_fail_before_work(setup):
    sim, net, ph = setup
    with pytest.raises(ValueError, match="rank 5 .* basis has rank 6"):
        fit_maps(net, ph.coefficients[..., :5])
    with pytest.raises(ValueError, match="mask has shape"):
        fit_maps(net, ph.coefficients, mask=np.ones((16, 15)))
    with pytest.raises(TypeError, match="complex"):
        fit_maps(net, np.abs(ph.coefficients))
    with pytest.raises(ValueError, match="chunk_size"):
        fit_maps(net, ph.coefficients, chunk_size=0)
    with pytest.raises(ValueError, match="fixed"):
        fit_maps(net, ph.coefficients, fixed={"B1": np.ones((3, 3))})


def test_fixed_field_maps_are_used(setup):
    sim, net, ph = setup
    b1 = ph.theta[..., INDEX["B1"]]
    a = fit_maps(net, ph.coefficients, sigma=ph.sigma, fixed={"B1": b1})
    b = fit_maps(net, ph.coefficients, sigma=ph.sigma)
    sel = a.arrays["mask"]
    np.testing.assert_allclose(a.arrays["m0s"][sel], b.arrays["m0s"][sel])  # the network ignores it ...
    assert not np.allclose(a.relative_residual[sel], b.relative_residual[sel])  # ... the model does not


def test_time_maps_by_the_delta_method(setup):
    """times=True: T1f (s) and T2f (ms) = 1/R, se(T) = se(R)/R^2 (x 1e3 for ms), units recorded."""
    sim, net, ph = setup
    a = fit_maps(net, ph.coefficients, sigma=ph.sigma, times=True)
    b = fit_maps(net, ph.coefficients, sigma=ph.sigma)
    assert set(a.arrays) == set(map_names(NAMES, times=True))
    assert not any(k.startswith("T") for k in b.arrays) and "T1s" not in a.arrays  # untied net estimates no R1s
    sel = a.arrays["mask"] & (a.arrays["flags"] == 0)
    R1, R2 = a.arrays["R1f"][sel], a.arrays["R2f"][sel]
    np.testing.assert_allclose(a.arrays["T1f"][sel], 1 / R1, rtol=1e-12)
    np.testing.assert_allclose(a.arrays["T2f"][sel], 1e3 / R2, rtol=1e-12)
    np.testing.assert_allclose(a.arrays["T1f_se"][sel], a.arrays["R1f_se"][sel] / R1**2, rtol=1e-12)
    np.testing.assert_allclose(a.arrays["T2f_se"][sel], 1e3 * a.arrays["R2f_se"][sel] / R2**2, rtol=1e-12)
    assert a.units["T1f"] == "s" and a.units["T2f"] == "ms" and a.units["T2f_se"] == "ms"
    assert np.all(a.arrays["T1f"][~a.arrays["mask"]] == 0)


def test_map_names_with_time_targets():
    """A time target is its own map; times=True adds no duplicate (T2f then in ms)."""
    names = map_names(("m0s", "T1f", "T2f"), times=True)
    assert names.count("T1f") == 1 and names.count("T2f_se") == 1 and "R1f" not in names
    assert map_names(("m0s", "R1f", "R2f", "R1s"), times=True)[:7] == ["m0s", "R1f", "R2f", "R1s", "T1f", "T2f",
                                                                        "T1s"]
    assert "m0s_se" not in map_names(("m0s",), compute_se=False)


def test_fit_maps_se_choice(setup):
    """se='crb' gives sqrt(CRB) at the network's estimate (recomputed with cramer_rao_bound from the maps'
    theta); se='delta' is the default; an unknown choice and 'delta' for NLLS are refused before any work."""
    from sklearn_crb.estimators.nlls import NLLSFitter

    sim, net, ph = setup
    sel = ph.mask
    a = fit_maps(net, ph.coefficients, sel, sigma=ph.sigma, se="crb")
    b = fit_maps(net, ph.coefficients, sel, sigma=ph.sigma)
    c = fit_maps(net, ph.coefficients, sel, sigma=ph.sigma, se="delta")
    np.testing.assert_array_equal(b.arrays["m0s_se"], c.arrays["m0s_se"])
    ok = sel & (a.arrays["flags"] == 0)
    X = np.hstack([ph.coefficients[sel].real, ph.coefficients[sel].imag])  # one pass, as fit_maps's chunk
    th = net.predict_details(X, compute_crb=False).theta[ok[sel]][:4]
    crb = cramer_rao_bound(ph.sequence, th, estimate=NAMES, basis=sim.basis_, M0=a.arrays["M0_abs"][ok][:4],
                           sigma=ph.sigma)
    np.testing.assert_allclose(np.stack([a.arrays[p + "_se"][ok][:4] for p in NAMES], 1), np.sqrt(crb), rtol=1e-6)
    assert not np.allclose(a.arrays["m0s_se"][ok], b.arrays["m0s_se"][ok])
    with pytest.raises(ValueError, match="se must be"):
        fit_maps(net, ph.coefficients, sel, se="bootstrap")
    nlls = NLLSFitter(ph.sequence, basis=sim.basis_, estimate=NAMES).fit()
    with pytest.raises(ValueError, match="delta method of a network"):
        fit_maps(nlls, ph.coefficients, sel, se="delta")
