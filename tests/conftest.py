"""Shared fixtures: the reference sequence from SKLEARN_CRB_DATA, small sequences, toy network problems."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

#: The plain ``pytest`` runs this many xdist workers (both cores of the reference machine), unless -n says otherwise.
DEFAULT_WORKERS = min(2, os.cpu_count() or 1)
# xdist workers share the cores: each gets its share of torch threads (at most 2), so two
# workers on two cores do not oversubscribe them
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))

REPO = Path(__file__).resolve().parents[1]
V32_NAME = "control_MT_v3p2_TR3p5ms_discretized.mat"

#: Tutorial tissue of gbloch_spec.md (m0s, R1f, R2f, Rex, R1s, T2s, omega0, B1).
TUTORIAL_THETA = np.array([0.15, 0.5, 15.0, 30.0, 3.0, 10e-6, 0.0, 1.0])
#: The NLLS test tissue of the spec (§6, test/NLLS.jl), with M0 = 0.85.
NLLS_THETA = np.array([0.15, 0.5, 17.0, 30.0, 3.0, 12e-6, 100.0, 0.9])


def data_dir():
    return Path(os.environ.get("SKLEARN_CRB_DATA", REPO.parent / "shared" / "data"))


def require_data_file(name):
    """Path of a shared data file; skip if missing, fail under CI=true."""
    path = data_dir() / name
    if not path.is_file():
        msg = f"{name} not found in SKLEARN_CRB_DATA={data_dir()}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + " (missing data is a failure under CI=true)")
        pytest.skip(msg)
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny networks: one torch thread avoids OpenMP contention on 2 cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def v32_sequence():
    """The published hybrid-state MT pulse train (1142 pulses, TR 3.5 ms)."""
    from sklearn_crb import Sequence

    return Sequence.from_mat(require_data_file(V32_NAME), TR=3.5e-3)


@pytest.fixture(scope="session")
def short_sequence():
    """A 120-pulse built-in sequence for fast unit tests."""
    from sklearn_crb import Sequence

    return Sequence.default(n_pulses=120)


def toy_problem(n=400, seed=0):
    """A smooth 2-parameter problem (X, y, crb) with per-sample CRBs of very different sizes."""
    rng = np.random.default_rng(seed)
    y = np.column_stack([rng.uniform(0.0, 0.3, n), rng.uniform(0.5, 2.0, n)])
    k = np.arange(1, 7)
    X = np.hstack([np.cos(np.outer(y[:, 0] * 3, k) + y[:, [1]]), np.sin(np.outer(y[:, 1], k) - y[:, [0]])])
    X += rng.normal(0, 0.02, X.shape)
    crb = np.column_stack([1e-4 * (1 + 9 * rng.uniform(size=n)), 1e-2 * (1 + 9 * rng.uniform(size=n))])
    return X, y, crb


def small_crb_net(**kw):
    """A small CRBNetRegressor (MLP 32x32, 5 epochs) with the pre-issue-9 recipe, overridden by ``kw``."""
    from sklearn_crb.estimators.network import MLP
    from sklearn_crb.estimators.regressor import CRBNetRegressor

    params = dict(module=MLP, module__hidden=(32, 32), module__normalization=None, max_epochs=5, batch_size=64,
                  lr=1e-2, random_state=0, train_split=None,
                  # the pre-issue-9 recipe these tests were written for (set explicitly)
                  module__batch_norm=True, module__activation="relu", optimizer=torch.optim.Adam,
                  optimizer__weight_decay=0.0, lr_schedule=None, head=None)
    params.update(kw)
    return CRBNetRegressor(**params)


def train_small_model(sequence, *, n_basis_samples=200, n_train=200, hidden=(16, 8), max_epochs=1, **net_kw):
    """(simulator estimating m0s, R1f, R2f at rank 6, a small MLP fitted on it on the CPU, its training X)."""
    from sklearn_crb.estimators.network import MLP
    from sklearn_crb.estimators.regressor import CRBNetRegressor
    from sklearn_crb.simulator import MTFingerprintSimulator

    sim = MTFingerprintSimulator(sequence, n_components=6, estimate=("m0s", "R1f", "R2f"), random_state=0,
                                 n_basis_samples=n_basis_samples).fit()
    X, y, crb = sim.make_dataset(n_train, 1)
    net = CRBNetRegressor(MLP, module__hidden=hidden, simulator=sim, max_epochs=max_epochs, random_state=0,
                          device="cpu", **net_kw).fit(X, y, crb=crb)
    return sim, net, X


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="also run @pytest.mark.slow tests")


def pytest_collection_modifyitems(config, items):
    """Slow tests run under CI=true, with --run-slow, or when selected by -m;
    the default local run stays lean."""
    if os.environ.get("CI", "").lower() == "true" or config.getoption("--run-slow") or "slow" in (
        config.getoption("markexpr") or ""
    ):
        return
    skip = pytest.mark.skip(reason="slow: runs under CI=true or with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Without ``-n``, run on DEFAULT_WORKERS xdist workers.

    Not through ``addopts = "-n 2"``: that breaks ``-p no:xdist`` and a pytest without the
    plugin. ``-n 0``, ``-n auto``, ``-p no:xdist``, ``--pdb`` and ``--collect-only`` keep their
    usual meaning. Runs before xdist's own hook (same ``tryfirst``, registered later), which
    turns the worker count into its distribution settings.
    """
    option = config.option
    if (not config.pluginmanager.hasplugin("xdist") or hasattr(config, "workerinput")
            or getattr(option, "numprocesses", 0) is not None or option.usepdb or option.collectonly
            or getattr(option, "dist", "no") != "no" or getattr(option, "tx", None)):
        return
    option.numprocesses = DEFAULT_WORKERS if DEFAULT_WORKERS > 1 else 0


def small_cli_model(folder):
    """``simulate`` -> ``train`` (120-pulse built-in sequence, rank 6, 300 draws, 2 epochs) into ``folder``/model,
    and a 12x12 phantom in its basis; returns the phantom and its coefficients shaped (x, y, z=1, r)."""
    from sklearn_crb import Sequence
    from sklearn_crb.cli import main
    from sklearn_crb.phantom import make_phantom

    common = ["--n-pulses", "120", "--quiet"]
    assert main(["simulate", "--out", str(folder / "train.h5"), "--n-samples", "300", "--rank", "6",
                 "--n-basis-samples", "200", *common]) == 0
    assert main(["train", "--data", str(folder / "train.h5"), "--out", str(folder / "model"), "--epochs", "2",
                 "--hidden", "16", "--device", "cpu", "--quiet"]) == 0
    U = np.load(folder / "model" / "basis.npy")
    ph = make_phantom((12, 12), Sequence.default(n_pulses=120), basis=U, snr=50, random_state=0)
    return ph, ph.coefficients[:, :, None, :]
