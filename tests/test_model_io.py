"""The saved, self-describing network: round trips, safe loading, refusal of mismatched data."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import train_small_model

from sklearn_crb import Sequence
from sklearn_crb.io.models import check_compatible, load_model, save_model
from sklearn_crb.maps import fit_maps

NAMES = ("m0s", "R1f", "R2f")


@pytest.fixture(scope="module")
def trained(short_sequence):
    return train_small_model(short_sequence, n_train=300, max_epochs=2, module__normalization="first-coefficient")


def test_round_trip_and_metadata(trained, tmp_path):
    sim, net, X = trained
    path = save_model(net, tmp_path / "model", simulator=sim)
    assert sorted(os.listdir(path)) == ["basis.npy", "model.json", "params.pt"]
    meta = json.loads((path / "model.json").read_text())
    assert meta["estimate"] == list(NAMES) and meta["units"]["R1f"] == "1/s"
    assert meta["input_normalization"] == "first-coefficient"
    assert meta["sequence_sha256"] == sim.sequence_.sha256()
    np.testing.assert_allclose(meta["fill_values"], sim.prior_.center())
    loaded = load_model(path, device="cpu")
    np.testing.assert_array_equal(loaded.predict(X[:50]), net.predict(X[:50]))
    np.testing.assert_array_equal(loaded.crb_metadata_["basis"], sim.basis_)


def test_safe_torch_load_and_skorch_load_params(trained, tmp_path):
    from sklearn_crb import CRBNetRegressor
    from sklearn_crb.estimators.network import MLP

    sim, net, X = trained
    path = save_model(net, tmp_path / "model", simulator=sim)
    state = torch.load(path / "params.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    fresh = CRBNetRegressor(MLP, module__hidden=(16, 8), module__normalization="first-coefficient",
                            module__n_features=12, module__n_outputs=3, device="cpu").initialize()
    fresh.load_params(f_params=path / "params.pt")
    np.testing.assert_allclose(fresh.predict(X[:20]), net.predict(X[:20]), rtol=1e-6)


def test_refuses_other_basis_or_sequence(trained, tmp_path):
    sim, net, X = trained
    model = load_model(save_model(net, tmp_path / "model", simulator=sim), device="cpu")
    other = np.linalg.qr(np.random.default_rng(0).standard_normal((120, 6)) + 0j)[0]
    with pytest.raises(ValueError, match="basis mismatch"):
        check_compatible(model, basis=other)
    with pytest.raises(ValueError, match="sequence mismatch"):
        check_compatible(model, sequence=Sequence.default(n_pulses=121))
    with pytest.raises(ValueError, match="rank mismatch"):
        check_compatible(model, rank=5)
    assert check_compatible(model, basis=sim.basis_.astype(np.complex64), sequence=sim.sequence_, rank=6)
    c = np.ones((4, 4, 6), complex)
    with pytest.raises(ValueError, match="basis mismatch"):
        fit_maps(model, c, basis=other)


def test_corrupt_or_incomplete_models_are_refused(trained, tmp_path):
    sim, net, X = trained
    path = save_model(net, tmp_path / "model", simulator=sim)
    (path / "model.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(path)
    path = save_model(net, tmp_path / "model", simulator=sim)  # replaces the broken one
    U = np.load(path / "basis.npy")
    np.save(path / "basis.npy", U[:, ::-1])
    with pytest.raises(ValueError, match="does not match the basis hash"):
        load_model(path)
    os.remove(path / "params.pt")
    with pytest.raises(ValueError, match="incomplete"):
        load_model(path)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nothing")


def test_failed_save_writes_nothing(trained, tmp_path):
    sim, net, X = trained
    with pytest.raises(ValueError, match="rank"):
        save_model(net, tmp_path / "model", sequence=sim.sequence_, basis=sim.basis_[:, :5],
                   fill_values=sim.prior_.center())
    assert os.listdir(tmp_path) == []


def test_log_head_is_recorded_and_reloads_identically(trained, tmp_path):
    sim, net, X = trained
    assert net.head == "auto" and net.target_log_.tolist() == [False, True, True]  # R1f, R2f in log space
    path = save_model(net, tmp_path / "model", simulator=sim)
    meta = json.loads((path / "model.json").read_text())
    assert meta["output_head"] == ["sigmoid", "log", "log"]
    loaded = load_model(path, device="cpu")
    assert loaded.module_.log_head.tolist() == [False, True, True]
    np.testing.assert_array_equal(loaded.module_.low.numpy(), net.module_.low.numpy())
    np.testing.assert_array_equal(loaded.predict(X[:80]), net.predict(X[:80]))
    # model.json describing another head than params.pt holds is refused
    meta["output_head"] = ["sigmoid", "sigmoid", "log"]
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="output_head"):
        load_model(path, device="cpu")
