"""``CRBNetRegressor(crb_at=...)``: the CRB loss weight at the truth or at the network's estimate.

The claim under test (see :mod:`sklearn_crb.estimators.net.crb_weighting`):
weights ``1/CRB(theta)`` at the true ``theta`` tilt an uninformed estimate
towards low-CRB values, weights at the estimate do not. Checked on a toy
model whose answer is known by symmetry, with a CRB that is not the model's
(the loss takes any positive per-sample normaliser), so nothing of the MT
physics is involved.
"""

import numpy as np
import pytest
import torch
from sklearn.base import clone

from sklearn_crb.estimators.net.crb_weighting import fit_log_weight_surrogate, resolve_crb_at
from sklearn_crb.estimators.net.losses import WeightedMSELoss
from sklearn_crb.estimators.regressor import CRBNetRegressor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _toy(n, seed):
    """theta ~ U[0, 1]; noise-free features of c = (1, theta) at M0 = 1; a CRB falling 400x towards 0."""
    th = np.random.default_rng(seed).uniform(0, 1, n)
    c = np.stack([np.ones(n), th], 1).astype(complex)
    X = np.concatenate([c.real, c.imag], 1)
    crb_unit = (0.05 + th[:, None]) ** 2
    return X, th[:, None], crb_unit


def _net(crb_at):
    return CRBNetRegressor(module__hidden=(64, 64), max_epochs=40, batch_size=256, lr=3e-3, crb_at=crb_at,
                           augment=True, snr=(6.0, 8.0), sigma=0.01, random_state=0, device="cpu")


@pytest.mark.parametrize("crb_at, loss, want", [
    ("auto", "crb", "estimate"), ("auto", "mse", "truth"), ("auto", "bias_reduced", "truth"),
    ("truth", "crb", "truth"), ("estimate", "crb", "estimate"),
])
def test_resolution(crb_at, loss, want):
    assert resolve_crb_at(crb_at, loss) == want


@pytest.mark.parametrize("crb_at, loss, match, net_match", [
    ("at-truth", "crb", "crb_at must be one of", "'crb_at' parameter of CRBNetRegressor must be a str among"),
    ("estimate", "mse", "loss='crb' only", "loss='crb' only"),
    ("estimate", "bias_reduced", "loss='crb' only", "loss='crb' only"),
])
def test_refused_settings(crb_at, loss, match, net_match):
    with pytest.raises(ValueError, match=match):
        resolve_crb_at(crb_at, loss)
    with pytest.raises(ValueError, match=net_match):
        _net(crb_at).set_params(loss=loss, max_epochs=1).fit(*_toy(64, 0)[:2], crb=_toy(64, 0)[2])


def test_weights_at_the_estimate_are_the_truths_where_they_coincide():
    """``w_truth * exp(g(theta_hat) - g(theta))``: equal to ``w_truth`` at ``theta_hat = theta`` whatever
    the surrogate; moved by the surrogate's ratio elsewhere, clipped at MAX_LOG_RATIO."""
    from sklearn_crb.estimators.net.crb_weighting import MAX_LOG_RATIO, LogWeightSurrogate, estimate_weights

    torch.manual_seed(0)
    sur = LogWeightSurrogate(2).eval().requires_grad_(False)
    y = torch.randn(50, 2)
    w = torch.rand(50, 2) + 0.5
    w[3, 1] = 0.0  # an infinite CRB stays weightless
    torch.testing.assert_close(estimate_weights(sur, w, y, y), w)
    y2 = y + 0.3
    want = w.double() * torch.exp((sur(y2) - sur(y)).double().clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    torch.testing.assert_close(estimate_weights(sur, w, y2, y), want.float())
    sur.body[-1].bias += torch.tensor([100.0, 0.0])  # a constant shift of g cancels
    torch.testing.assert_close(estimate_weights(sur, w, y2, y), want.float(), rtol=1e-4, atol=1e-5)


def test_surrogate_recovers_a_known_log_weight():
    """A smooth log weight of standardised targets is recovered; zero weights (infinite CRB) are left out."""
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(20000, 3))
    lw = np.stack([1.5 * Z[:, 0] - 0.5 * Z[:, 1] ** 2, np.sin(Z[:, 2]) + 3.0, -2.0 * Z[:, 0] * Z[:, 1]], 1)
    w = np.exp(lw)
    w[::7, 2] = 0.0  # an infinite CRB: weight 0, must not enter the fit as log 0
    sur, rms = fit_log_weight_surrogate(Z, w, seed=0, steps=2000)
    assert np.all(rms < 0.15), rms
    Zt = rng.normal(size=(2000, 3))
    want = np.stack([1.5 * Zt[:, 0] - 0.5 * Zt[:, 1] ** 2, np.sin(Zt[:, 2]) + 3.0, -2.0 * Zt[:, 0] * Zt[:, 1]], 1)
    with torch.no_grad():
        got = sur(torch.as_tensor(Zt, dtype=torch.float32)).double().numpy()
    inner = np.all(np.abs(Zt) < 2, axis=1)
    assert np.sqrt(np.mean((got - want)[inner] ** 2)) < 0.2
    assert not any(p.requires_grad for p in sur.parameters())


class _Recording(WeightedMSELoss):
    """The CRB criterion that keeps the weights of the last training batch."""

    def forward(self, y_pred, y_true, weight):
        self.last_weight = weight.detach().clone()
        return super().forward(y_pred, y_true, weight)


@pytest.mark.parametrize("augment", [True, False])
def test_training_weights_follow_the_data_not_the_truth(augment):
    """Identical features with different truths (and CRBs 1-100x apart): the weights at the truth spread
    with the CRB; at the estimate they are one function of the data, up to the surrogate's residual."""
    X, y, crb = _toy(256, 1)
    X[:] = X[0]  # one fingerprint, 256 different labels
    if not augment:
        X, crb = X * 1e6 * 0.01, crb / 1e8  # noise-free data at |M0| = 1e6 sigma and their CRBs
    spread = {}
    for crb_at in ("truth", "estimate"):
        net = _net(crb_at).set_params(criterion=_Recording, max_epochs=1, snr=(1e6, 1e6 * (1 + 1e-9)),
                                      batch_size=256, augment=augment)
        net.fit(X, y, crb=crb)
        w = np.log(net.criterion_.last_weight.numpy().ravel())
        spread[crb_at] = w.std()
    assert spread["truth"] > 1.0, spread  # log weights spread over a factor of 400
    assert spread["estimate"] < 0.1 * spread["truth"], spread


def test_clone_keeps_crb_at():
    net = _net("truth")
    assert clone(net).get_params()["crb_at"] == "truth"


@pytest.mark.slow
def test_estimate_weights_remove_the_tilt_towards_low_crb():
    """Toy: theta ~ U[0, 1], posterior std ~0.15 at SNR 6-8, CRB normaliser (0.05 + theta)^2. Around
    theta = 0.5 the posterior mean is unbiased by symmetry; the truth-weighted loss's minimiser is the
    posterior mean under the prior tilted by 1/CRB, i.e. pulled towards 0 (about -Var d log CRB/d theta
    = -0.08 at 0.5). The estimate-weighted net must stay close to the symmetric answer."""
    X, y, crb = _toy(6000, 2)
    Xt, yt, _ = _toy(400, 3)
    sel = (yt[:, 0] > 0.35) & (yt[:, 0] < 0.65)
    bias = {}
    for crb_at in ("truth", "estimate"):
        net = _net(crb_at).fit(X, y, crb=crb)
        bias[crb_at] = float(np.mean(net.predict(Xt[sel] * 0.07).ravel() - yt[sel, 0]))  # |M0| = 7 sigma
    assert bias["truth"] < -0.03, bias
    assert abs(bias["estimate"]) < 0.5 * abs(bias["truth"]), bias


@pytest.mark.parametrize("lazy", [False, True])
def test_cli_train_records_where_the_crb_was_evaluated(tmp_path, monkeypatch, lazy):
    """``train`` (in memory, and reading the HDF5 set lazily) fits the surrogate by default and records
    ``crb_at`` in model.json; ``--crb-at truth`` is the paper's weighting."""
    import json

    from sklearn_crb.cli import main

    if lazy:
        monkeypatch.setenv("SKLEARN_CRB_LAZY_BYTES", "0")
    data = tmp_path / "train.h5"
    assert main(["simulate", "--out", str(data), "--n-samples", "200", "--rank", "6", "--n-basis-samples", "100",
                 "--n-pulses", "120", "--estimate", "m0s", "R1f", "R2f", "--quiet"]) == 0
    for flag, want in (([], "estimate"), (["--crb-at", "truth"], "truth")):
        out = tmp_path / f"model_{want}"
        assert main(["train", "--data", str(data), "--out", str(out), "--epochs", "2", "--hidden", "8",
                     "--device", "cpu", "--quiet", *flag]) == 0
        assert json.loads((out / "model.json").read_text())["crb_at"] == want
    with pytest.raises(SystemExit):
        main(["train", "--data", str(data), "--out", str(tmp_path / "m3"), "--crb-at", "prediction"])
