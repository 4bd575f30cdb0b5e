"""Bad inputs for the readers and writers: untrusted model folders, training sets,
the output policy (no foreign file replaced, umask respected) and the maps protocol."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import train_small_model
from sklearn_crb.io._files import atomic_files, check_file_name, check_output_folder
from sklearn_crb.io.datasets import load_dataset, save_dataset
from sklearn_crb.io.images import save_maps
from sklearn_crb.io._model_schema import SCHEMAS
from sklearn_crb.io.models import FORMAT_VERSION, NETWORKS, file_sha256, load_model, save_model

NAMES = ("m0s", "R1f", "R2f")


@pytest.fixture(scope="module")
def trained(short_sequence):
    """A net without the input standardisation (as every net before format 4)."""
    return train_small_model(short_sequence, module__standardize=False)


@pytest.fixture
def model_dir(trained, tmp_path):
    sim, net, _ = trained
    return save_model(net, tmp_path / "model", simulator=sim)


@pytest.fixture(scope="module")
def trained_std(short_sequence):
    """A net with the input standardisation (format 4 on), the MLP default."""
    return train_small_model(short_sequence)


@pytest.fixture
def std_dir(trained_std, tmp_path):
    sim, net, _ = trained_std
    return save_model(net, tmp_path / "std", simulator=sim)


def _edit(path, fn):
    meta = json.loads((path / "model.json").read_text())
    meta = fn(meta)
    (path / "model.json").write_text(json.dumps(meta))


def _snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}


# ------------------------------------------------------------------ security: nothing in model.json runs code
def test_torch_hub_payload_is_refused_and_never_runs(model_dir, tmp_path):
    marker = tmp_path / "PWNED"
    (model_dir / "hubconf.py").write_text(f"open({str(marker)!r}, 'w').write('x')\ndependencies = []\n")

    def payload(m):
        m["module_class"] = "sklearn_crb.model_io:torch.hub.load"
        m["module_kwargs"] = {"repo_or_dir": str(model_dir), "model": "x", "source": "local"}
        return m

    _edit(model_dir, payload)
    with pytest.raises(ValueError, match=r"model\.json.*module_class.*not one of the package's networks"):
        load_model(model_dir)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["os:system", "builtins:eval", "sklearn_crb.io.models:load_model",
                                  "sklearn_crb.estimators.network:InputNormalization",
                                  "sklearn_crb.network:MLP.__init__", "sklearn_crb.estimators.regressor:torch.load",
                                  "mlp", "", "MLP.__class__"])
def test_only_registered_networks_can_be_named(model_dir, name):
    _edit(model_dir, lambda m: dict(m, module_class=name))
    with pytest.raises(ValueError, match="module_class"):
        load_model(model_dir)


@pytest.mark.parametrize("legacy", ["sklearn_crb.network:MLP", "sklearn_crb.estimators.network:MLP"])
def test_models_of_format_1_still_load(trained, model_dir, legacy):
    sim, net, X = trained

    def v1(m):
        m.pop("params_sha256")
        m["module_kwargs"].pop("standardize")  # format 1 knew no such argument
        return dict(m, format_version=1, module_class=legacy)

    _edit(model_dir, v1)
    np.testing.assert_array_equal(load_model(model_dir, device="cpu", trust_unhashed=True).predict(X[:10]), net.predict(X[:10]))


def test_saved_model_records_every_constructor_argument(trained, model_dir):
    """Format 3 on: module_kwargs are complete, so a later change of a default cannot change the loaded net."""
    import inspect

    sim, net, X = trained
    meta = json.loads((model_dir / "model.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION
    want = {k for k, p in inspect.signature(net.module).parameters.items()} - {"n_features", "n_outputs"}
    assert set(meta["module_kwargs"]) == want
    assert meta["module_kwargs"]["hidden"] == [16, 8]
    assert meta["module_kwargs"]["standardize"] is False


def test_format_3_models_load_without_the_input_standardisation(trained, model_dir, std_dir):
    """A version-3 model.json has no 'standardize' key: it means False (the nets of that time). Such a
    plain net loads and predicts as saved; a standardised net relabelled as version 3 is refused by name."""
    def v3(m):
        m["module_kwargs"].pop("standardize")
        return dict(m, format_version=3)

    _edit(model_dir, v3)
    loaded = load_model(model_dir, device="cpu", trust_unhashed=True)
    assert loaded.module_.module.normalize.n_standardized == 0
    X = trained[2][:10]
    np.testing.assert_array_equal(loaded.predict(X), trained[1].predict(X))
    _edit(std_dir, v3)
    with pytest.raises(ValueError, match="does not fit the network.*feat_"):
        load_model(std_dir, device="cpu", trust_unhashed=True)


def test_format_4_models_must_record_the_input_standardisation(model_dir):
    """From format 4 on, 'standardize' is recorded; a file without it is refused by name (the constructor's
    default, now True, is not what a missing key meant in format 3)."""
    _edit(model_dir, lambda m: (m["module_kwargs"].pop("standardize"), m)[1])
    with pytest.raises(ValueError, match="module_kwargs.standardize.*missing"):
        load_model(model_dir, device="cpu")


def test_a_standardised_model_round_trips_its_statistics(trained_std, std_dir):
    sim, net, X = trained_std
    loaded = load_model(std_dir, device="cpu")
    a, b = net.module_.module.normalize, loaded.module_.module.normalize
    assert bool(b.feat_ready) and torch.equal(a.feat_loc, b.feat_loc) and torch.equal(a.feat_scale, b.feat_scale)
    np.testing.assert_array_equal(loaded.predict(X[:10]), net.predict(X[:10]))


@pytest.mark.parametrize("bad", ["zero", "dtype"])
def test_input_standardisation_buffers_are_checked(std_dir, bad):
    model_dir = std_dir
    state = torch.load(model_dir / "params.pt", weights_only=True)
    if bad == "zero":
        state["module.normalize.feat_scale"] = torch.zeros_like(state["module.normalize.feat_scale"])
    else:
        state["module.normalize.feat_ready"] = torch.ones((), dtype=torch.float32)
    torch.save(state, model_dir / "params.pt")
    _edit(model_dir, lambda m: dict(m, params_sha256=file_sha256(model_dir / "params.pt")))
    with pytest.raises(ValueError, match="feat_scale' must be positive|feat_ready' must be a boolean"):
        load_model(model_dir, device="cpu")


def test_format_2_models_omitting_keys_get_the_defaults_of_that_time(trained, model_dir):
    """A version-2 model.json without batch_norm/normalization meant BatchNorm and "l2": loading
    it with those gives a shape mismatch unless the net really had them (named, not silent)."""
    sim, net, X = trained

    def v2(m):
        m["module_kwargs"] = {"hidden": m["module_kwargs"]["hidden"]}
        return dict(m, format_version=2)

    _edit(model_dir, v2)
    has_bn = any(isinstance(mod, torch.nn.BatchNorm1d) for mod in net.module_.modules())
    if has_bn:  # the v2 defaults describe this net: it loads (with l2 normalisation and ReLU)
        loaded = load_model(model_dir, device="cpu", trust_unhashed=True)
        assert loaded.module_.module.normalize.mode == "l2"
    else:
        with pytest.raises(ValueError, match="does not fit the network"):
            load_model(model_dir, device="cpu", trust_unhashed=True)


@pytest.mark.parametrize("bad", ["nan", "order"])
def test_output_bounds_may_be_infinite_but_not_nan_or_reversed(trained, model_dir, bad):
    sim, net, X = trained
    state = torch.load(model_dir / "params.pt", weights_only=True)
    n = net.n_outputs_
    state["low"] = torch.full((n,), float("nan") if bad == "nan" else 1.0, dtype=torch.float64)
    state["high"] = torch.full((n,), float("inf") if bad == "nan" else 0.0, dtype=torch.float64)
    torch.save(state, model_dir / "params.pt")
    _edit(model_dir, lambda m: dict(m, params_sha256=file_sha256(model_dir / "params.pt")))
    with pytest.raises(ValueError, match="non-finite|low < high"):
        load_model(model_dir, device="cpu")


def test_registry_schemas_match_the_constructors():
    import inspect

    for name, cls in NETWORKS.items():
        params = set(inspect.signature(cls).parameters)
        assert set(SCHEMAS[name]) == params, name


@pytest.mark.parametrize("key,value", [
    ("hidden", "16"), ("hidden", [16.5, 8]), ("hidden", [True, 8]), ("hidden", [0, 8]), ("hidden", [10**9]),
    ("hidden", {"a": 1}), ("normalization", 3), ("batch_norm", "yes"), ("n_features", "12"),
    ("n_outputs", 2.5), ("repo_or_dir", "."), ("__class__", None), ("normalization", "bogus"),
])
def test_module_kwargs_are_validated(model_dir, key, value):
    def bad(m):
        m["module_kwargs"][key] = value
        return m

    _edit(model_dir, bad)
    with pytest.raises(ValueError, match=r"model\.json|module_kwargs") as exc:
        load_model(model_dir)
    assert "model" in str(exc.value)


# ------------------------------------------------------------------ integrity
@pytest.mark.parametrize("offset", [-9, -200, 0.5])
def test_flipped_bits_in_the_weights_are_refused(model_dir, offset):
    raw = bytearray((model_dir / "params.pt").read_bytes())
    i = int(len(raw) * offset) if isinstance(offset, float) else len(raw) + offset
    raw[i] ^= 0x40
    (model_dir / "params.pt").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="params_sha256"):
        load_model(model_dir)


def test_recorded_hash_is_the_weights_file_hash(model_dir):
    meta = json.loads((model_dir / "model.json").read_text())
    assert meta["params_sha256"] == hashlib.sha256((model_dir / "params.pt").read_bytes()).hexdigest()


# ------------------------------------------------------------------ malformed model.json: one clear ValueError
@pytest.mark.parametrize("content", ["[]", "[1, 2]", '"text"', "3", "null", "{}", '{"format": 1}',
                                     "{" * 100000, "\xff\xfe"])
def test_model_json_that_is_not_an_object_of_ours(model_dir, content):
    (model_dir / "model.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(ValueError, match="model"):
        load_model(model_dir)


KEYS = ["format_version", "module_class", "module_kwargs", "n_features", "n_outputs", "rank", "estimate",
        "tied_R1", "fill_values", "basis_sha256", "sequence_sha256", "sequence", "params_sha256"]


@pytest.mark.parametrize("key", KEYS)
def test_a_missing_key_is_named(model_dir, key):
    _edit(model_dir, lambda m: {k: v for k, v in m.items() if k != key})
    with pytest.raises(ValueError, match=f"model.json.*{key}"):
        load_model(model_dir)


@pytest.mark.parametrize("key,value", [
    ("format_version", "2"), ("module_kwargs", []), ("n_features", "12"), ("n_outputs", True), ("rank", 6.0),
    ("estimate", "m0s"), ("estimate", [1, 2, 3]), ("estimate", ["m0s", "R1f", "bogus"]), ("tied_R1", "no"),
    ("fill_values", [1, 2]), ("fill_values", ["a"] * 8), ("fill_values", [float("nan")] * 8),
    ("sequence", []), ("sequence", {"alpha": "x"}), ("basis_sha256", 5), ("loss", 3), ("nuisance", 3),
])
def test_a_key_of_the_wrong_type_is_named(model_dir, key, value):
    _edit(model_dir, lambda m: dict(m, **{key: value}))
    with pytest.raises(ValueError, match=f"model.json.*{key}|{key}"):
        load_model(model_dir)


@pytest.mark.parametrize("change", [
    lambda m: m["module_kwargs"].update(hidden=[8]),
    lambda m: m["module_kwargs"].update(hidden=[16, 8, 4]),
    lambda m: m["module_kwargs"].update(batch_norm=not m["module_kwargs"]["batch_norm"]),
    lambda m: m.update(n_features=10, rank=5),
    lambda m: m.update(n_outputs=2, estimate=["m0s", "R1f"]),
    lambda m: m.update(module_class="ResidualMLP", module_kwargs={"hidden": [16, 8]}),
], ids=["fewer-layers", "more-layers", "no-batchnorm", "rank", "outputs", "other-class"])
def test_size_mismatch_with_the_weights_is_a_clear_error(model_dir, change):
    def edit(m):
        change(m)
        return m

    _edit(model_dir, edit)
    with pytest.raises(ValueError, match="model"):
        load_model(model_dir)


# ------------------------------------------------------------------ no data loss when saving
def test_save_model_refuses_a_foreign_folder(trained, tmp_path):
    sim, net, _ = trained
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("precious")
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match="not empty and not an sklearn-crb output"):
        save_model(net, user, simulator=sim)
    assert _snapshot(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["mine"]


def test_save_model_replaces_only_a_saved_model(trained, model_dir):
    sim, net, _ = trained
    with pytest.raises(ValueError, match="--overwrite"):
        save_model(net, model_dir, simulator=sim, overwrite=False)
    (model_dir / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an sklearn-crb output"):
        save_model(net, model_dir, simulator=sim)
    os.remove(model_dir / "notes.txt")
    save_model(net, model_dir, simulator=sim)  # a saved model is replaced atomically
    assert sorted(os.listdir(model_dir.parent)) == ["model"]


def test_save_model_into_the_current_folder_leaves_nothing(trained, tmp_path, monkeypatch):
    sim, net, _ = trained
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.txt").write_text("x")
    for target in (".", str(tmp_path)):
        with pytest.raises(ValueError):
            save_model(net, target, simulator=sim)
    assert sorted(os.listdir(tmp_path)) == ["data.txt"]
    assert not any(n.startswith(".") for n in os.listdir(tmp_path.parent) if n.endswith((".old", ".tmp")))


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_outputs_respect_the_umask(trained, tmp_path, mask):
    sim, net, _ = trained
    old = os.umask(mask)
    try:
        path = save_model(net, tmp_path / "model", simulator=sim)
        save_maps({"a": np.ones((2, 2))}, tmp_path / "maps")
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o777 & ~mask
    for f in [*path.iterdir(), tmp_path / "maps" / "a.nii.gz"]:
        assert os.stat(f).st_mode & 0o777 == 0o666 & ~mask, f


# ------------------------------------------------------------------ training sets
@pytest.mark.parametrize("suffix", [".npz", ".h5", ".hdf5"])
def test_training_set_round_trip(tmp_path, suffix):
    meta = {"estimate": ["m0s"], "tied_R1": False, "snr": [10.0, 20.0], "sigma": 0.01, "sequence": {"a": 1}}
    data = {"X": np.ones((3, 4)), "y": np.ones((3, 1)), "crb": np.ones((3, 1)), "basis": np.eye(4, 2) + 0j,
            "meta": np.bytes_(json.dumps(meta))}
    save_dataset(tmp_path / f"t{suffix}", data)
    back = load_dataset(tmp_path / f"t{suffix}")
    assert back["meta"] == meta
    np.testing.assert_array_equal(back["basis"], data["basis"])
    with pytest.raises(ValueError, match="exists"):
        save_dataset(tmp_path / f"t{suffix}", data)
    save_dataset(tmp_path / f"t{suffix}", data, overwrite=True)  # one of ours: replaced
    (tmp_path / f"u{suffix}").write_bytes(b"someone else's")
    with pytest.raises(ValueError, match="not written by sklearn-crb"):
        save_dataset(tmp_path / f"u{suffix}", data, overwrite=True)
    assert (tmp_path / f"u{suffix}").read_bytes() == b"someone else's"


@pytest.mark.parametrize("meta", [b"not json", b"[1]", b'{"estimate": ["m0s"]}',
                                  b'{"estimate": "m0s", "tied_R1": 1, "snr": 1, "sigma": "a", "sequence": 1}'])
def test_bad_training_set_meta_is_a_clear_error(tmp_path, meta):
    np.savez(tmp_path / "t.npz", X=np.ones((2, 2)), y=np.ones((2, 1)), crb=np.ones((2, 1)), basis=np.eye(2),
             meta=np.bytes_(meta))
    with pytest.raises(ValueError, match="meta"):
        load_dataset(tmp_path / "t.npz")


# ------------------------------------------------------------------ file names and multi-file writes
@pytest.mark.parametrize("name", ["../../x_", "a/b", "/abs_", "..", ".", "x\0y"])
def test_prefixes_with_separators_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="path separators"):
        check_file_name(name, "prefix")
    with pytest.raises(ValueError):
        save_maps({"m": np.ones((2, 2))}, tmp_path / "out", prefix=name)
    assert not (tmp_path / "out").exists() and os.listdir(tmp_path) == []


def test_a_failed_multi_file_write_changes_nothing(tmp_path):
    (tmp_path / "b").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_files(tmp_path, ["a", "b"]) as tmp:
            tmp["a"].write_text("new")
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["b"] and (tmp_path / "b").read_text() == "old"
    with pytest.raises(RuntimeError):
        with atomic_files(tmp_path / "new", ["a"]):
            raise RuntimeError("boom")
    assert not (tmp_path / "new").exists()


def test_output_folder_policy(tmp_path):
    (tmp_path / "empty").mkdir()
    assert check_output_folder(tmp_path / "empty") == tmp_path / "empty"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        check_output_folder(tmp_path / "file")
    with pytest.raises(ValueError, match="is not a folder"):
        check_output_folder(tmp_path / "file" / "sub")


# ------------------------------------------------------------------ the maps protocol
class _Protocol:
    """A minimal estimator of fit_maps' protocol (fitted_model, predict_details): the truth as estimate,
    flags from a mask."""

    def __init__(self, sequence, basis, theta, fail=None, n_free=5):
        self.sequence_, self.basis_, self.theta, self.fail, self.n_free = sequence, basis, theta, fail, n_free
        self.calls = []

    def fitted_model(self):
        from sklearn_crb._model import FittedModel

        return FittedModel(sequence=self.sequence_, basis=self.basis_, estimate=NAMES)

    def predict_details(self, X, *, fixed=None, compute_crb=True):
        from sklearn_crb.physics.signal import simulate

        n = X.shape[0]
        self.calls.append((n, fixed, compute_crb))
        r = X.shape[1] // 2
        c = X[:, :r] + 1j * X[:, r:]
        th = np.tile(self.theta, (n, 1))
        u = simulate(self.sequence_, th) @ self.basis_.conj()
        M0 = np.sum(u.conj() * c, 1) / np.sum(np.abs(u) ** 2, 1)
        conv = np.ones(n, bool) if self.fail is None else ~self.fail[:n]
        from sklearn_crb.estimators.details import PredictionDetails

        return PredictionDetails(theta=th, M0=M0, residual_norm=np.linalg.norm(c - M0[:, None] * u, axis=1),
                                 converged=conv, failed=~conv, crb_unit=np.ones((n, 3)) if compute_crb else None,
                                 n_free=self.n_free, estimate=NAMES, prediction=th[:, :3])


def test_fit_maps_uses_only_the_protocol(short_sequence):
    from sklearn_crb.maps import FLAGS, fit_maps

    U = np.linalg.qr(np.random.default_rng(0).standard_normal((120, 4)) + 0j)[0]
    theta = np.array([0.1, 1.0, 12.0, 15.0, 3.0, 12e-6, 0.0, 1.0])
    c = np.random.default_rng(1).standard_normal((5, 3, 4)) + 1j * np.random.default_rng(2).standard_normal((5, 3, 4))
    fail = np.zeros(15, bool)
    fail[3] = True
    est = _Protocol(short_sequence, U, theta, fail=fail)
    maps = fit_maps(est, c, mask=np.ones((5, 3)), sigma=2.0, chunk_size=100, fixed={"B1": 0.9})
    assert est.calls[0][1]["B1"].shape == (15,) and est.calls[0][2] is True
    assert maps.arrays["flags"].flat[3] & FLAGS["estimator_failed"] and (maps.arrays["flags"].flat[:3] == 0).all()
    np.testing.assert_allclose(maps.arrays["m0s_se"], 2.0 / maps.arrays["M0_abs"])  # sqrt(crb_unit) sigma / |M0|
    with pytest.raises(TypeError, match="predict_details"):
        fit_maps(object(), c)
    with pytest.raises(ValueError, match="rank"):
        fit_maps(est, c[..., :3])
    with pytest.raises(ValueError, match="fixed"):
        fit_maps(est, c, fixed={"m0s": 0.1}, sigma=1.0)
    # sigma from the residuals with 2r - n_free degrees of freedom: more unknowns, larger sigma
    s5 = fit_maps(est, c, compute_se=False)["sigma"]
    est.n_free = 7
    assert fit_maps(est, c, compute_se=False)["sigma"] > s5


def test_model_folder_copy_keeps_loading(model_dir, tmp_path):
    shutil.copytree(model_dir, tmp_path / "copy")
    assert load_model(tmp_path / "copy", device="cpu").crb_metadata_["rank"] == 6
