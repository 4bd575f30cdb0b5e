"""Tests of CRBNetRegressor (sklearn_crb.estimators.regressor)."""

import pickle

import numpy as np
import pytest
import sklearn
import torch
from conftest import small_crb_net as small_net
from conftest import toy_problem as toy
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, PredefinedSplit
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from skorch.callbacks import Checkpoint, EarlyStopping, ProgressBar
from skorch.dataset import ValidSplit

from sklearn_crb.estimators.network import MLP, ResidualMLP
from sklearn_crb.estimators.regressor import CRBNetRegressor, paper_lr_scheduler
from sklearn_crb.metrics import crb_normalized_mse, make_crb_scorer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_defaults_and_params():
    net = CRBNetRegressor()
    p = net.get_params()
    assert p["loss"] == "crb" and p["device"] == "auto" and p["train_split"] is None
    # the default recipe (issue 9): MLP, AdamW lr 2e-3, one-cycle, batch 512, bounded head
    assert p["module"] is MLP and p["optimizer"] is torch.optim.AdamW and p["lr"] == 2e-3
    assert p["batch_size"] == 512 and p["lr_schedule"] == "onecycle" and p["head"] == "auto"
    assert p["nuisance_weight_cap"] == 400.0
    paper = CRBNetRegressor.paper(max_epochs=3)
    assert paper.module is ResidualMLP and paper.lr == 1e-2 and paper.batch_size == 1024 and paper.max_epochs == 3
    c = clone(CRBNetRegressor(module__hidden=(8,), loss="mse"))
    assert c.get_params()["module__hidden"] == (8,) and c.loss == "mse"
    assert net.device_.type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("loss", ["crb", "mse", "relative"])
def test_validation_loss_matches_hand_computation(loss):
    X, y, crb = toy()
    fold = np.full(len(y), -1)
    fold[::4] = 0
    net = small_net(loss=loss, max_epochs=2, train_split=ValidSplit(PredefinedSplit(fold)), target_names=("a", "b"))
    net.fit(X, y, crb=crb)
    val = fold == 0
    p = net.predict(X[val])
    err = (p - y[val]) ** 2
    hand = {"crb": err / crb[val], "mse": err, "relative": err / y[val] ** 2}[loss]
    assert net.history[-1, "valid_loss"] == pytest.approx(hand.mean(), rel=2e-4)
    # per-parameter CRB-normalised validation columns, whatever the loss
    nm = crb_normalized_mse(y[val], p, crb=crb[val], multioutput="raw_values")
    assert net.history[-1, "valid_crb_a"] == pytest.approx(nm[0], rel=2e-4)
    assert net.history[-1, "valid_crb_b"] == pytest.approx(nm[1], rel=2e-4)
    assert net.history[-1, "valid_crb"] == pytest.approx(nm.mean(), rel=2e-4)


class _AlignmentCheckingNet(CRBNetRegressor):
    """Checks inside every training batch that the loss weight belongs to the sample."""

    def get_loss(self, y_pred, y_true, X=None, training=False):
        if training:
            y = y_true.double().cpu().numpy() * self.y_scale_ + self.y_mean_
            # crb was built as a function of y: 1/w * scale^2 must equal it row by row
            expected = 1e-3 * (1 + y**2)
            got = self.y_scale_**2 / X["w"].double().cpu().numpy()
            np.testing.assert_allclose(got, expected, rtol=1e-5)
            self.checked_batches_ = getattr(self, "checked_batches_", 0) + 1
        return super().get_loss(y_pred, y_true, X=X, training=training)


def test_crb_follows_its_sample_through_shuffling_batching_and_folds():
    X, y, _ = toy(210)
    crb = 1e-3 * (1 + y**2)
    net = _AlignmentCheckingNet(module=MLP, module__hidden=(8,), module__normalization=None, max_epochs=2,
                                batch_size=13, train_split=0.2, random_state=1, crb_at="truth")
    net.fit(X, y, crb=crb)
    assert net.checked_batches_ >= 2 * (168 // 13)
    # GridSearchCV (legacy fit params) slices crb per fold
    gs = GridSearchCV(net, {"batch_size": [7, 16]}, cv=3, scoring="neg_mean_squared_error", refit=False)
    gs.fit(X, y, crb=crb)
    assert np.all(np.isfinite(gs.cv_results_["mean_test_score"]))


def test_crb_weighting_changes_the_solution():
    # identical inputs, conflicting targets: the weighted optimum follows the small-CRB group
    rng = np.random.default_rng(0)
    n = 256
    X = rng.normal(size=(n, 4))
    group = np.arange(n) % 2
    y = group.astype(float)
    crb = np.where(group == 0, 1e-3, 1e2)
    net = small_net(module__hidden=(4,), max_epochs=40, lr=3e-2, crb_at="truth")
    net.fit(X, y, crb=crb)
    assert abs(net.predict(X).mean()) < 0.1  # 0.5 if the CRBs were not matched to their samples
    mse = small_net(module__hidden=(4,), max_epochs=40, lr=3e-2, loss="mse").fit(X, y)
    assert abs(mse.predict(X).mean() - 0.5) < 0.15
    assert net.predict(X).ndim == 1  # 1-D y gives 1-D predictions


def test_gridsearch_routing_sequential_and_dask():
    distributed = pytest.importorskip("dask.distributed")
    import joblib

    X, y, crb = toy(300)
    grid = {"module__hidden": [(2,), (32, 32)]}
    with sklearn.config_context(enable_metadata_routing=True):
        net = small_net(max_epochs=8).set_fit_request(crb=True)
        scorer = make_crb_scorer("efficiency")
        seq = GridSearchCV(net, grid, cv=2, scoring=scorer).fit(X, y, crb=crb)
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp",
                                      host="127.0.0.1", dashboard_address=None) as cluster, distributed.Client(cluster):
            with joblib.parallel_config(backend="dask"):
                par = GridSearchCV(net, grid, cv=2, scoring=scorer, n_jobs=2).fit(X, y, crb=crb)
    assert seq.best_params_ == par.best_params_ == {"module__hidden": (32, 32)}
    np.testing.assert_allclose(seq.cv_results_["mean_test_score"], par.cv_results_["mean_test_score"], rtol=1e-4)


def test_pipeline_legacy_and_routed():
    X, y, crb = toy(200)
    pipe = Pipeline([("scale", StandardScaler()), ("net", small_net())])
    pipe.fit(X, y, net__crb=crb)
    assert pipe.predict(X).shape == y.shape
    with sklearn.config_context(enable_metadata_routing=True):
        pipe2 = Pipeline([("scale", StandardScaler()), ("net", small_net().set_fit_request(crb=True))])
        pipe2.fit(X, y, crb=crb)
    np.testing.assert_allclose(pipe.predict(X), pipe2.predict(X), rtol=1e-5, atol=1e-7)


def test_save_load_pickle_and_trim_identity(tmp_path):
    X, y, crb = toy(200)
    net = small_net(module=MLP, module__normalization="l2").fit(X, y, crb=crb)
    p = net.predict(X)
    assert p.dtype == np.float64 and p.shape == y.shape
    net.save_params(f_params=tmp_path / "p.pt")
    new = CRBNetRegressor(module=MLP, module__hidden=(32, 32), module__n_features=12, module__n_outputs=2,
                          module__batch_norm=True, module__activation="relu", module__normalization="l2")
    new.initialize().load_params(f_params=tmp_path / "p.pt")
    np.testing.assert_array_equal(new.predict(X), p)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(net)).predict(X), p)
    size = len(pickle.dumps(net))
    net.trim_for_prediction()
    np.testing.assert_array_equal(net.predict(X), p)
    assert len(pickle.dumps(net)) < size


def test_callbacks_history_and_schedule(tmp_path):
    X, y, crb = toy(300)
    sched = paper_lr_scheduler(1e-2, step_size=2, gamma=0.5, min_lr=3e-3)
    net = small_net(max_epochs=30, train_split=0.25, lr=1e-2, callbacks=[
        ("lr", sched), ("stop", EarlyStopping(monitor="valid_crb", patience=2, threshold=10.0)),
        ("ckpt", Checkpoint(monitor="valid_crb_best", dirname=str(tmp_path))), ("bar", ProgressBar())])
    net.fit(X, y, crb=crb)
    assert len(net.history) < 30  # the (deliberately impatient) early stopping fired
    lrs = [g["lr"] for g in net.optimizer_.param_groups]
    assert lrs[0] == pytest.approx(max(1e-2 * 0.5 ** (len(net.history) // 2), 3e-3))
    assert (tmp_path / "params.pt").is_file()
    assert {"valid_crb", "valid_crb_y0", "valid_crb_y1"} <= set(net.history[-1])


def test_augmentation_redraws_noise_and_keeps_validation_fixed():
    X, y, crb = toy(256)
    seen = []

    class Spy(CRBNetRegressor):
        def get_loss(self, y_pred, y_true, X=None, training=False):
            if training:
                seen.append((X["X"].detach().numpy().copy(), X["w"].detach().numpy().copy()))
            return super().get_loss(y_pred, y_true, X=X, training=training)

    Xc = X / np.linalg.norm(X, axis=1, keepdims=True)  # noise-free features with |c| = 1
    net = Spy(module=MLP, module__hidden=(8,), module__batch_norm=False, max_epochs=3, lr=0.0, augment=True,
              snr=(10, 100), sigma=0.01, batch_size=64, train_split=0.25, random_state=0)
    net.fit(Xc, y, crb=crb)
    xb, wb = seen[0]
    gain = wb / (net.y_scale_**2 / crb.max(0))  # |M0|^2 / sigma^2 >= (10 ... 100)^2 / max ratio
    amp = np.linalg.norm(xb, axis=1)  # ~ |M0| (noise norm ~ 0.035)
    assert np.all((amp > 0.1 - 0.06) & (amp < 1.0 + 0.06))
    # the CRB weight is rescaled by |M0|^2/sigma^2 of the same draw: 1/CRB ratio ~ amp^2 / sigma^2
    assert np.all(gain > 0)
    snr2 = wb[:, 0] / wb[:, 0].min()
    assert np.corrcoef(np.log(snr2), np.log(amp))[0, 1] > 0.5
    # fresh draws every epoch, the same validation draw every epoch (lr = 0, no BatchNorm: the net is fixed)
    assert not np.allclose(net.history[0, "train_loss"], net.history[1, "train_loss"])
    assert net.history[0, "valid_loss"] == net.history[1, "valid_loss"] == net.history[2, "valid_loss"]


def test_bad_input_errors():
    X, y, crb = toy(50)
    with pytest.raises(ValueError, match="crb"):
        small_net().fit(X, y)
    with pytest.raises(ValueError, match="crb must have the shape"):
        small_net().fit(X, y, crb=crb[:, :1])
    with pytest.raises(ValueError, match="crb must be strictly positive"):
        small_net().fit(X, y, crb=-crb)
    Xn = X.copy()
    Xn[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN|infinity"):
        small_net().fit(Xn, y, crb=crb)
    with pytest.raises(ValueError, match="loss"):
        small_net(loss="huber").fit(X, y, crb=crb)
    with pytest.raises(ValueError, match="zeros"):
        small_net(loss="relative").fit(X, np.where(y > 0.1, y, 0.0))
    with pytest.raises(NotFittedError):
        small_net().predict(X)
    net = small_net(max_epochs=1, module__normalization="l2").fit(X, y, crb=crb)
    with pytest.raises(ValueError, match="features"):
        net.predict(X[:, :5])
    Xz = X.copy()
    Xz[7] = 0
    with pytest.raises(ValueError, match="mask"):
        net.predict(Xz)
    with pytest.raises(ValueError, match="simulator"):
        small_net(simulator=object()).fit(X, y)


@pytest.mark.slow
@pytest.mark.parametrize("crb_at, factor", [("truth", 0.6), ("estimate", 0.9)])
def test_simulated_training_beats_prior_mean(short_sequence, crb_at, factor):
    """The nMSE is judged at the true CRB, which is the loss of ``crb_at="truth"``: on this prior-dominated
    120-pulse problem (m0s nMSE ~0.005) the estimate-weighted net scores worse there by construction."""
    from sklearn_crb.simulator import MTFingerprintSimulator

    sim = MTFingerprintSimulator(short_sequence, n_components=8, tied_R1=True, prior="paper2022",
                                 snr=(300.0, 1000.0), n_basis_samples=200, random_state=0).fit()
    net = CRBNetRegressor(module=MLP, module__hidden=(64, 64), module__normalization="first-coefficient",
                          simulator=sim, max_epochs=30, batch_size=32, lr=3e-3, random_state=0, crb_at=crb_at)
    net.fit_simulated(1200)
    assert net.augment_ and net.target_names_ == ("m0s", "R1f", "R2f") and net.crb_at_ == crb_at
    Xt, yt, ct = sim.make_dataset(400, random_state=7)
    nm_net = crb_normalized_mse(yt, net.predict(Xt), crb=ct)
    nm_prior = crb_normalized_mse(yt, np.tile(yt.mean(0), (len(yt), 1)), crb=ct)
    # measured over seeds 0-2: truth 4.3-4.4, estimate 6.0-6.5 (R2f 13 against 18-19), prior mean 7.9
    assert nm_net < factor * nm_prior
    # without crb= there is no CRB from y (it would miss the nuisance parameters and the SNR)
    net2 = CRBNetRegressor(module=MLP, module__hidden=(8,), simulator=sim, max_epochs=1, random_state=0)
    with pytest.raises(ValueError, match="crb"):
        net2.fit(Xt[:100], yt[:100])


@pytest.fixture(scope="module")
def tied7(short_sequence):
    from sklearn_crb.simulator import MTFingerprintSimulator

    est = ("m0s", "R1f", "R2f", "Rex", "T2s", "omega0", "B1")
    sim = MTFingerprintSimulator(short_sequence, n_components=6, estimate=est, tied_R1=True, random_state=0,
                                 n_basis_samples=200).fit()
    X, y, crb = sim.make_dataset(256, 1)
    return sim, X, y, crb


def test_nuisance_weight_cap_changes_only_nuisance_weights(tied7):
    from sklearn_crb.estimators.net.losses import batch_weights

    sim, X, y, crb = tied7
    ws = {}
    for cap in (400.0, None):
        net = CRBNetRegressor(module__hidden=(8,), simulator=sim, max_epochs=1, nuisance_weight_cap=cap,
                              random_state=0, device="cpu").fit(X, y, crb=crb)
        Xb = {"w": torch.as_tensor(y.shape[0] * [[0.0] * 7]) + torch.as_tensor(
            (net.y_scale_**2 / crb).astype(np.float32))}
        ws[cap] = batch_weights(Xb, "crb", net.module_.scale, torch.zeros(1), net.loss_weight_cap_).numpy()
    nuis = [3, 4, 5, 6]  # Rex, T2s, omega0, B1
    np.testing.assert_array_equal(ws[400.0][:, :3], ws[None][:, :3])  # m0s, R1f, R2f never capped
    np.testing.assert_allclose(ws[400.0][:, nuis], np.minimum(ws[None][:, nuis], 400.0), rtol=1e-6)
    assert ws[None][:, 5].max() > 400.0 and ws[400.0][:, nuis].max() <= 400.0  # omega0 is capped in this batch
    with pytest.raises(ValueError, match="nuisance_weight_cap"):
        CRBNetRegressor(module__hidden=(8,), simulator=sim, max_epochs=1, nuisance_weight_cap=-1.0,
                        device="cpu").fit(X, y, crb=crb)


def test_short_fit_on_all_seven_tied_targets_predicts_finite_values(tied7):
    sim, X, y, crb = tied7
    net = CRBNetRegressor(module__hidden=(32, 32), simulator=sim, max_epochs=3, random_state=0, device="cpu")
    net.fit_simulated(256)
    pred = net.predict(X)
    assert pred.shape == (256, 7) and np.all(np.isfinite(pred))
    assert np.all(np.isfinite(net.history[:, "train_loss"]))
    tol = 1e-5 * np.maximum(np.abs(net.target_low_), np.abs(net.target_high_))  # float32 network
    assert np.all(pred >= net.target_low_ - tol) and np.all(pred <= net.target_high_ + tol)
    assert net.target_log_.tolist() == [False, True, True, False, False, False, False]


def test_input_standardisation_comes_from_the_first_training_batch_and_survives_refit():
    """MLP(standardize=True) inside the regressor: the statistics are those of the first (shuffled, packed)
    batch's normalised features, are fixed through the rest of training, and a new fit takes new ones."""
    X, y, crb = toy(300)
    X = X * np.r_[np.full(6, 5.0), np.full(6, 0.01)]  # features of very different scales
    net = small_net(module=MLP, module__normalization=None, module__standardize=True, max_epochs=3,
                    batch_size=300, lr_schedule=None)
    net.fit(X, y, crb=crb)
    norm = net.module_.module.normalize
    assert bool(norm.feat_ready)
    # one batch of all rows (the shuffled order changes neither mean nor std)
    np.testing.assert_allclose(norm.feat_loc.numpy(), X.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(norm.feat_scale.numpy(), X.std(0), rtol=1e-4)
    first = norm.feat_scale.clone()
    net.fit(2.0 * X, y, crb=crb)  # fit re-initialises the module: the scales follow the new data
    np.testing.assert_allclose(net.module_.module.normalize.feat_scale.numpy(), 2.0 * first.numpy(), rtol=1e-4)


# ---------------------------------------------------------------- 0.2: declared parameters, the one-cycle callback
@pytest.mark.parametrize("kw", [{"max_epochs": 0}, {"batch_size": 0}, {"batch_size": -5}])
def test_epochs_and_batch_size_below_one_are_refused_before_training(kw):
    """Issue 29: max_epochs=0 returned an untrained net, batch_size=-5 trained with batches of 1, 0 divided by 0."""
    X, y, crb = toy(64)
    name = next(iter(kw))
    with pytest.raises(ValueError, match=rf"'{name}' parameter of CRBNetRegressor must be an int in the range \[1"):
        small_net(**kw).fit(X, y, crb=crb)
    whole = small_net(batch_size=-1, max_epochs=1).fit(X, y, crb=crb)  # skorch's -1: one batch of all rows
    assert len(whole.history[-1]["batches"]) == 1


def test_one_cycle_is_an_lr_scheduler_callback_with_the_0_1_rates():
    """The rate of every training batch is recorded and equals the 0.1 schedule (torch's OneCycleLR, peak lr,
    10 % warm-up, max_epochs x batches + 1 steps, at least 20); callbacks__onecycle=None switches it off."""
    from skorch.callbacks import LRScheduler

    X, y, crb = toy(300)
    net = small_net(lr_schedule="onecycle", lr=1e-2, max_epochs=3, batch_size=64).fit(X, y, crb=crb)
    cb = dict(net.callbacks_)["onecycle"]
    assert isinstance(cb, LRScheduler) and cb.step_every == "batch"
    lrs = [b["event_lr"] for h in net.history for b in h["batches"]]
    for epochs, n in ((3, 300), (40, 300)):  # 20 steps (the floor), then 201 steps
        total = max(epochs * -(-n // 64) + 1, 20)
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-2)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=total, pct_start=0.1)
        want = []
        for _ in range(epochs * -(-n // 64)):
            want.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        if epochs == 3:
            assert len(lrs) == 15
            np.testing.assert_array_equal(lrs, want)
    long = small_net(lr_schedule="onecycle", lr=1e-2, max_epochs=40, batch_size=64).fit(X, y, crb=crb)
    np.testing.assert_array_equal([b["event_lr"] for h in long.history for b in h["batches"]], want)
    off = small_net(lr_schedule="onecycle", callbacks__onecycle=None, lr=1e-2, max_epochs=2).fit(X, y, crb=crb)
    assert all("event_lr" not in b for h in off.history for b in h["batches"])
    assert off.optimizer_.param_groups[0]["lr"] == 1e-2


def test_weight_decay_is_the_optimizers_parameter_and_the_old_name_an_alias():
    X, y, crb = toy(128)
    base = dict(module__hidden=(8,), max_epochs=2, batch_size=64, random_state=0, device="cpu", loss="mse")
    net = CRBNetRegressor(**base).fit(X, y)
    assert net.get_params()["optimizer__weight_decay"] == 1e-4
    assert net.optimizer_.param_groups[0]["weight_decay"] == 1e-4
    assert clone(net).get_params()["optimizer__weight_decay"] == 1e-4
    with pytest.warns(FutureWarning, match="optimizer__weight_decay"):
        old = CRBNetRegressor(weight_decay=1e-4, optimizer__weight_decay=0.5, **base).fit(X, y)
    np.testing.assert_array_equal(old.predict(X), net.predict(X))  # the 0.1 spelling trains the same net
    other = CRBNetRegressor(optimizer__weight_decay=0.5, **base).fit(X, y)
    assert other.optimizer_.param_groups[0]["weight_decay"] == 0.5
    assert not np.array_equal(other.predict(X), net.predict(X))


def test_only_the_regressor_sets_a_nets_attributes():
    """Helpers return values: no module of the estimators but the regressor assigns an attribute of ``net``."""
    import ast
    from pathlib import Path

    import sklearn_crb.estimators as est

    offenders = []
    for path in Path(est.__file__).parent.rglob("*.py"):
        if path.name == "regressor.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else (
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
            for t in targets:
                for e in (t.elts if isinstance(t, ast.Tuple) else [t]):
                    if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) and e.value.id == "net":
                        offenders.append(f"{path.name}:{e.lineno} net.{e.attr}")
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr" and node.args
                    and getattr(node.args[0], "id", None) == "net"):
                offenders.append(f"{path.name}:{node.lineno} setattr(net, ...)")
    assert not offenders, offenders


def test_every_random_stream_is_registered():
    """Every seed comes from one registry: each `_seed(...)` names a stream of SEED_STREAMS, all are used."""
    import re
    from pathlib import Path

    import sklearn_crb.estimators.net.regressor as reg

    used = set(re.findall(r'_seed\("(\w+)"\)', Path(reg.__file__).read_text()))
    assert used == set(reg.SEED_STREAMS)
    net = CRBNetRegressor(random_state=5)
    assert len({net._seed(s) for s in reg.SEED_STREAMS}) == len(reg.SEED_STREAMS)
    assert CRBNetRegressor()._seed("init") is None
    with pytest.raises(TypeError, match="random_state"):
        CRBNetRegressor(random_state=True)._seed("init")
