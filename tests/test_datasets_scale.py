"""Large training sets: chunks through joblib (any workers, any backend, bitwise the same),
streamed to HDF5 atomically, and read back lazily batch by batch."""

import os

import numpy as np
import pytest
import torch

from sklearn_crb.cli import main
from sklearn_crb.estimators.net.loaders import PackedRows, RowBatches, TensorBatches, row_batches_or_none
from sklearn_crb.io.datasets import iter_dataset_chunks, load_dataset, open_dataset, simulate_dataset, simulate_to_file
from sklearn_crb.io.h5 import H5Rows
from sklearn_crb.physics.sequence import Sequence
from sklearn_crb.simulator import MTFingerprintSimulator

N, CHUNK, SEED = 5000, 500, 3


@pytest.fixture(scope="module")
def sim():
    return MTFingerprintSimulator(Sequence.default(n_pulses=100), n_components=6, tied_R1=True,
                                  n_basis_samples=200, random_state=0).fit()


@pytest.fixture(scope="module")
def serial(sim):
    """The set drawn the plain way, one chunk after the other, from SeedSequence(SEED).spawn(k)."""
    parts = []
    for i, seed in enumerate(np.random.SeedSequence(SEED).spawn(N // CHUNK)):
        X, y, crb, det = sim.make_dataset(CHUNK, np.random.default_rng(seed), return_details=True)
        parts.append({"X": X, "y": y, "crb": crb, "X_clean": det["X_clean"], "crb_unit": det["crb_unit"],
                      "theta": det["theta"], "M0": det["M0"]})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@pytest.fixture(scope="module")
def h5set(sim, tmp_path_factory):
    """The same arguments streamed to HDF5 with one job (the sequential backend)."""
    d = tmp_path_factory.mktemp("h5")
    path = simulate_to_file(d / "big.h5", sim, N, SEED, chunk=CHUNK, progress=False, n_jobs=1)
    assert os.listdir(d) == ["big.h5"]  # no staging leftovers
    return path


def _assert_bitwise(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert np.array_equal(a[k], b[k]), f"{k} differs"


def test_one_and_two_loky_workers_give_the_same_set_bitwise(sim, serial, h5set):
    one = load_dataset(h5set)  # n_jobs=1, streamed to HDF5
    two = simulate_dataset(sim, N, SEED, chunk=CHUNK, progress=False, n_jobs=2)
    _assert_bitwise({k: one[k] for k in serial}, serial)
    _assert_bitwise(two, serial)
    assert len(np.unique(two["theta"][:, 0])) > N // 2  # chunks are not copies of each other


def test_two_worker_dask_cluster_gives_the_same_set_bitwise(sim, serial):
    distributed = pytest.importorskip("dask.distributed")
    import joblib

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster):
        with joblib.parallel_config(backend="dask"), distributed.get_task_stream() as stream:
            data = simulate_dataset(sim, N, SEED, chunk=CHUNK, progress=False)
    _assert_bitwise(data, serial)
    assert len({t["worker"] for t in stream.data}) == 2  # both workers computed chunks


def test_the_chunk_size_is_part_of_the_seed_contract(sim, serial):
    first = simulate_dataset(sim, CHUNK + 7, SEED, chunk=CHUNK, progress=False)
    _assert_bitwise({k: v[:CHUNK] for k, v in first.items()}, {k: v[:CHUNK] for k, v in serial.items()})
    assert not np.array_equal(first["theta"][CHUNK:], serial["theta"][CHUNK: CHUNK + 7])  # a partial chunk differs
    other = simulate_dataset(sim, 2 * CHUNK, SEED, chunk=CHUNK // 2, progress=False)
    assert not np.array_equal(other["theta"], serial["theta"][: 2 * CHUNK])


def test_bad_chunking_arguments_are_refused(sim):
    with pytest.raises(ValueError, match="chunk"):
        simulate_dataset(sim, 10, 0, chunk=0, progress=False)
    with pytest.raises(ValueError, match="n_samples"):
        simulate_dataset(sim, 0, 0, progress=False)
    with pytest.raises(TypeError, match="random_state"):
        simulate_dataset(sim, 10, np.random.default_rng(0), progress=False)


def test_hdf5_stream_round_trip_equals_the_in_memory_set(sim, serial, h5set, tmp_path):
    back = load_dataset(h5set)
    _assert_bitwise({k: back[k] for k in serial}, serial)
    np.testing.assert_array_equal(back["basis"], sim.basis_)
    assert back["meta"]["estimate"] == list(sim.estimate_) and back["meta"]["tied_R1"] is True
    rows, static = open_dataset(h5set)
    assert len(rows) == N and {"X", "y", "crb", "X_clean", "crb_unit"} <= set(rows.keys)
    np.testing.assert_array_equal(static["basis"], sim.basis_)
    assert static["meta"] == back["meta"]
    # a .npz of the same arguments holds the same arrays (whole chunks are shared by a longer set)
    npz = load_dataset(simulate_to_file(tmp_path / "small.npz", sim, 2 * CHUNK, SEED, chunk=CHUNK, progress=False))
    _assert_bitwise({k: npz[k] for k in serial}, {k: v[: 2 * CHUNK] for k, v in serial.items()})


class _FailingSimulator:
    """The simulator, except that its ``fail_at``-th chunk raises (a crash in the middle of a run)."""

    def __init__(self, sim, fail_at):
        self.sim, self.fail_at, self.calls = sim, fail_at, 0
        self.basis_ = sim.basis_

    def make_dataset(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("simulated crash in a chunk")
        return self.sim.make_dataset(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.sim, name)


def test_an_interrupted_hdf5_write_leaves_no_file_and_an_existing_one_untouched(sim, tmp_path):
    out = tmp_path / "big.h5"
    with pytest.raises(RuntimeError, match="simulated crash"):
        simulate_to_file(out, _FailingSimulator(sim, 3), 2000, SEED, chunk=CHUNK, progress=False, n_jobs=1)
    assert os.listdir(tmp_path) == []
    simulate_to_file(out, sim, 600, SEED, chunk=CHUNK, progress=False)
    before = out.read_bytes()
    failing = _FailingSimulator(sim, 2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        simulate_to_file(out, failing, 2000, SEED + 1, chunk=CHUNK, progress=False, n_jobs=1, overwrite=True)
    assert failing.calls == 2 and out.read_bytes() == before and os.listdir(tmp_path) == ["big.h5"]
    with pytest.raises(ValueError, match="exists"):
        simulate_to_file(out, sim, 600, SEED, progress=False)


def test_hdf5_rows_read_any_index_set_like_the_arrays(serial, h5set, tmp_path):
    path = h5set
    rng = np.random.default_rng(1)
    with H5Rows(path) as rows:
        for idx in (rng.permutation(N)[:300], rng.integers(0, N, 200), np.arange(4000, 3000, -1),
                    np.array([7, 7, -1, 0]), np.array([], dtype=int)):
            got = rows.read(("X", "y", "M0"), idx)
            for k in ("X", "y", "M0"):
                np.testing.assert_array_equal(got[k], serial[k][idx])
        with pytest.raises(IndexError):
            rows.read(["X"], [N])
        with pytest.raises(KeyError, match="nope"):
            rows.read(["nope"], [0])
    with pytest.raises(ValueError, match="HDF5"):
        open_dataset(tmp_path / "x.npz")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="junk.h5"):
        H5Rows(tmp_path / "junk.h5")


def _pack(rows):
    return {"X": rows["X"].astype(np.float32), "c": (1.0 / rows["crb"]).astype(np.float32)}, \
        rows["y"].astype(np.float32)


@pytest.mark.parametrize("subset", [False, True])
def test_hdf5_batches_equal_the_in_memory_batches_for_one_permutation(serial, h5set, subset):
    path, mem = h5set, serial
    packed = PackedRows(H5Rows(path), ("X", "y", "crb"), _pack)
    dataset = torch.utils.data.Subset(packed, np.arange(0, N, 3)) if subset else packed
    idx = np.asarray(dataset.indices) if subset else np.arange(N)
    Xm, ym = _pack({k: mem[k][idx] for k in ("X", "y", "crb")})
    kwargs = {"batch_size": 128, "shuffle": True, "drop_last": False}
    lazy = row_batches_or_none(dataset, kwargs, "cpu", torch.Generator().manual_seed(5))
    assert isinstance(lazy, RowBatches)
    eager = TensorBatches(Xm, ym, 128, shuffle=True, generator=torch.Generator().manual_seed(5))
    assert len(lazy) == len(eager) == -(-len(idx) // 128)
    n = 0
    for (xa, ya), (xb, yb) in zip(lazy, eager, strict=True):
        assert sorted(xa) == sorted(xb) == ["X", "c"]
        for k in xa:
            assert torch.equal(xa[k], xb[k])
        assert torch.equal(ya, yb)
        n += len(ya)
    assert n == len(idx)
    x0, y0 = packed[4]  # one sample (skorch's DataLoader path)
    np.testing.assert_array_equal(x0["X"], mem["X"][4].astype(np.float32))
    assert row_batches_or_none(dataset, {**kwargs, "num_workers": 2}, "cpu", None) is None


def test_cli_simulate_with_two_jobs_writes_the_same_hdf5_as_one(tmp_path, capsys):
    common = ["--n-samples", "700", "--n-pulses", "100", "--rank", "6", "--n-basis-samples", "200", "--tied-R1",
              "--chunk-size", "200", "--quiet"]
    assert main(["simulate", "--out", str(tmp_path / "a.h5"), "--n-jobs", "2", *common]) == 0
    assert main(["simulate", "--out", str(tmp_path / "b.npz"), "--n-jobs", "1", *common]) == 0
    assert "700 samples" in capsys.readouterr().out
    a, b = load_dataset(tmp_path / "a.h5"), load_dataset(tmp_path / "b.npz")
    for k in ("X", "y", "crb", "X_clean", "crb_unit", "theta", "M0", "basis"):
        assert np.array_equal(a[k], b[k]), k
    assert a["meta"] == b["meta"]
    assert main(["simulate", "--out", str(tmp_path / "c.h5"), "--n-jobs", "0", *common]) == 2
    assert not (tmp_path / "c.h5").exists()


@pytest.mark.slow
@pytest.mark.parametrize("augment", [False, True])
def test_fit_from_the_lazy_hdf5_set_equals_the_fit_from_arrays(sim, serial, h5set, augment):
    """Training from H5Rows reads batches when due and trains the same net (needs fit(rows) in the regressor)."""
    from sklearn_crb.estimators.regressor import CRBNetRegressor

    kw = dict(simulator=sim, max_epochs=2, batch_size=256, random_state=0, augment=augment, verbose=0,
              train_split=0.2)
    X, crb = (serial["X_clean"], serial["crb_unit"]) if augment else (serial["X"], serial["crb"])
    eager = CRBNetRegressor(**kw).fit(X, serial["y"], crb=crb)
    rows, _ = open_dataset(h5set)
    lazy = CRBNetRegressor(**kw).fit(rows)
    np.testing.assert_allclose(lazy.y_scale_, eager.y_scale_, rtol=1e-12)
    np.testing.assert_allclose([h["train_loss"] for h in lazy.history], [h["train_loss"] for h in eager.history],
                               rtol=1e-5)
    scale = np.abs(serial["y"]).max(axis=0)
    np.testing.assert_allclose(lazy.predict(serial["X"][:300]) / scale, eager.predict(serial["X"][:300]) / scale,
                               rtol=0, atol=1e-5)


def test_the_lazy_fit_refuses_what_the_in_memory_fit_refuses(sim, h5set):
    """The same checks on both paths: bias-reduced without fresh noise, y with the rows, a bad weight cap."""
    from sklearn_crb.estimators.regressor import CRBNetRegressor

    rows, _ = open_dataset(h5set)
    with pytest.raises(ValueError, match="augment"):
        CRBNetRegressor(simulator=sim, loss="bias_reduced", augment=False, max_epochs=1).fit(rows)
    with pytest.raises(ValueError, match="without y= or crb="):
        CRBNetRegressor(simulator=sim, max_epochs=1).fit(rows, np.zeros(len(rows)))
    with pytest.raises(ValueError, match="nuisance_weight_cap"):
        CRBNetRegressor(simulator=sim, max_epochs=1, nuisance_weight_cap=-1.0).fit(rows)


def test_cli_train_reads_a_large_hdf5_set_lazily_with_the_same_result(tmp_path, monkeypatch):
    """Above LAZY_BYTES the CLI trains from the HDF5 rows batch by batch; the model equals the in-memory one."""
    import sklearn_crb.cli.train as cli_train
    from sklearn_crb.cli import main
    from sklearn_crb.io.models import load_model

    data = tmp_path / "train.h5"
    assert main(["simulate", "--out", str(data), "--n-samples", "400", "--rank", "6", "--n-pulses", "200", "--tied-R1",
                 "--n-basis-samples", "100", "--estimate", "m0s", "R1f", "--quiet"]) == 0
    base = ["train", "--data", str(data), "--epochs", "2", "--hidden", "8", "--device", "cpu", "--quiet"]
    assert main(base + ["--out", str(tmp_path / "eager")]) == 0
    calls = []
    real = cli_train.open_dataset
    monkeypatch.setenv("SKLEARN_CRB_LAZY_BYTES", "not a number")
    assert main(base + ["--out", str(tmp_path / "bad")]) == 2 and not (tmp_path / "bad").exists()
    monkeypatch.setenv("SKLEARN_CRB_LAZY_BYTES", "0")
    monkeypatch.setattr(cli_train, "open_dataset", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(cli_train, "load_dataset", lambda *a, **k: pytest.fail("the lazy path loaded the set"))
    assert main(base + ["--out", str(tmp_path / "lazy")]) == 0
    assert calls
    X = np.random.default_rng(0).standard_normal((7, 12))
    X = np.hstack([X, np.full((7, 1), 0.01)])  # the CLI's default network is noise-aware: sigma is its last column
    np.testing.assert_allclose(load_model(tmp_path / "lazy").predict(X), load_model(tmp_path / "eager").predict(X),
                               rtol=1e-5)


# ------------------------------------------------------------------ sizes before any work
def test_row_nbytes_is_what_a_simulated_row_holds(sim):
    from sklearn_crb.parallel_simulation import row_nbytes

    data = simulate_dataset(sim, 7, 0, chunk=3, progress=False)
    assert row_nbytes(6, len(sim.estimate_)) * 7 == sum(v.nbytes for v in data.values())


def test_simulate_1e12_is_refused_within_a_second_before_any_allocation(tmp_path, capsys):
    import time
    import tracemalloc

    tracemalloc.start()
    t0 = time.perf_counter()
    code = main(["simulate", "--n-samples", "1e12", "--out", str(tmp_path / "x.h5"), "--quiet"])
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    err = capsys.readouterr().err
    assert code == 2 and "--n-samples 1000000000000" in err and "GB" in err, err
    assert seconds < 1.0 and peak < 50e6, (seconds, peak)
    assert os.listdir(tmp_path) == []


def test_h5_size_is_checked_against_free_disk_before_pre_sizing(sim, tmp_path, monkeypatch):
    import shutil

    import sklearn_crb.io.datasets as ds

    real = shutil.disk_usage
    monkeypatch.setattr(ds.shutil, "disk_usage", lambda p: real(p)._replace(free=10_000))
    monkeypatch.setattr(ds, "write_h5_chunks", lambda *a, **k: pytest.fail("pre-sized without a space check"))
    with pytest.raises(ValueError, match=r"n_samples 1000: the training set needs .* GB on disk but .* free"):
        simulate_to_file(tmp_path / "x.h5", sim, 1000, 0, progress=False)
    assert os.listdir(tmp_path) == []


def test_npz_size_is_checked_against_available_memory(sim, tmp_path, monkeypatch, capsys):
    import sklearn_crb.io.datasets as ds

    monkeypatch.setattr(ds, "_available_memory", lambda: 1_000_000)
    monkeypatch.setattr(ds, "simulate_dataset", lambda *a, **k: pytest.fail("simulated without a memory check"))
    with pytest.raises(ValueError, match=r"held in memory .* available; write out as \.h5"):
        simulate_to_file(tmp_path / "x.npz", sim, 10_000, 0, progress=False)
    code = main(["simulate", "--n-samples", "1e4", "--out", str(tmp_path / "y.npz"), "--quiet", "--n-pulses", "100",
                 "--rank", "6"])
    assert code == 2 and "--n-samples 10000: a .npz training set is held in memory" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


class _TinySimulator:
    def make_dataset(self, n, rng, return_details=True):
        z = np.zeros((n, 1))
        return z, z, z, {"X_clean": z, "crb_unit": z, "theta": z, "M0": z[:, 0]}


def test_the_chunk_list_is_not_built_eagerly():
    import tracemalloc

    tracemalloc.start()
    chunks = iter_dataset_chunks(_TinySimulator(), 10**6, 0, chunk=1, n_jobs=1)
    rows, part = next(chunks)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    chunks.close()
    assert rows == slice(0, 1) and part["X"].shape == (1, 1)
    assert peak < 5e6, peak  # a list of 10**6 slices alone is ~60 MB
