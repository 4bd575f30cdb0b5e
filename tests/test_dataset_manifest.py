"""A training set's manifest ties its basis and meta to its samples (sklearn_crb.io.manifest).

Release 0.1 sets had no format version and no hash: swapping the basis, or flipping ``tied_R1`` in the meta,
trained a model that recorded the wrong basis or model. The lazy HDF5 path (``open_dataset`` -> ``H5Rows``)
fails on the old code in every test below that expects a refusal from it.
"""

import json

import h5py
import numpy as np
import pytest

from sklearn_crb.io.datasets import open_dataset, simulate_dataset, simulate_to_file
from sklearn_crb.io.manifest import migrate_dataset, verify_dataset, with_manifest
from sklearn_crb.simulator import MTFingerprintSimulator


@pytest.fixture(scope="module")
def sim(short_sequence):
    return MTFingerprintSimulator(short_sequence, n_components=6, estimate=("m0s", "R1f", "R2f"), random_state=0,
                                  n_basis_samples=60).fit()


@pytest.fixture
def h5set(sim, tmp_path):
    return simulate_to_file(tmp_path / "train.h5", sim, 300, 0, chunk=100, progress=False, n_jobs=1)


def _replace(path, key, value):
    with h5py.File(path, "r+") as f:
        del f[key]
        f.create_dataset(key, data=value)


def _other_basis(U, seed=0):
    rng = np.random.default_rng(seed)
    return np.linalg.qr(rng.standard_normal(U.shape) + 1j * rng.standard_normal(U.shape))[0]


def test_a_streamed_set_has_a_manifest_that_verifies(h5set):
    m = verify_dataset(h5set)
    assert m["format_version"] == 1 and m["n_samples"] == 300
    assert {"X", "y", "crb", "X_clean", "crb_unit", "theta", "M0"} <= set(m["rows_sha256"])
    rows, static = open_dataset(h5set)
    assert len(rows) == 300


def test_the_streamed_row_hashes_equal_those_of_the_arrays(sim, h5set):
    mem = simulate_dataset(sim, 300, 0, chunk=100, progress=False, n_jobs=1)
    m = verify_dataset(h5set)
    from sklearn_crb.io.manifest import rows_sha256

    assert rows_sha256(mem) == {k: m["rows_sha256"][k] for k in mem}


def test_a_swapped_basis_is_refused_by_name(h5set):
    with h5py.File(h5set, "r") as f:
        U = f["basis"][()]
    _replace(h5set, "basis", _other_basis(U))
    with pytest.raises(ValueError, match=r"--data: .*train.h5: its 'basis' does not match the manifest"):
        open_dataset(h5set, argname="--data")


def test_a_flipped_tied_R1_in_meta_is_refused_by_name(h5set):
    with h5py.File(h5set, "r") as f:
        meta = json.loads(f["meta"][()])
    meta["tied_R1"] = not meta["tied_R1"]
    _replace(h5set, "meta", np.bytes_(json.dumps(meta)))
    with pytest.raises(ValueError, match=r"its 'meta' \(estimate, tied_R1"):
        open_dataset(h5set)


def test_changed_rows_are_found_by_the_full_check(h5set):
    with h5py.File(h5set, "r+") as f:
        f["y"][5, 0] += 0.01
    open_dataset(h5set)  # the lazy open checks basis, meta and size only (no pass over the samples)
    with pytest.raises(ValueError, match="'y' does not match the manifest"):
        verify_dataset(h5set)


@pytest.mark.parametrize("version", [0, -1, 99, "1"])
def test_manifest_versions_never_written_are_refused(h5set, version):
    with h5py.File(h5set, "r") as f:
        m = json.loads(f["manifest"][()])
    _replace(h5set, "manifest", np.bytes_(json.dumps(dict(m, format_version=version))))
    with pytest.raises(ValueError, match="never written"):
        open_dataset(h5set)


def test_a_set_without_manifest_is_refused_until_migrated(h5set, tmp_path):
    with h5py.File(h5set, "r+") as f:
        del f["manifest"]
    before = h5set.read_bytes()
    with pytest.raises(ValueError, match="has no manifest.*migrate-data"):
        open_dataset(h5set)
    new = migrate_dataset(h5set, tmp_path / "new.h5")
    assert h5set.read_bytes() == before
    assert verify_dataset(new)["n_samples"] == 300
    rows, _ = open_dataset(new)
    with pytest.raises(ValueError, match="nothing to migrate"):
        migrate_dataset(new, tmp_path / "again.h5")
    (tmp_path / "notes.h5").write_bytes(b"mine")
    with pytest.raises(ValueError):
        migrate_dataset(h5set, tmp_path / "notes.h5", overwrite=True)
    assert (tmp_path / "notes.h5").read_bytes() == b"mine"


def test_npz_sets_get_the_same_manifest(sim, tmp_path):
    from sklearn_crb.io.datasets import dataset_meta

    data = simulate_dataset(sim, 120, 0, chunk=60, progress=False, n_jobs=1)
    data.update(basis=sim.basis_, meta=dataset_meta(sim))
    path = tmp_path / "t.npz"
    with open(path, "wb") as f:
        np.savez_compressed(f, **with_manifest(data))
    assert verify_dataset(path)["n_samples"] == 120
    swapped = dict(with_manifest(data), basis=_other_basis(sim.basis_))
    with open(path, "wb") as f:
        np.savez_compressed(f, **swapped)
    with pytest.raises(ValueError, match="'basis' does not match"):
        verify_dataset(path)
    with open(path, "wb") as f:
        np.savez_compressed(f, **data)  # no manifest: the form of release 0.1
    with pytest.raises(ValueError, match="no manifest"):
        verify_dataset(path)
    new = migrate_dataset(path, tmp_path / "m.npz")
    assert verify_dataset(new)["rows_sha256"] == verify_dataset(new)["rows_sha256"]


def test_cli_migrate_data(h5set, tmp_path, capsys):
    from sklearn_crb.cli import main

    with h5py.File(h5set, "r+") as f:
        del f["manifest"]
    assert main(["migrate-data", str(h5set), "--out", str(tmp_path / "new.npz")]) == 2
    assert "--out must have the suffix" in capsys.readouterr().err
    assert main(["migrate-data", str(h5set), "--out", str(tmp_path / "new.h5"), "--quiet"]) == 0
    open_dataset(tmp_path / "new.h5")
