"""``loss="bias_reduced"`` (Mao, Flassbeck, Assländer, arXiv 2312.11468): the loss, its noise realisations,
the pre-training schedule, sklearn compatibility, the CLI and the refused settings."""

import json

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV

from sklearn_crb.cli import main
from sklearn_crb.estimators.net.augmentation import augment_realizations
from sklearn_crb.estimators.net.losses import bias_reduced_loss
from sklearn_crb.estimators.network import MLP
from sklearn_crb.estimators.regressor import CRBNetRegressor
from sklearn_crb.metrics import make_crb_scorer
from sklearn_crb.simulator import MTFingerprintSimulator, pack_targets

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _loss_by_hand(y_pred, y_true, w, nr, lam, delta):
    """The loss of Mao et al. written out sample by sample (numpy, float64, loops)."""
    B, P = y_true.shape
    bias, hinge = np.zeros((B, P)), np.zeros((B, P))
    for b in range(B):
        for p in range(P):
            r = y_pred[b * nr:(b + 1) * nr, p]
            m = sum(r) / nr
            var = sum((v - m) ** 2 for v in r) / (nr - 1)
            bias[b, p] = w[b, p] * (m - y_true[b, p]) ** 2
            hinge[b, p] = max(w[b, p] * var - delta, 0.0)
    return bias.mean() + lam * hinge.mean(), bias.mean()


@pytest.mark.parametrize("lam, delta", [(1.0, 1.0), (0.3, 0.05), (0.0, 1.0)])
def test_loss_matches_the_formula_by_hand(lam, delta):
    rng = np.random.default_rng(0)
    B, nr, P = 5, 4, 3
    y_pred, y_true = rng.normal(size=(B * nr, P)), rng.normal(size=(B, P))
    w = rng.uniform(0.1, 3.0, (B, P))
    got = bias_reduced_loss(*(torch.as_tensor(a) for a in (y_pred, y_true, w)), nr, lam, delta).item()
    want, bias_only = _loss_by_hand(y_pred, y_true, w, nr, lam, delta)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    if lam == 0:
        np.testing.assert_allclose(got, bias_only, rtol=1e-12)  # lambda = 0: the squared-bias term alone
    else:
        assert got > bias_only  # the variances here exceed delta * CRB somewhere


def test_variance_hinge_is_zero_below_delta_crb():
    rng = np.random.default_rng(1)
    B, nr, P = 4, 6, 2
    w = rng.uniform(1.0, 2.0, (B, P))  # s^2/CRB
    centre = rng.normal(size=(B, P))
    spread = rng.normal(size=(B, nr, P))
    spread -= spread.mean(1, keepdims=True)
    spread /= np.sqrt((spread**2).sum(1, keepdims=True) / (nr - 1))  # unit sample variance per (b, p)
    delta = 0.5
    small = centre[:, None] + spread * np.sqrt(0.9 * delta / w)[:, None]  # Var = 0.9 delta CRB
    y_true = centre + 0.1
    t = lambda a: torch.as_tensor(a.reshape(-1, P) if a.ndim == 3 else a)  # noqa: E731
    below = bias_reduced_loss(t(small), t(y_true), t(w), nr, 5.0, delta).item()
    bias2 = (w * 0.1**2).mean()
    np.testing.assert_allclose(below, bias2, rtol=1e-10)
    large = centre[:, None] + spread * np.sqrt(3.0 * delta / w)[:, None]  # Var = 3 delta CRB: hinge 2 delta
    above = bias_reduced_loss(t(large), t(y_true), t(w), nr, 5.0, delta).item()
    np.testing.assert_allclose(above, bias2 + 5.0 * 2.0 * delta, rtol=1e-10)


def test_realizations_share_m0_and_rescale_the_weights():
    rng = np.random.default_rng(2)
    B, nr, r, sigma = 3, 5, 4, 0.01
    c = rng.normal(size=(B, r)) + 1j * rng.normal(size=(B, r))
    Xd = {"X": torch.as_tensor(np.hstack([c.real, c.imag])), "w": torch.ones(B, 2, dtype=torch.float64),
          "c": torch.full((B, 2), 2.0, dtype=torch.float64)}
    out = augment_realizations(Xd, torch.Generator().manual_seed(0), (1e5, 1e5 + 1), sigma, nr)
    X = out["X"].numpy()
    assert X.shape == (B * nr, 2 * r) and out["w"].shape == (B, 2)
    z = X[:, :r] + 1j * X[:, r:]
    M0 = np.array([np.vdot(c[i // nr], z[i]) / np.vdot(c[i // nr], c[i // nr]) for i in range(B * nr)])
    M0 = M0.reshape(B, nr)
    # one M0 per fingerprint (up to the noise, 1e-5 of |M0| here), different between fingerprints
    assert np.all(np.abs(M0 - M0[:, :1]) < 1e-4 * np.abs(M0[:, :1]))
    assert np.all(np.abs(np.diff(np.angle(M0[:, 0]))) > 1e-3)
    resid = z - M0.reshape(-1)[:, None] * np.repeat(c, nr, 0)
    assert np.all(np.abs(np.diff(resid.reshape(B, nr, r), axis=1)) > 0)  # fresh noise in every row
    gain = np.abs(M0[:, 0]) ** 2 / sigma**2
    np.testing.assert_allclose(out["w"].numpy()[:, 0], gain, rtol=1e-4)
    np.testing.assert_allclose(out["c"].numpy()[:, 1], 2 * gain, rtol=1e-4)


@pytest.fixture(scope="module")
def sim(short_sequence):
    return MTFingerprintSimulator(short_sequence, n_components=6, estimate=("m0s", "R1f", "R2f"), tied_R1=True,
                                  n_basis_samples=200, random_state=0).fit()


def _net(sim, **kw):
    p = dict(module=MLP, module__hidden=(16, 16), simulator=sim, max_epochs=4, pretrain_epochs=2, n_realizations=3,
             batch_size=50, random_state=0, device="cpu", loss="bias_reduced")
    p.update(kw)
    return CRBNetRegressor(**p)


class _RowSpy(CRBNetRegressor):
    """Records the rows of every training forward pass, per epoch."""

    def infer(self, x, **fit_params):
        if self.module_.training:
            self.rows_.setdefault(len(self.history), []).append(int(x["X"].shape[0]))
        return super().infer(x, **fit_params)


def test_fit_simulated_pretrains_then_fine_tunes_and_keeps_the_schedule(sim):
    net = _RowSpy(**_net(sim, train_split=0.2).get_params(deep=False))
    net.rows_ = {}
    net.fit_simulated(250)
    # 200 training fingerprints in batches of 50: the CRB loss for 2 epochs, then 3 realisations each
    assert net.rows_ == {1: [50] * 4, 2: [50] * 4, 3: [150] * 4, 4: [150] * 4}
    h = net.history
    assert np.all(np.isfinite(h[:, "train_loss"])) and np.all(np.isfinite(h[:, "valid_crb"]))
    sched = dict(net.callbacks_)["onecycle"].lr_scheduler_
    assert sched.last_epoch == 4 * 4  # one step per batch, also in the fine-tuning epochs
    assert net.optimizer_.param_groups[0]["lr"] < 0.1 * net.lr  # annealing on through the fine-tuning epochs
    X, y, crb = sim.make_dataset(40, 5)
    pred = net.predict(X)
    assert pred.shape == (40, 3) and np.all(np.isfinite(pred))


def test_params_clone_and_set_params(sim):
    net = _net(sim, n_realizations=7, bias_lambda=0.5, var_delta=2.0, pretrain_epochs=3)
    p = net.get_params(deep=False)
    assert (p["loss"], p["n_realizations"], p["bias_lambda"], p["var_delta"], p["pretrain_epochs"]) == (
        "bias_reduced", 7, 0.5, 2.0, 3)
    c = clone(net)
    assert {k: c.get_params(deep=False)[k] for k in p if k != "simulator"} == {
        k: v for k, v in p.items() if k != "simulator"}
    c.set_params(bias_lambda=0.0, n_realizations=2)
    assert (c.bias_lambda, c.n_realizations, net.bias_lambda) == (0.0, 2, 0.5)
    d = CRBNetRegressor().get_params()
    assert (d["n_realizations"], d["bias_lambda"], d["var_delta"], d["pretrain_epochs"]) == (16, 1.0, 1.0, 0)


def test_gridsearch_over_lambda_with_the_crb_scorer(sim):
    _, y, _, det = sim.make_dataset(240, 3, return_details=True)
    # sklearn's clone gives the search an unfitted copy of a simulator= parameter: the noise model is given instead
    net = _net(None, max_epochs=2, pretrain_epochs=1, augment=True, snr=sim.snr, sigma=sim.sigma)
    gs = GridSearchCV(net, {"bias_lambda": [0.0, 1.0]}, cv=2, scoring=make_crb_scorer(), error_score="raise")
    gs.fit(det["X_clean"], pack_targets(y, det["crb_unit"]))
    for k in ("split0_test_score", "split1_test_score"):
        assert np.all(np.isfinite(gs.cv_results_[k]))
    assert gs.best_params_["bias_lambda"] in (0.0, 1.0)
    assert gs.best_estimator_.loss == "bias_reduced"


@pytest.mark.parametrize("kw, match", [
    ({"n_realizations": 1}, r"'n_realizations' parameter of CRBNetRegressor must be an int in the range \[2, inf\)"),
    ({"n_realizations": 2.5}, r"'n_realizations' parameter of CRBNetRegressor must be an int in the range \[2"),
    ({"bias_lambda": -0.1}, r"'bias_lambda' parameter of CRBNetRegressor must be a float in the range \[0.0, inf\)"),
    ({"bias_lambda": float("inf")}, r"'bias_lambda' parameter of CRBNetRegressor .* Got inf instead"),
    ({"var_delta": float("nan")}, r"'var_delta' parameter of CRBNetRegressor must be a float in the range \[0.0"),
    ({"pretrain_epochs": -1}, r"'pretrain_epochs' parameter of CRBNetRegressor must be an int in the range \[0"),
    ({"pretrain_epochs": 5, "max_epochs": 4}, r"pretrain_epochs \(5\) must not exceed max_epochs \(4\)"),
    ({"augment": False}, "needs augment=True"),
])
def test_bad_settings_are_refused(sim, kw, match):
    with pytest.raises(ValueError, match=match):
        _net(sim, **kw).fit_simulated(60)


def test_fit_without_augmentation_is_refused(sim):
    X, y, crb = sim.make_dataset(60, 1)
    with pytest.raises(ValueError, match="needs augment=True"):
        _net(sim).fit(X, y, crb=crb)  # augment="auto" is False in fit
    with pytest.raises(ValueError, match="needs the per-sample CRB"):
        _net(sim, augment=True).fit(X, y)


def test_cli_train_bias_reduced_writes_a_model(tmp_path, capsys):
    data = tmp_path / "train.h5"
    assert main(["simulate", "--out", str(data), "--n-samples", "120", "--rank", "6", "--n-basis-samples", "100",
                 "--n-pulses", "120", "--estimate", "m0s", "R1f", "R2f", "--quiet"]) == 0
    out = tmp_path / "model"
    assert main(["train", "--data", str(data), "--out", str(out), "--loss", "bias_reduced", "--epochs", "2",
                 "--pretrain-epochs", "1", "--n-realizations", "3", "--bias-lambda", "0.5", "--var-delta", "1",
                 "--hidden", "8", "--device", "cpu", "--quiet"]) == 0
    meta = json.loads((out / "model.json").read_text())
    assert meta["loss"] == "bias_reduced" and (out / "params.pt").is_file()
    assert "bias_reduced-loss network" in capsys.readouterr().out
    bad = tmp_path / "model2"
    assert main(["train", "--data", str(data), "--out", str(bad), "--loss", "bias_reduced", "--epochs", "2",
                 "--no-augment", "--quiet"]) == 2
    assert "cannot take --no-augment" in capsys.readouterr().err and not (bad / "model.json").exists()
    with pytest.raises(SystemExit):
        main(["train", "--data", str(data), "--out", str(bad), "--loss", "bias_reduced", "--n-realizations", "1"])
