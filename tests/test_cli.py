"""The sklearn-crb command line: help, simulate -> train -> fit, bad inputs, the demo."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import small_cli_model

from sklearn_crb.cli import main
from sklearn_crb.io.datasets import load_dataset
from sklearn_crb.physics.parameters import PARAMETERS, free_parameters

AFFINE = np.diag([2.0, 2.0, 4.0, 1.0])
AFFINE[:3, 3] = [-30, -20, 5]


@pytest.mark.parametrize("cmd", [[], ["demo"], ["simulate"], ["train"], ["fit"]])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main(cmd + ["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: sklearn-crb" in out
    if cmd == ["fit"]:
        assert all(opt in out for opt in ("--sequence", "--basis", "--mask", "--device", "--n-jobs", "--scheduler"))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """simulate -> train on the 120-pulse built-in sequence, and a phantom image in its basis."""

    d = tmp_path_factory.mktemp("cli")
    ph, c = small_cli_model(d)  # (x, y, z=1, r)
    nib.save(nib.Nifti1Image(np.concatenate([c.real, c.imag], -1).astype(np.float32), AFFINE), d / "coef.nii.gz")
    return d, ph


def test_simulate_writes_a_complete_training_set(pipeline):
    d, _ = pipeline
    data = load_dataset(d / "train.h5")
    # the default --estimate: every free parameter of the (untied) model, nuisances included
    n = len(PARAMETERS)
    assert data["X"].shape == (300, 12) and data["y"].shape == (300, n) and data["crb"].shape == (300, n)
    assert np.all(data["crb"] > 0) and data["meta"]["estimate"] == list(PARAMETERS)
    U = data["basis"]
    np.testing.assert_allclose(U.conj().T @ U, np.eye(6), atol=1e-10)


def test_fit_writes_nifti_maps_with_affine_and_png(pipeline, capsys):
    d, ph = pipeline
    out = d / "fit"
    assert main(["fit", "--model", str(d / "model"), "--coefficients", str(d / "coef.nii.gz"),
                 "--out", str(out), "--quiet"]) == 0
    files = set(os.listdir(out))
    assert {"m0s.nii.gz", "m0s_se.nii.gz", "relative_residual.nii.gz", "flags.nii.gz", "mask.nii.gz",
            "overview.png", "summary.json"} <= files
    img = nib.load(out / "R2f.nii.gz")
    np.testing.assert_allclose(img.affine, AFFINE)
    assert img.shape == (12, 12, 1)
    mask = nib.load(out / "mask.nii.gz").get_fdata()[..., 0] > 0
    assert np.array_equal(mask, ph.mask)
    assert json.loads((out / "summary.json").read_text())["n_voxels_fitted"] == ph.mask.sum()
    assert "fitted" in capsys.readouterr().out


def test_python_api_and_cli_agree(pipeline):
    from sklearn_crb.io.images import load_coefficients
    from sklearn_crb.io.models import load_model
    from sklearn_crb.maps import fit_maps

    d, ph = pipeline
    out = d / "fit2"
    assert main(["fit", "--model", str(d / "model"), "--coefficients", str(d / "coef.nii.gz"),
                 "--out", str(out), "--quiet", "--sigma", "0.02"]) == 0
    maps = fit_maps(load_model(d / "model", device="cpu"), load_coefficients(d / "coef.nii.gz"), sigma=0.02)
    np.testing.assert_allclose(nib.load(out / "m0s_se.nii.gz").get_fdata(), maps.arrays["m0s_se"].astype(np.float32))


def test_bad_inputs_give_errors_and_no_output(pipeline, capsys):
    d, ph = pipeline
    bad = d / "bad"
    bad.mkdir()
    c = ph.coefficients
    nib.save(nib.Nifti1Image(c[..., :5].astype(np.complex64), AFFINE), bad / "rank5.nii.gz")
    (bad / "trunc.nii.gz").write_bytes((d / "coef.nii.gz").read_bytes()[:300])
    np.save(bad / "mask.npy", np.ones((12, 11)))
    cases = [
        (["--coefficients", str(bad / "rank5.nii.gz")], "rank"),
        (["--coefficients", str(bad / "trunc.nii.gz")], "truncated"),
        (["--coefficients", str(d / "coef.nii.gz"), "--mask", str(bad / "mask.npy")], "mask has shape"),
        (["--coefficients", str(d / "coef.nii.gz"), "--sequence", str(bad / "missing.mat")], "not found"),
    ]
    for args, msg in cases:
        out = d / "never"
        assert main(["fit", "--model", str(d / "model"), "--out", str(out), "--quiet", *args]) == 2
        assert msg in capsys.readouterr().err
        assert not out.exists()
    assert main(["fit", "--nlls", "--coefficients", str(d / "coef.nii.gz"), "--out", str(d / "never")]) == 2
    assert "--basis" in capsys.readouterr().err
    assert main(["train", "--data", str(bad / "trunc.nii.gz"), "--out", str(d / "never")]) == 2
    assert not (d / "never").exists()
    assert sorted(os.listdir(d)) == sorted(x for x in os.listdir(d) if not x.startswith("."))  # no temp leftovers


def test_simulate_defaults_brain_prior_and_in_vivo_snr(pipeline):
    d, _ = pipeline
    meta = load_dataset(d / "train.h5")["meta"]
    assert meta["prior"] == "brain" and meta["snr"][0] <= 50 and meta["snr"][1] >= 300


def test_simulate_with_a_wider_basis_and_rank_uses_its_first_columns(pipeline, tmp_path, capsys):
    """--basis FILE --rank r: the first r columns (features 2r); --basis alone: all columns."""
    from sklearn_crb import MTFingerprintSimulator, Sequence

    U = MTFingerprintSimulator(Sequence.default(n_pulses=120), n_components=10, n_basis_samples=200,
                               random_state=0).fit().basis_  # 120 x 10
    np.save(tmp_path / "U.npy", U)
    common = ["--n-pulses", "120", "--quiet", "--n-samples", "20", "--basis", str(tmp_path / "U.npy")]
    assert main(["simulate", "--out", str(tmp_path / "r7.npz"), "--rank", "7", *common]) == 0
    assert main(["simulate", "--out", str(tmp_path / "all.npz"), *common]) == 0
    r7, full = load_dataset(tmp_path / "r7.npz"), load_dataset(tmp_path / "all.npz")
    assert r7["X"].shape == (20, 14) and full["X"].shape == (20, 20)
    np.testing.assert_allclose(r7["basis"], U[:, :7])
    assert main(["simulate", "--out", str(tmp_path / "r11.npz"), "--rank", "11", *common]) == 2
    assert "--rank 11 exceeds the 10 columns" in capsys.readouterr().err
    assert not (tmp_path / "r11.npz").exists()


def test_estimate_names_are_checked_before_work(tmp_path, capsys):
    """Time names are accepted by the check; a rate together with its time, or a bogus name, is one line."""
    for bad, msg in ((["R1f", "T1f"], "same rate"), (["bogus"], "unknown names")):
        assert main(["simulate", "--out", str(tmp_path / "x.npz"), "--n-pulses", "120", "--quiet",
                     "--estimate", *bad]) == 2
        err = capsys.readouterr().err
        assert msg in err and "--estimate" in err and err.count("\n") == 1
    assert not (tmp_path / "x.npz").exists()


def test_train_options_not_given_are_the_estimators_defaults(pipeline):
    """`train` without options builds CRBNetRegressor's own recipe: nothing is restated by the CLI, except the
    recipe's own choice, the noise input (with its SNR sampling and epochs); --no-noise-input is the estimator's."""
    from sklearn_crb.estimators.regressor import CRBNetRegressor
    from sklearn_crb.recipes import NOISE_AWARE_EPOCHS, make_network

    ref = CRBNetRegressor().get_params(deep=False)
    net = make_network("crb", None, progress=False).get_params(deep=False)
    for k in ("module", "lr", "batch_size", "optimizer", "train_split"):
        assert net[k] == ref[k], k
    assert (net["noise_input"], net["snr_sampling"], net["max_epochs"]) == (True, "log-uniform", NOISE_AWARE_EPOCHS)
    plain = make_network("crb", None, progress=False, noise_input=False).get_params(deep=False)
    for k in ("module", "max_epochs", "lr", "batch_size", "optimizer", "train_split", "noise_input", "snr_sampling"):
        assert plain[k] == ref[k], k
    assert not any(k.startswith("module__") for k in net if k not in ref)
    paper = make_network("crb", None, paper=True, progress=False)
    ref_paper = CRBNetRegressor.paper().get_params(deep=False)
    for k in ("module", "max_epochs", "lr", "batch_size", "optimizer", "train_split"):
        assert paper.get_params(deep=False)[k] == ref_paper[k], k
    assert paper.module is not net["module"]  # --paper is another network
    over = make_network("crb", None, epochs=3, hidden=[8], lr=0.5, progress=False)
    assert (over.max_epochs, over.lr, over.get_params()["module__hidden"]) == (3, 0.5, (8,))


def test_train_standardize_inputs_is_on_by_default_saved_and_refused_with_paper(pipeline):
    d, _ = pipeline
    from sklearn_crb.io.models import load_model

    for flag, want in ((None, True), ("--no-standardize-inputs", False)):
        out = d / f"model_std_{want}"
        argv = ["train", "--data", str(d / "train.h5"), "--out", str(out), "--epochs", "2", "--hidden", "16",
                "--device", "cpu", "--quiet"] + ([flag] if flag else [])
        assert main(argv) == 0
        assert json.loads((out / "model.json").read_text())["module_kwargs"]["standardize"] is want
        norm = load_model(out, device="cpu").module_.module.normalize
        assert norm.n_standardized == (norm.feat_scale.numel() if want else 0)
        if want:  # statistics taken from the first training batch, saved and loaded
            assert bool(norm.feat_ready) and float(norm.feat_scale.min()) > 0
            assert not torch.all(norm.feat_scale == 1)
    for flag in ("--standardize-inputs", "--no-standardize-inputs"):
        assert main(["train", "--data", str(d / "train.h5"), "--out", str(d / "never_std"), "--paper",
                     flag, "--quiet"]) == 2
        assert not (d / "never_std").exists()


def test_fit_times_writes_relaxation_time_maps(pipeline):
    d, ph = pipeline
    out = d / "fit_times"
    assert main(["fit", "--model", str(d / "model"), "--coefficients", str(d / "coef.nii.gz"),
                 "--out", str(out), "--quiet", "--times", "--sigma", "0.02"]) == 0
    T1 = nib.load(out / "T1f.nii.gz").get_fdata()[..., 0]
    R1 = nib.load(out / "R1f.nii.gz").get_fdata()[..., 0]
    T2 = nib.load(out / "T2f.nii.gz").get_fdata()[..., 0]
    R2 = nib.load(out / "R2f.nii.gz").get_fdata()[..., 0]
    assert (out / "T2f_se.nii.gz").exists() and (out / "T1f_se.nii.gz").exists()
    m = ph.mask
    np.testing.assert_allclose(T1[m], 1 / R1[m], rtol=1e-5)
    np.testing.assert_allclose(T2[m], 1e3 / R2[m], rtol=1e-5)
    units = json.loads((out / "summary.json").read_text())["units"]
    assert units["T1f"] == "s" and units["T2f"] == "ms"


@pytest.mark.slow
def test_demo_quick(tmp_path):
    """The README's main command through the installed console script, reduced
    (`sklearn-crb demo --quick`): runs end to end and writes its outputs."""
    import json
    import shutil
    import subprocess
    import sys

    exe = shutil.which("sklearn-crb")
    cmd = [exe] if exe else [sys.executable, "-c", "from sklearn_crb.cli import main; raise SystemExit(main())"]
    out_dir = tmp_path / "demo"
    proc = subprocess.run(cmd + ["demo", "--quick", "--quiet", "--out", str(out_dir)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "CRB net" in proc.stdout and "MSE net" in proc.stdout and "NLLS" in proc.stdout
    files = set(os.listdir(out_dir))
    assert {"maps.png", "error_maps.png", "bias_std.png", "results.json", "phantom_coefficients.nii.gz",
            "crb_model"} <= files
    res = json.loads((out_dir / "results.json").read_text())
    for r in res["results"]:
        assert r["n_voxels"] > 0 and all(np.isfinite(r["nmse"]))


def test_simulate_default_estimate_is_every_free_parameter_of_the_tied_model(tmp_path):
    out = tmp_path / "tied.npz"
    assert main(["simulate", "--out", str(out), "--n-samples", "4", "--rank", "6", "--n-basis-samples", "200",
                 "--n-pulses", "120", "--tied-R1", "--quiet"]) == 0
    data = load_dataset(out)
    assert data["meta"]["estimate"] == list(free_parameters(True)) and "R1s" not in data["meta"]["estimate"]
    assert data["y"].shape == (4, 7) and np.all(np.isfinite(data["crb"]))


def test_simulate_basis_method_crb_and_its_refusal_with_a_given_basis(tmp_path, capsys):
    """--basis-method crb learns a CRB-optimised basis (recorded in the set's meta), orthonormal; with --basis
    it is refused before any work."""
    from sklearn_crb.io.datasets import load_dataset

    out = tmp_path / "crb.npz"
    assert main(["simulate", "--out", str(out), "--n-samples", "50", "--rank", "6", "--n-pulses", "200",
                 "--tied-R1", "--estimate", "m0s", "R1f", "R2f", "--n-basis-samples", "64", "--n-crb-samples", "32",
                 "--basis-method", "crb", "--quiet"]) == 0
    d = load_dataset(out)
    U = d["basis"]
    np.testing.assert_allclose(U.conj().T @ U, np.eye(6), atol=1e-8)
    assert d["meta"]["basis_method"] == "crb"
    np.save(tmp_path / "U.npy", U)
    assert main(["simulate", "--out", str(tmp_path / "x.npz"), "--basis", str(tmp_path / "U.npy"), "--n-pulses", "200",
                 "--basis-method", "crb", "--quiet"]) == 2
    assert "cannot be combined with --basis" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


def test_fit_se_crb_maps_are_the_crb_at_the_estimate(pipeline):
    """--se crb: a network's standard-error maps are sqrt(CRB) at its estimate (every parameter estimated here),
    at the fitted |M0| and the reported sigma, recomputed with crb.cramer_rao_bound; --se delta differs."""
    from sklearn_crb import Sequence
    from sklearn_crb.crb import cramer_rao_bound

    d, ph = pipeline
    for se in ("crb", "delta"):
        assert main(["fit", "--model", str(d / "model"), "--coefficients", str(d / "coef.nii.gz"), "--se", se,
                     "--out", str(d / f"fit_{se}"), "--quiet"]) == 0
    load = lambda k, se: nib.load(d / f"fit_{se}" / f"{k}.nii.gz").get_fdata()[..., 0]  # noqa: E731
    summary = json.loads((d / "fit_crb" / "summary.json").read_text())
    assert summary["standard_error"] == "crb"
    ok = (load("flags", "crb") == 0) & (load("mask", "crb") > 0)
    vox = np.flatnonzero(ok)[:6]
    theta = np.stack([load(p, "crb").ravel()[vox] for p in PARAMETERS], 1)
    M0 = load("M0_abs", "crb").ravel()[vox]
    U = np.load(d / "model" / "basis.npy")
    crb = cramer_rao_bound(Sequence.default(n_pulses=120), theta, estimate=PARAMETERS, basis=U, M0=M0,
                           sigma=summary["sigma"])
    se = np.stack([load(p + "_se", "crb").ravel()[vox] for p in PARAMETERS], 1)
    np.testing.assert_allclose(se, np.sqrt(crb), rtol=2e-4)  # maps are stored as float32
    assert not np.allclose(load("m0s_se", "delta").ravel()[vox], se[:, 0], rtol=1e-2)


def test_fit_nlls_from_a_network_start_and_the_fast_schedules(pipeline, capsys, monkeypatch):
    """--nlls-init starts NLLS from a saved network and --fast takes the measured fast schedules (from the
    network, or cold from a dictionary start): the fitter gets exactly those options, the fits run end to end
    and the summary records them; misuse is refused before any work. (The schedules' accuracy is tested in
    test_nlls.py and measured in benchmarks/bench_nlls.py: on this 120-pulse phantom m0s is not identified.)"""
    import sklearn_crb.cli.fit as cli_fit

    d, ph = pipeline
    base = ["fit", "--nlls", "--tied-R1", "--n-pulses", "120", "--basis", str(d / "model" / "basis.npy"),
            "--coefficients", str(d / "coef.nii.gz"), "--quiet"]
    runs = {"default": ([], {}),
            "init": (["--nlls-init", str(d / "model")], {}),
            "init_fast": (["--nlls-init", str(d / "model"), "--fast"],
                          dict(lambda0=1e-3, se_tol=0.7, final_step=True)),
            "cold_fast": (["--fast"], dict(start="dictionary", n_dictionary=8000, lambda0=1e-2, se_tol=0.05,
                                           final_step=True))}
    seen = []
    real = cli_fit.NLLSFitter

    def spy(*args, **kw):
        seen.append(kw)
        return real(*args, **kw)

    monkeypatch.setattr(cli_fit, "NLLSFitter", spy)
    for name, (extra, expected) in runs.items():
        assert main([*base, *extra, "--out", str(d / f"nlls_{name}")]) == 0, name
        kw = seen[-1]
        assert {k: kw[k] for k in expected} == expected, name
        assert ("init" in kw) == ("init" in name) and ("lambda0" in kw) == ("fast" in name)
        if "init" in name:  # the saved network, whose named outputs start the fit
            assert tuple(kw["init"].target_names_) == tuple(PARAMETERS)
        summary = json.loads((d / f"nlls_{name}" / "summary.json").read_text())
        assert summary["nlls_init"] == (str(d / "model") if "init" in name else None)
        assert summary["nlls_fast"] == ("fast" in name)
        m0s = nib.load(d / f"nlls_{name}" / "m0s.nii.gz").get_fdata()[..., 0]
        assert np.all(np.isfinite(m0s[ph.mask]))
    for bad, msg in ((["--nlls-init", str(d / "model")], "--nlls"), (["--fast"], "--nlls")):
        assert main(["fit", "--model", str(d / "model"), "--coefficients", str(d / "coef.nii.gz"), "--quiet",
                     "--out", str(d / "never"), *bad]) == 2
        assert msg in capsys.readouterr().err
    U = np.load(d / "model" / "basis.npy")
    np.save(d / "other_basis.npy", np.roll(U, 1, axis=1))
    assert main(["fit", "--nlls", "--n-pulses", "120", "--basis", str(d / "other_basis.npy"), "--coefficients",
                 str(d / "coef.nii.gz"), "--quiet", "--nlls-init", str(d / "model"), "--out", str(d / "never")]) == 2
    assert "--nlls-init" in capsys.readouterr().err
    assert not (d / "never").exists()
