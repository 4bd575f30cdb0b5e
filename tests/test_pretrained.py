"""The shipped pretrained networks: found by the sequence's and basis's SHA-256, refused otherwise, verified."""

import json
import shutil

import numpy as np
import pytest

from sklearn_crb.io.models import MODEL_FILES
from sklearn_crb.physics.sequence import Sequence
from sklearn_crb.pretrained import (
    LOSSES,
    PRETRAINED,
    list_pretrained,
    load_pretrained,
    pretrained_basis,
    pretrained_provenance,
)

SHIPPED = ("demo-crb", "demo-mse")


@pytest.fixture(scope="module")
def seq():
    return Sequence.default()


@pytest.fixture(scope="module")
def basis(seq):
    return pretrained_basis(seq)


def test_the_demo_pair_is_shipped_small_for_the_built_in_sequence(seq):
    entries = {e["name"]: e for e in list_pretrained()}
    assert set(SHIPPED) <= set(entries)
    for name in SHIPPED:
        assert entries[name]["sequence_sha256"] == seq.sha256()
        assert {f.name for f in entries[name]["path"].iterdir()} == set(MODEL_FILES) | {"provenance.json"}
    size = sum(f.stat().st_size for f in PRETRAINED.rglob("*") if f.is_file())
    assert size < 5e6, f"the shipped networks take {size / 1e6:.1f} MB"


@pytest.mark.parametrize("loss", LOSSES)
def test_load_pretrained_finds_the_shipped_network_by_sequence_and_basis(seq, basis, loss):
    net = load_pretrained(seq, basis, loss=loss)
    assert net.loss == loss
    assert net.crb_metadata_["sequence_sha256"] == seq.sha256()
    np.testing.assert_array_equal(net.crb_metadata_["basis"], basis)
    X = np.random.default_rng(0).standard_normal((3, 2 * basis.shape[1]))
    pred = net.predict(X)
    assert pred.shape == (3, len(net.target_names_)) and np.all(np.isfinite(pred))


def test_load_pretrained_refuses_another_sequence(seq, basis):
    other = Sequence(seq.alpha * 0.9, seq.TRF, seq.TR, name="scaled")
    with pytest.raises(ValueError, match=r"^sequence: no pretrained CRB network for sequence 'scaled'.*"
                                         r"shipped: demo-crb"):
        load_pretrained(other, basis)
    with pytest.raises(ValueError, match="^sequence: "):
        pretrained_basis(other)


def test_load_pretrained_refuses_another_basis(seq, basis):
    rotated = basis.copy()
    rotated[:, [0, 1]] = rotated[:, [1, 0]]  # the same span, another coordinate system: other coefficients
    with pytest.raises(ValueError, match=r"^basis: no pretrained MSE network for this basis .*shipped for this "
                                         r"sequence: demo-mse"):
        load_pretrained(seq, rotated, loss="mse")
    with pytest.raises(ValueError, match=r"basis must have shape \(1142, rank\)"):
        load_pretrained(seq, basis[:100])


def test_load_pretrained_checks_its_arguments(seq, basis):
    with pytest.raises(ValueError, match="loss must be one of"):
        load_pretrained(seq, basis, loss="l1")
    with pytest.raises(TypeError, match="sequence must be a Sequence"):
        load_pretrained("default", basis)


def test_a_tampered_shipped_folder_is_refused_by_load_models_hash_check(tmp_path, seq, basis):
    root = tmp_path / "pretrained"
    shutil.copytree(PRETRAINED / "demo-crb", root / "demo-crb")
    load_pretrained(seq, basis, root=root)  # the copy loads
    params = root / "demo-crb" / "params.pt"
    raw = bytearray(params.read_bytes())
    raw[-20] ^= 0xFF
    params.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="params.pt"):
        load_pretrained(seq, basis, root=root)


@pytest.mark.parametrize("name", SHIPPED)
def test_the_provenance_records_recipe_seed_commit_command_date_and_the_measured_efficiency(name):
    prov = pretrained_provenance(name)
    for key in ("recipe", "seed", "commit", "command", "date", "training_set", "efficiency", "loss"):
        assert key in prov, key
    assert prov["recipe"]["function"] == "sklearn_crb.recipes.make_network"
    assert prov["command"].startswith("python scripts/build_pretrained.py")
    assert len(prov["commit"]) == 40 and not prov["quick"]
    eff = prov["efficiency"]
    rows = eff["rows"]
    estimators = {r["estimator"] for r in rows}
    assert estimators == {prov["loss"], "prior mean"}
    for est in estimators:  # every SNR and reported parameter has its row, the prior-mean row beside it
        got = {(float(r["snr"]), r["parameter"]) for r in rows if r["estimator"] == est}
        assert got == {(float(s), p) for s in eff["snrs"] for p in ("m0s", "R1f", "R2f")}
    for r in rows:
        assert {"nmse", "median_abs_bias_over_sqrt_crb", "median_std_over_sqrt_crb", "n_theta"} <= set(r)
    json.dumps(prov)


def test_provenance_of_an_unknown_name_is_refused():
    with pytest.raises(ValueError, match="no pretrained network 'nope'; shipped: demo-crb"):
        pretrained_provenance("nope")
