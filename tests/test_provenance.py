"""Provenance that binds: a model folder's files are read once and hashed together with the meaning of model.json.

Each test here fails on the loader of release 0.1 (it hashed ``params.pt`` and let skorch reopen the path,
skipped the weights hash for format versions <= 1 and hashed none of ``model.json``'s meaning fields).
"""

import builtins
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import train_small_model

from sklearn_crb.io.models import FORMAT_VERSION, load_model, migrate_model, save_model

DATA = Path(__file__).resolve().parent / "data" / "models_v0.1"


@pytest.fixture(scope="module")
def trained(short_sequence, one_torch_thread):
    return train_small_model(short_sequence, n_train=200, max_epochs=1)


@pytest.fixture
def saved(trained, tmp_path):
    sim, net, X = trained
    return save_model(net, tmp_path / "model", simulator=sim), X


def _edit(path, **changes):
    meta = json.loads((path / "model.json").read_text())
    for key, fn in changes.items():
        meta[key] = fn(meta[key]) if callable(fn) else fn
    (path / "model.json").write_text(json.dumps(meta, indent=1))


def test_a_folder_replaced_while_it_loads_never_pairs_two_models(trained, tmp_path, monkeypatch):
    """The folder is swapped for another model right after params.pt is first opened: the load gets model A whole."""
    sim, net, X = trained
    a = save_model(net, tmp_path / "a", simulator=sim)
    expected_a = load_model(a, device="cpu").predict(X[:40])
    with torch.no_grad():
        for p in net.module_.parameters():
            p.add_(0.05)
    try:
        b = save_model(net, tmp_path / "b", simulator=sim)
        expected_b = net.predict(X[:40])
    finally:
        with torch.no_grad():
            for p in net.module_.parameters():
                p.sub_(0.05)
    assert not np.array_equal(expected_a, expected_b)
    swapped = []

    def swap():
        if not swapped:  # the atomic replace of save_model: the old folder moves away, the new one moves in
            swapped.append(True)
            os.replace(a, tmp_path / "a.old")
            os.replace(b, a)

    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, *args, **kw):
        f = real_open(file, *args, **kw)
        if str(file).endswith("params.pt"):
            swap()
        return f

    def spy_os_open(file, *args, **kw):
        fd = real_os_open(file, *args, **kw)
        if str(file).endswith("params.pt"):
            swap()
        return fd

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    try:
        loaded = load_model(a, device="cpu")
    except ValueError as exc:  # refusing the mixture would also be safe; mixing silently is not
        assert "params" in str(exc) or "basis" in str(exc)
        return
    finally:
        monkeypatch.undo()
    assert swapped
    np.testing.assert_array_equal(loaded.predict(X[:40]), expected_a)


@pytest.mark.parametrize("key, change", [
    ("estimate", lambda e: ["T1f" if p == "R1f" else p for p in e]),  # rates written into a T1 map
    ("fill_values", lambda f: [v * 1.5 for v in f]),
    ("units", lambda u: dict(u, R1f="s")),
    ("module_kwargs", lambda k: dict(k, activation="tanh")),  # same shapes, another function
    ("input_normalization", "l2"),
    ("snr", [1.0, 2.0]),
])
def test_meaning_fields_of_model_json_are_hashed(saved, key, change):
    path, _ = saved
    load_model(path, device="cpu")
    _edit(path, **{key: change})
    with pytest.raises(ValueError, match="content_sha256"):
        load_model(path, device="cpu")


@pytest.mark.parametrize("version", [-1, 0, 99])
def test_format_versions_never_written_are_refused(saved, version):
    path, _ = saved
    _edit(path, format_version=version)
    with pytest.raises(ValueError, match="format version|format_version"):
        load_model(path, device="cpu", trust_unhashed=True)


@pytest.mark.parametrize("version", [1, 2, 4])
def test_an_older_format_number_does_not_skip_the_hashes(saved, version):
    """Writing an older format number into a current folder does not make altered weights load."""
    path, _ = saved
    state = torch.load(path / "params.pt", weights_only=True)
    state["mean"] = state["mean"] + 1.0
    torch.save(state, path / "params.pt")
    _edit(path, format_version=version)
    with pytest.raises(ValueError, match="migrate-model|trust_unhashed"):
        load_model(path, device="cpu")


def test_the_content_hash_is_required(saved):
    path, _ = saved
    meta = json.loads((path / "model.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION
    del meta["content_sha256"]
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="content_sha256"):
        load_model(path, device="cpu")


def test_reformatting_model_json_keeps_it_loadable(saved):
    """The hash is of the meaning (canonical JSON), not of the bytes: indentation and key order do not matter."""
    path, X = saved
    before = load_model(path, device="cpu").predict(X[:10])
    meta = json.loads((path / "model.json").read_text())
    (path / "model.json").write_text(json.dumps(dict(reversed(list(meta.items())))))
    np.testing.assert_array_equal(load_model(path, device="cpu").predict(X[:10]), before)


def test_release_01_folders_need_an_explicit_opt_in(tmp_path):
    folder = shutil.copytree(DATA / "plain", tmp_path / "plain")
    with pytest.raises(ValueError, match="migrate-model"):
        load_model(folder, device="cpu")


def test_migrate_model_writes_a_hashed_copy_and_leaves_the_source(tmp_path, one_torch_thread):
    src = shutil.copytree(DATA / "measured_b1", tmp_path / "old")
    before = {f: (src / f).read_bytes() for f in os.listdir(src)}
    out = migrate_model(src, tmp_path / "new")
    assert {f: (src / f).read_bytes() for f in os.listdir(src)} == before
    assert (out / "params.pt").read_bytes() == before["params.pt"]
    meta = json.loads((out / "model.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["migrated_from"]["format_version"] == 4
    expected = np.load(DATA / "expected.npz")
    np.testing.assert_array_equal(load_model(out, device="cpu").predict(expected["X_b1"]), expected["measured_b1"])
    with pytest.raises(ValueError, match="nothing to migrate"):
        migrate_model(out, tmp_path / "again")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises((ValueError, FileExistsError)):
        migrate_model(src, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


# ---------------------------------------------------------------- values refused
@pytest.mark.parametrize("snr", [(1e300, 1e301), (10.0, 1e40), (1e-40, 10.0)])
def test_snr_whose_crb_underflows_or_overflows_is_refused(snr, short_sequence):
    from sklearn_crb._validation import check_snr_range
    from sklearn_crb.simulator import MTFingerprintSimulator

    with pytest.raises(ValueError, match=r"^snr: an SNR of .* 1/SNR\^2"):
        check_snr_range(snr)
    with pytest.raises(ValueError, match="1/SNR"):
        MTFingerprintSimulator(short_sequence, n_components=4, snr=snr, n_basis_samples=20).fit()


def test_crbs_at_the_snr_limits_stay_normal_floats(short_sequence):
    from sklearn_crb._validation import SNR_LIMITS
    from sklearn_crb.simulator import MTFingerprintSimulator

    sim = MTFingerprintSimulator(short_sequence, n_components=6, snr=(SNR_LIMITS[1], SNR_LIMITS[1]),
                                 n_basis_samples=20, estimate=("m0s", "R1f", "R2f"), random_state=0).fit()
    _, _, crb = sim.make_dataset(20, 0)
    assert np.all(np.isfinite(crb)) and np.all(crb >= np.finfo(np.float64).tiny)


def test_cli_migrate_model(tmp_path, capsys, one_torch_thread):
    from sklearn_crb.cli import main

    old = shutil.copytree(DATA / "plain", tmp_path / "old")
    assert main(["migrate-model", str(old), "--out", str(tmp_path / "new")]) == 0
    expected = np.load(DATA / "expected.npz")
    np.testing.assert_array_equal(load_model(tmp_path / "new", device="cpu").predict(expected["X"]),
                                  expected["plain"])
    assert main(["migrate-model", str(old), "--out", str(tmp_path / "new")]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["migrate-model", str(old), "--out", str(old)]) == 2
    assert sorted(os.listdir(old)) == ["basis.npy", "model.json", "params.pt"]
