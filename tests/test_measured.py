"""Measured parameters (a B1 or B0 map) as network inputs: ``CRBNetRegressor(measured=...)`` (issue 12, item 2)."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from sklearn_crb.cli import main
from sklearn_crb.crb import cramer_rao_bound
from sklearn_crb.estimators.net.augmentation import augment_batch, augment_realizations
from sklearn_crb.estimators.net.measured import measured_nuisance, resolve_measured
from sklearn_crb.estimators.network import MLP, ResidualMLP
from sklearn_crb.estimators.regressor import CRBNetRegressor
from sklearn_crb.io.datasets import load_dataset
from sklearn_crb.io.models import load_model, save_model
from sklearn_crb.maps import fit_maps
from sklearn_crb.physics.parameters import INDEX
from sklearn_crb.simulator import MTFingerprintSimulator

EST = ("m0s", "R1f", "R2f")


@pytest.fixture(scope="module")
def b1_sim(short_sequence):
    """A rank-6 simulator on the 120-pulse sequence whose CRBs hold B1 known."""
    return MTFingerprintSimulator(short_sequence, n_components=6, estimate=EST, random_state=0, n_basis_samples=200,
                                  nuisance=measured_nuisance(EST, ("B1",))).fit()


@pytest.fixture(scope="module")
def b1_net(b1_sim):
    return CRBNetRegressor(simulator=b1_sim, measured=("B1",), max_epochs=3, random_state=0, module__hidden=(32, 32),
                           device="cpu").fit_simulated(600)


@pytest.mark.parametrize("cls", [MLP, ResidualMLP])
def test_measured_columns_bypass_the_normalisation(cls):
    kw = {} if cls is MLP else dict(hidden=(32, 28, 16))
    m = cls(n_features=28, n_outputs=3, n_conditioning=2, normalization="phase-l2", **kw).eval()
    x = torch.randn(7, 28, generator=torch.Generator().manual_seed(0))
    c = torch.complex(x[:, :13], x[:, 13:26]) * (2.5 * np.exp(0.7j))  # a complex M0 on the coefficients only
    x_scaled = torch.cat([c.real, c.imag, x[:, 26:]], dim=1).float()
    with torch.no_grad():
        y = m(x)
        assert torch.allclose(m(x_scaled), y, atol=1e-5)  # M0-invariant features
        x_b1 = x.clone()
        x_b1[:, 27] += 0.5
        assert (m(x_b1) - y).abs().max() > 1e-4  # the measured column reaches the network
        # the buffers standardise the measured columns: shifting both leaves the output unchanged
        m.normalize.cond_loc.fill_(0.5)
        m.normalize.cond_scale.fill_(2.0)
        x_std = x.clone()
        x_std[:, 26:] = x[:, 26:] * 2.0 + 0.5
        assert torch.allclose(m(x_std), y, atol=1e-5)
    assert {"normalize.cond_loc", "normalize.cond_scale"} <= set(m.state_dict())
    assert "normalize.cond_loc" not in MLP(n_features=26).state_dict()  # unconditioned: keys as before


def test_n_conditioning_is_checked():
    with pytest.raises(ValueError, match="n_conditioning"):
        MLP(n_features=4, n_conditioning=4)
    with pytest.raises(ValueError, match="even number of coefficient"):
        MLP(n_features=27, n_conditioning=2, normalization="phase-l2")


def test_augmentation_leaves_measured_columns_alone():
    rng = torch.Generator().manual_seed(0)
    Xd = {"X": torch.ones(4, 6), "k": torch.tensor([[0.8], [0.9], [1.0], [1.1]]), "w": torch.ones(4, 2),
          "c": torch.ones(4, 2)}
    out = augment_batch(Xd, rng, (10.0, 20.0), 0.01, "crb")
    assert torch.equal(out["k"], Xd["k"]) and not torch.equal(out["X"], Xd["X"])
    rep = augment_realizations(Xd, rng, (10.0, 20.0), 0.01, 3)
    assert torch.equal(rep["k"], Xd["k"].repeat_interleave(3, 0)) and rep["X"].shape == (12, 6)


def _confounded(n, seed):
    """Features that depend on theta * b only: theta is identifiable only when b is known."""
    rng = np.random.default_rng(seed)
    theta, b = rng.uniform(0.5, 2.0, n), rng.uniform(0.6, 1.4, n)
    k = np.arange(1, 7)
    X = np.hstack([np.cos(np.outer(theta * b, k) / 3), np.sin(np.outer(theta * b, k) / 3)])
    return X + rng.normal(0, 0.01, X.shape), theta, b


def test_a_measured_input_resolves_what_the_features_cannot():
    X, theta, b = _confounded(3000, 0)
    Xt, theta_t, b_t = _confounded(500, 1)
    kw = dict(loss="mse", max_epochs=60, batch_size=128, random_state=0, module__hidden=(64, 64),
              module__normalization=None, head=None, device="cpu")
    plain = CRBNetRegressor(**kw).fit(X, theta)
    cond = CRBNetRegressor(measured="B1", **kw).fit(np.column_stack([X, b]), theta)
    rmse_plain = np.sqrt(np.mean((plain.predict(Xt) - theta_t) ** 2))
    rmse_cond = np.sqrt(np.mean((cond.predict(np.column_stack([Xt, b_t])) - theta_t) ** 2))
    assert rmse_plain > 0.15  # theta * b alone leaves theta uncertain by about its spread
    assert rmse_cond < 0.35 * rmse_plain, (rmse_plain, rmse_cond)
    assert cond.n_features_in_ == 13 and cond.measured_ == ("B1",)
    np.testing.assert_allclose(cond.measured_loc_, [b.mean()], rtol=1e-6)


def test_fit_simulated_appends_the_drawn_b1_and_its_crbs_hold_b1_known(b1_sim, b1_net, short_sequence):
    assert b1_net.n_features_in_ == 2 * 6 + 1 and b1_net.measured_ == ("B1",)
    # the CRBs the simulator gives hold B1 known: below those with B1 unknown (an independent CRB call)
    _, _, crb, det = b1_sim.make_dataset(20, 3, return_details=True)
    both = cramer_rao_bound(short_sequence, det["theta"], estimate=EST, basis=b1_sim.basis_, M0=det["M0"],
                            sigma=b1_sim.sigma)
    known = cramer_rao_bound(short_sequence, det["theta"], estimate=EST, basis=b1_sim.basis_, M0=det["M0"],
                             sigma=b1_sim.sigma, nuisance=measured_nuisance(EST, ("B1",)))
    np.testing.assert_allclose(crb, known, rtol=1e-8)
    assert np.all(known <= both * (1 + 1e-9)) and np.any(known < 0.99 * both)


def test_predict_details_takes_the_measured_map_as_fixed(b1_sim, b1_net):
    X, _, _, det = b1_sim.make_dataset(40, 4, return_details=True)
    b1 = det["theta"][:, INDEX["B1"]]
    out = b1_net.predict_details(X, fixed={"B1": b1})
    np.testing.assert_array_equal(out.theta[:, INDEX["B1"]], b1)
    np.testing.assert_allclose(out.theta[:, :3], b1_net.predict(np.column_stack([X, b1])), rtol=1e-12)
    assert np.all(np.isfinite(out.var_unit[out.converged]))
    # another B1 map gives other estimates: the map conditions the network
    other = b1_net.predict_details(X, fixed={"B1": np.full(40, 0.7)}).theta[:, :3]
    assert np.abs(other - out.theta[:, :3]).max() > 1e-6
    with pytest.raises(ValueError, match="measured inputs"):
        b1_net.predict_details(X)


def test_refusals(b1_sim, b1_net, short_sequence):
    with pytest.raises(ValueError, match="also estimated"):
        resolve_measured(("R1f",), ("m0s", "T1f"))
    with pytest.raises(ValueError, match="not model parameters"):
        resolve_measured(("B0",))
    with pytest.raises(ValueError, match="twice"):
        resolve_measured(("B1", "B1"))
    with pytest.raises(TypeError, match="measured"):
        resolve_measured(3)
    unknown_b1 = MTFingerprintSimulator(short_sequence, n_components=6, estimate=EST, random_state=0,
                                        n_basis_samples=200).fit()
    with pytest.raises(ValueError, match=r"treats \['B1'\] as unknown"):
        CRBNetRegressor(simulator=unknown_b1, measured="B1", max_epochs=1).fit_simulated(50)
    X, y, crb, det = b1_sim.make_dataset(50, 5, return_details=True)
    with pytest.raises(ValueError, match="percent"):  # B1 given in percent
        CRBNetRegressor(measured="B1", max_epochs=1, simulator=b1_sim).fit(
            np.column_stack([X, 100 * det["theta"][:, INDEX["B1"]]]), y, crb=crb)
    with pytest.raises(ValueError, match="expecting 13 features"):
        b1_net.predict(X)  # the B1 column is missing
    with pytest.raises(ValueError, match="outside the physical range"):
        b1_net.predict(np.column_stack([X, np.full(50, -1.0)]))
    coeffs = (X[:, :6] + 1j * X[:, 6:]).reshape(5, 10, 6)
    with pytest.raises(ValueError, match="measured inputs"):  # before any chunk is fitted
        fit_maps(b1_net, coeffs)


def test_saved_model_keeps_the_measured_inputs(b1_sim, b1_net, tmp_path):
    X, _, _, det = b1_sim.make_dataset(30, 6, return_details=True)
    Xm = np.column_stack([X, det["theta"][:, INDEX["B1"]]])
    save_model(b1_net, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["measured"] == ["B1"] and meta["n_features"] == 13
    net = load_model(tmp_path / "m", device="cpu")
    assert net.measured_ == ("B1",)
    np.testing.assert_allclose(net.measured_loc_, b1_net.measured_loc_, rtol=1e-6)
    np.testing.assert_allclose(net.predict(Xm), b1_net.predict(Xm), rtol=1e-6)
    # weights whose measured-input scale is zero (a division by zero in every prediction) are refused
    from sklearn_crb.io.models import file_sha256

    good_state = torch.load(tmp_path / "m" / "params.pt", weights_only=True)
    bad_state = dict(good_state, **{"module.normalize.cond_scale": torch.zeros(1)})
    torch.save(bad_state, tmp_path / "m" / "params.pt")
    (tmp_path / "m" / "model.json").write_text(json.dumps(dict(meta, params_sha256=file_sha256(
        tmp_path / "m" / "params.pt"))))
    with pytest.raises(ValueError, match="cond_scale"):
        load_model(tmp_path / "m", device="cpu")
    torch.save(good_state, tmp_path / "m" / "params.pt")
    meta = dict(meta, params_sha256=file_sha256(tmp_path / "m" / "params.pt"))
    for bad, match in ((["os.system"], "not model parameters"), (["R2f"], "also estimated"), ([], "n_features"),
                       ("B1", "list of parameter names")):
        (tmp_path / "m" / "model.json").write_text(json.dumps(dict(meta, measured=bad)))
        with pytest.raises(ValueError, match=match):
            load_model(tmp_path / "m", device="cpu")


def test_cli_simulate_train_fit_with_a_b1_map(tmp_path, short_sequence, monkeypatch):
    from sklearn_crb.phantom import make_phantom

    common = ["--n-pulses", "120", "--quiet"]
    assert main(["simulate", "--out", str(tmp_path / "t.h5"), "--n-samples", "400", "--rank", "6", "--tied-R1",
                 "--estimate", "m0s", "R1f", "R2f", "--measured", "B1", "--n-basis-samples", "200", *common]) == 0
    data = load_dataset(tmp_path / "t.h5")
    assert data["meta"]["measured"] == ["B1"] and "B1" not in data["meta"]["nuisance"]
    train = ["--epochs", "2", "--hidden", "16", "--device", "cpu", "--quiet"]
    assert main(["train", "--data", str(tmp_path / "t.h5"), "--out", str(tmp_path / "mem"), *train]) == 0
    monkeypatch.setenv("SKLEARN_CRB_LAZY_BYTES", "0")  # the same set read batch by batch from HDF5
    assert main(["train", "--data", str(tmp_path / "t.h5"), "--out", str(tmp_path / "lazy"), *train]) == 0
    mem, lazy = load_model(tmp_path / "mem", device="cpu"), load_model(tmp_path / "lazy", device="cpu")
    assert mem.measured_ == lazy.measured_ == ("B1",)
    np.testing.assert_allclose(lazy.measured_loc_, mem.measured_loc_, rtol=1e-6)
    np.testing.assert_allclose(lazy.measured_scale_, mem.measured_scale_, rtol=1e-5)
    assert mem.noise_input_ and lazy.noise_input_  # the CLI's default: the noise column before the measured B1
    Xm = np.column_stack([data["X"][:20], np.full(20, data["meta"]["sigma"]), data["theta"][:20, INDEX["B1"]]])
    np.testing.assert_allclose(lazy.predict(Xm), mem.predict(Xm), rtol=1e-4, atol=1e-7)

    ph = make_phantom((8, 8), short_sequence, basis=mem.crb_metadata_["basis"], snr=50, random_state=0)
    c = ph.coefficients[:, :, None, :]
    aff = np.eye(4)
    nib.save(nib.Nifti1Image(np.concatenate([c.real, c.imag], -1).astype(np.float32), aff), tmp_path / "c.nii.gz")
    nib.save(nib.Nifti1Image(ph.fixed_maps(("B1",))["B1"][:, :, None].astype(np.float32), aff),
             tmp_path / "b1.nii.gz")
    fit = ["fit", "--model", str(tmp_path / "mem"), "--coefficients", str(tmp_path / "c.nii.gz"), "--quiet"]
    assert main([*fit, "--out", str(tmp_path / "no_map")]) == 2  # the network needs its B1 map
    assert not (tmp_path / "no_map").exists()
    assert main([*fit, "--out", str(tmp_path / "maps"), "--b1-map", str(tmp_path / "b1.nii.gz")]) == 0
    summary = json.loads((tmp_path / "maps" / "summary.json").read_text())
    assert "B1" in summary["fixed_maps"]
    m0s = nib.load(tmp_path / "maps" / "m0s.nii.gz").get_fdata()[..., 0]
    inside = nib.load(tmp_path / "maps" / "mask.nii.gz").get_fdata()[..., 0] > 0
    assert m0s.shape == (8, 8) and inside.any() and np.all(np.isfinite(m0s[inside]))
    # another B1 map conditions the network differently: other m0s values
    nib.save(nib.Nifti1Image(np.full((8, 8, 1), 0.8, np.float32), aff), tmp_path / "b1_flat.nii.gz")
    assert main([*fit, "--out", str(tmp_path / "flat"), "--b1-map", str(tmp_path / "b1_flat.nii.gz")]) == 0
    m0s_flat = nib.load(tmp_path / "flat" / "m0s.nii.gz").get_fdata()[..., 0]
    assert np.abs(m0s_flat[inside] - m0s[inside]).max() > 1e-6
    # the map's error in the standard-error maps: larger SE, recorded in the summary; bad values refused
    b1 = ["--b1-map", str(tmp_path / "b1.nii.gz")]
    assert main([*fit, "--out", str(tmp_path / "err"), *b1, "--fixed-se", "B1=0.05"]) == 0
    se0 = nib.load(tmp_path / "maps" / "m0s_se.nii.gz").get_fdata()[..., 0][inside]
    se1 = nib.load(tmp_path / "err" / "m0s_se.nii.gz").get_fdata()[..., 0][inside]
    assert np.all(se1 >= se0 * (1 - 1e-6)) and np.any(se1 > se0 * 1.01)
    assert json.loads((tmp_path / "err" / "summary.json").read_text())["fixed_map_errors"] == {"B1": 0.05}
    for bad in (["--fixed-se", "B1=-1"], ["--fixed-se", "B1=x"], ["--fixed-se", "omega0=1"], ["--fixed-se", "B1"]):
        assert main([*fit, "--out", str(tmp_path / "bad"), *b1, *bad]) == 2, bad
        assert not (tmp_path / "bad").exists()


def test_fixed_se_of_a_b0_map_is_in_its_unit():
    """--fixed-se omega0=VALUE is in the unit of --b0-map: Hz is converted to rad/s like the map itself."""
    from sklearn_crb.cli import build_parser
    from sklearn_crb.cli.fit import _fixed_errors

    base = ["fit", "--coefficients", "c.nii.gz", "--out", "o", "--b0-map", "b0.nii.gz", "--fixed-se", "omega0=2"]
    for unit, factor in (("Hz", 2 * np.pi), ("rad/s", 1.0)):
        args = build_parser().parse_args(base + ["--b0-unit", unit])
        assert _fixed_errors(args, {"omega0": np.zeros(3)}) == {"omega0": pytest.approx(2 * factor)}


def test_the_measured_input_buffers_standardise_the_training_column():
    """The module sees the measured column standardised by the training set's own mean and population std (the
    in-memory path; the lazy path is checked against it above). A planted wrong buffer (a sample std, another
    column's statistics, loc and scale swapped) fails this."""
    X, theta, b = _confounded(400, 3)
    b = 0.7 + 0.5 * b  # mean and spread far from 0 and 1, so that a missing standardisation shows
    kw = dict(loss="mse", max_epochs=1, batch_size=64, random_state=0, module__hidden=(8,),
              module__normalization=None, head=None, device="cpu")
    net = CRBNetRegressor(measured="B1", **kw).fit(np.column_stack([X, b]), theta)
    np.testing.assert_allclose(net.measured_loc_, [b.mean()], rtol=1e-10)
    np.testing.assert_allclose(net.measured_scale_, [b.std()], rtol=1e-10)
    norm = net.module_.module.normalize
    np.testing.assert_allclose(norm.cond_loc.cpu().numpy(), [b.mean()], rtol=1e-6)
    np.testing.assert_allclose(norm.cond_scale.cpu().numpy(), [b.std()], rtol=1e-6)
    with torch.no_grad():
        seen = norm.eval()(torch.as_tensor(np.column_stack([X, b]), dtype=torch.float32))[:, -1].double().numpy()
    assert abs(seen.mean()) < 1e-5 and abs(seen.std() - 1.0) < 1e-5
