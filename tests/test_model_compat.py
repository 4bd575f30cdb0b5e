"""Model folders saved by release 0.1 still load and predict bit-identically.

The folders under ``tests/data/models_v0.1`` were written by sklearn-crb 0.1.0
(``tests/data/make_v01_models.py``), with the predictions it made. They predate
the hash of ``model.json``'s meaning (format version 5), so they load only
through the documented paths for trusted folders: ``load_model(...,
trust_unhashed=True)``, or once converted by ``migrate_model``
(``sklearn-crb migrate-model``).
"""

import shutil
from pathlib import Path

import numpy as np
import pytest

from sklearn_crb.io.models import load_model, migrate_model

DATA = Path(__file__).resolve().parent / "data" / "models_v0.1"


@pytest.mark.parametrize("name, xkey", [("plain", "X"), ("measured_b1", "X_b1")])
def test_v01_model_folders_load_and_predict_bit_identically(name, xkey, tmp_path, one_torch_thread):
    folder = shutil.copytree(DATA / name, tmp_path / name)  # a copy: loading must not need to write
    expected = np.load(DATA / "expected.npz")
    model = load_model(folder, device="cpu", trust_unhashed=True)
    np.testing.assert_array_equal(model.predict(expected[xkey]), expected[name])
    migrated = load_model(migrate_model(folder, tmp_path / f"{name}-v5"), device="cpu")
    np.testing.assert_array_equal(migrated.predict(expected[xkey]), expected[name])
