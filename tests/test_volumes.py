"""``sklearn-crb fit`` on multi-slice volumes with measured (fixed) B1/B0 maps.

Fast tests: a 200-pulse built-in sequence, a 10x10x3 phantom slab, a few
fitted voxels (shapes, affine, header, refusals before any work). The
recovery test (slow) fits a 3-slice phantom with NLLS on the reference v3.2
sequence and judges it with the CRB at the *true* parameters (independent
of the code's own standard errors).
"""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import V32_NAME, require_data_file

from sklearn_crb.cli import main
from sklearn_crb.crb import cramer_rao_bound
from sklearn_crb.phantom import make_phantom
from sklearn_crb.physics.parameters import INDEX
from sklearn_crb.physics.sequence import Sequence

AFFINE = np.array([[0.0, -1.5, 0.0, 40.0], [2.0, 0.0, 0.0, -30.0], [0.0, 0.0, 3.0, 12.5], [0, 0, 0, 1]])
NAMES = ("m0s", "R1f", "R2f")
N_PULSES = 200


def _snapshot(root):
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in Path(root).rglob("*")}


def _save(path, arr, affine=AFFINE, header=None):
    img = nib.Nifti1Image(np.asarray(arr), affine, header=header)
    img.set_qform(affine, 1)
    img.set_sform(affine, 2)
    nib.save(img, str(path))
    return path


def write_volume(d, ph, affine=AFFINE):
    """Coefficients as a 4-D NIfTI (x, y, z, 2r), the basis, the true B1 map, its B0 map in Hz, the head mask."""
    hdr = nib.Nifti1Header()
    hdr.set_xyzt_units("mm", "sec")
    hdr["descrip"] = b"sklearn-crb test volume"
    c = ph.coefficients
    _save(d / "coef.nii.gz", np.concatenate([c.real, c.imag], -1).astype(np.float32), affine, hdr)
    np.save(d / "basis.npy", ph.basis)
    maps = ph.fixed_maps(("B1", "omega0"))
    _save(d / "B1.nii.gz", maps["B1"].astype(np.float32), affine)
    _save(d / "B0_hz.nii.gz", (maps["omega0"] / (2 * np.pi)).astype(np.float32), affine)
    _save(d / "mask.nii.gz", ph.mask.astype(np.uint8), affine)


@pytest.fixture(scope="module")
def vol(tmp_path_factory):
    d = tmp_path_factory.mktemp("volume")
    ph = make_phantom((10, 10, 3), Sequence.default(n_pulses=N_PULSES), snr=200, n_components=6, tied_R1=True,
                      random_state=0)
    write_volume(d, ph)
    few = np.zeros(ph.mask.shape, bool)
    for k in range(3):  # two head voxels per slice
        few[..., k].flat[np.flatnonzero(ph.mask[..., k])[[0, -1]]] = True
    _save(d / "few.nii.gz", few.astype(np.uint8))
    return d, ph, few


def _fit(d, out, *extra, mask="few.nii.gz"):
    return ["fit", "--nlls", "--tied-R1", "--n-pulses", str(N_PULSES), "--basis", str(d / "basis.npy"),
            "--coefficients", str(d / "coef.nii.gz"), "--mask", str(d / mask), "--out", str(out), "--quiet", *extra]


def test_phantom_volume_has_per_slice_variation(vol):
    _, ph, _ = vol
    assert ph.coefficients.shape == (10, 10, 3, 6) and ph.theta.shape == (10, 10, 3, 8)
    labels = ph.labels
    assert not np.array_equal(labels[..., 1], labels[..., 0])  # the head and ventricles change along z
    B1 = ph.fixed_maps()["B1"]
    assert np.all(np.isfinite(B1)) and np.all(B1[~ph.mask] == 1.0)
    means = [B1[..., k][ph.mask[..., k]].mean() for k in range(3)]
    assert means[1] > means[0] + 1e-3  # centre brightening: the centre slice has the higher B1


def test_fit_volume_keeps_shape_affine_and_header(vol, capsys):
    d, ph, few = vol
    out = d / "fit_b1"
    assert main(_fit(d, out, "--b1-map", str(d / "B1.nii.gz"))) == 0
    assert f"fitted {few.sum()} voxels" in capsys.readouterr().out
    for name in ("m0s", "R1f_se", "flags", "mask"):
        img = nib.load(out / f"{name}.nii.gz")
        assert img.shape == (10, 10, 3), name
        np.testing.assert_allclose(img.affine, AFFINE, atol=1e-5)
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 2
        assert img.header.get_xyzt_units()[0] == "mm"
    assert np.array_equal(nib.load(out / "mask.nii.gz").get_fdata() > 0, few)
    m0s = nib.load(out / "m0s.nii.gz").get_fdata()
    assert np.all(np.isfinite(m0s[few])) and np.all(m0s[~few] == 0)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["spatial_shape"] == [10, 10, 3]
    assert summary["fixed_maps"]["B1"]["file"] == str(d / "B1.nii.gz")
    assert "omega0" not in summary["fixed_maps"]


def test_field_maps_reach_fit_maps_in_si_units(vol, monkeypatch):
    """--b0-map in Hz becomes omega0 = 2 pi f (rad/s); rad/s is taken as is; --fixed NAME=FILE for any parameter."""
    import sklearn_crb.cli.fit as fit_cmd

    d, ph, few = vol
    seen = {}

    def fake_fit_maps(estimator, img, mask, **kw):  # records what the CLI passes, then stops the command
        seen.update(kw["fixed"])
        raise ValueError("stub stops here")

    monkeypatch.setattr(fit_cmd, "fit_maps", fake_fit_maps)
    truth = ph.fixed_maps(("B1", "omega0"))
    np.save(d / "Rex.npy", np.full(ph.mask.shape, 22.0))
    assert main(_fit(d, d / "never", "--b1-map", str(d / "B1.nii.gz"), "--b0-map", str(d / "B0_hz.nii.gz"),
                     "--fixed", f"Rex={d / 'Rex.npy'}")) == 2
    np.testing.assert_allclose(seen["B1"][few], truth["B1"][few], rtol=1e-6)
    np.testing.assert_allclose(seen["omega0"][few], truth["omega0"][few], rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(seen["Rex"][few], 22.0)
    _save(d / "B0_rad.nii.gz", truth["omega0"].astype(np.float32))
    seen.clear()
    assert main(_fit(d, d / "never", "--b0-map", str(d / "B0_rad.nii.gz"), "--b0-unit", "rad/s")) == 2
    np.testing.assert_allclose(seen["omega0"][few], truth["omega0"][few], rtol=1e-6, atol=1e-4)
    assert set(seen) == {"omega0"} and not (d / "never").exists()


def test_bad_field_maps_are_refused_before_any_work(vol, capsys):
    d, ph, few = vol
    B1 = ph.fixed_maps()["B1"].astype(np.float32)
    bad = d / "bad"
    bad.mkdir()
    _save(bad / "B1_shape.nii.gz", B1[:, :9])
    shifted = AFFINE.copy()
    shifted[0, 3] += 0.01  # 10 µm: far above the 1e-4 mm tolerance
    _save(bad / "B1_affine.nii.gz", B1, shifted)
    nan_in = B1.copy()
    nan_in[few] = np.nan
    _save(bad / "B1_nan.nii.gz", nan_in)
    _save(bad / "B1_percent.nii.gz", 100 * B1)
    _save(bad / "B1_complex.nii.gz", B1.astype(np.complex64))
    cases = {
        "B1_shape": (["--b1-map", str(bad / "B1_shape.nii.gz")], "(10, 9, 3)"),
        "B1_affine": (["--b1-map", str(bad / "B1_affine.nii.gz")], "affine"),
        "B1_nan": (["--b1-map", str(bad / "B1_nan.nii.gz")], "not finite in 6 of the 6 voxels"),
        "B1_percent": (["--b1-map", str(bad / "B1_percent.nii.gz")], "percent"),
        "B1_complex": (["--b1-map", str(bad / "B1_complex.nii.gz")], "real"),
        "missing": (["--b0-map", str(bad / "none.nii.gz")], "not found"),
        "estimated": (["--b1-map", str(d / "B1.nii.gz"), "--estimate", "m0s", "B1"], "cannot also be estimated"),
        "estimated-time": (["--fixed", f"R1f={d / 'B1.nii.gz'}", "--estimate", "m0s", "T1f"], "cannot also be"),
        "twice": (["--b1-map", str(d / "B1.nii.gz"), "--fixed", f"B1={d / 'B1.nii.gz'}"], "already fixed"),
        "syntax": (["--fixed", "B2=x.npy"], "NAME=FILE"),
        "tied-R1s": (["--fixed", f"R1s={d / 'B1.nii.gz'}"], "tied"),
    }
    for key, (extra, msg) in cases.items():
        before = _snapshot(d)
        out = d / f"never_{key}"
        code = main(_fit(d, out, *extra))
        err = capsys.readouterr().err
        assert code == 2, (key, err)
        assert len(err.strip().splitlines()) == 1 and msg in err, (key, err)
        assert "--b1-map" in err or "--b0-map" in err or "--fixed" in err, (key, err)
        assert not out.exists() and _snapshot(d) == before, key
    # NaN outside the fitted voxels is fine (a measured map is often NaN outside the head)
    nan_out = B1.copy()
    nan_out[~few] = np.nan
    _save(bad / "B1_nan_out.nii.gz", nan_out)
    assert main(_fit(d, d / "fit_nan_out", "--b1-map", str(bad / "B1_nan_out.nii.gz"))) == 0


def test_numpy_volume_with_numpy_map(vol, tmp_path, capsys):
    """A .npy (x, y, z, r) complex volume and a .npy B1 map: no affine to compare, the shape is still checked."""
    d, ph, few = vol
    np.save(tmp_path / "coef.npy", ph.coefficients)
    np.save(tmp_path / "B1.npy", ph.fixed_maps()["B1"])
    np.save(tmp_path / "B1_2d.npy", ph.fixed_maps()["B1"][..., 0])
    np.save(tmp_path / "few.npy", few)
    base = ["fit", "--nlls", "--tied-R1", "--n-pulses", str(N_PULSES), "--basis", str(d / "basis.npy"),
            "--coefficients", str(tmp_path / "coef.npy"), "--mask", str(tmp_path / "few.npy"), "--quiet"]
    assert main([*base, "--out", str(tmp_path / "bad"), "--b1-map", str(tmp_path / "B1_2d.npy")]) == 2
    assert "--b1-map: the B1 map has shape (10, 10)" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main([*base, "--out", str(tmp_path / "out"), "--b1-map", str(tmp_path / "B1.npy")]) == 0
    assert nib.load(tmp_path / "out" / "R2f.nii.gz").shape == (10, 10, 3)


# ------------------------------------------------------------------ recovery within the CRB (slow)
def _z_scores(ph, maps_dir, nuisance, sel):
    """(estimate - truth) / sqrt(CRB(true theta)) of NAMES on ``sel``; the CRB with ``nuisance`` free."""
    crb = cramer_rao_bound(ph.sequence, ph.theta[sel], estimate=NAMES, nuisance=nuisance, tied_R1=True,
                           basis=ph.basis)
    sd = np.sqrt(crb) * ph.sigma / np.abs(ph.M0[sel])[:, None]
    est = {p: nib.load(maps_dir / f"{p}.nii.gz").get_fdata() for p in NAMES}
    return {p: (est[p][sel] - ph.theta[sel][:, INDEX[p]]) / sd[:, k] for k, p in enumerate(NAMES)}, sd


@pytest.mark.slow
def test_volume_nlls_with_b1_map_recovers_truth_within_crb(tmp_path):
    """3-slice tied phantom (v3.2, rank 13, SNR 600): NLLS through the CLI with the true B1 map. On WM and
    GM voxels the z-scores against the CRB at the true theta have |median| < 0.3 and std in [0.7, 1.4];
    estimating B1 instead (no --b1-map) spreads the m0s errors more, as the CRB predicts for this B1 field."""
    seq = Sequence.from_mat(require_data_file(V32_NAME), TR=3.5e-3)
    ph = make_phantom((12, 12, 3), seq, snr=600, n_components=13, tied_R1=True, random_state=2)
    write_volume(tmp_path, ph)
    base = ["fit", "--nlls", "--tied-R1", "--sequence", str(require_data_file(V32_NAME)), "--basis",
            str(tmp_path / "basis.npy"), "--coefficients", str(tmp_path / "coef.nii.gz"), "--mask",
            str(tmp_path / "mask.nii.gz"), "--sigma", str(ph.sigma), "--quiet"]
    assert main([*base, "--out", str(tmp_path / "fixed"), "--b1-map", str(tmp_path / "B1.nii.gz")]) == 0
    assert main([*base, "--out", str(tmp_path / "free")]) == 0
    sel = ph.tissue_mask("WM") | ph.tissue_mask("GM")
    assert sel.sum() > 120
    img = nib.load(tmp_path / "fixed" / "m0s.nii.gz")
    assert img.shape == (12, 12, 3)
    np.testing.assert_allclose(img.affine, AFFINE, atol=1e-5)
    z, sd_fixed = _z_scores(ph, tmp_path / "fixed", ("Rex", "T2s", "omega0"), sel)
    stats = {p: (round(float(np.median(z[p])), 3), round(float(np.std(z[p])), 3)) for p in NAMES}
    print("z-scores (median, std) with B1 fixed:", stats)
    for p in NAMES:
        assert abs(stats[p][0]) < 0.3 and 0.7 <= stats[p][1] <= 1.4, (p, stats)
    _, sd_free = _z_scores(ph, tmp_path / "free", ("Rex", "T2s", "omega0", "B1"), sel)
    m0s_true = ph.theta[sel][:, INDEX["m0s"]]
    err = {k: nib.load(tmp_path / k / "m0s.nii.gz").get_fdata()[sel] - m0s_true for k in ("fixed", "free")}
    predicted = np.sqrt(np.mean(sd_free[:, 0] ** 2) / np.mean(sd_fixed[:, 0] ** 2))
    assert predicted > 1.1  # the CRB says that knowing B1 helps here
    print(f"m0s error std: B1 fixed {np.std(err['fixed']):.4g}, estimated {np.std(err['free']):.4g}; "
          f"CRB-predicted ratio {predicted:.3f}")
    assert np.std(err["free"]) > 1.05 * np.std(err["fixed"]), (np.std(err["free"]), np.std(err["fixed"]))
