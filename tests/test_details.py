"""One result type: ``predict_details`` of NLLS, the dictionary, a fitted and a loaded network return
``PredictionDetails`` with the same fields; optional fields are None, never missing, and which ones each
estimator fills is fixed (not a function of the data or of how the network was obtained)."""

import dataclasses
import warnings

import numpy as np
import pytest
from conftest import train_small_model

from sklearn_crb.estimators.details import PredictionDetails
from sklearn_crb.estimators.dictionary import DictionaryMatcher
from sklearn_crb.estimators.nlls import NLLSFitter
from sklearn_crb.io.models import load_model, save_model

#: Fields every estimator fills: what ``fit_maps`` reads.
SHARED = ("estimate", "prediction", "theta", "M0", "residual_norm", "converged", "failed", "n_free", "fixed_names")
#: The optional fields each estimator fills (``compute_crb=True``, nothing fixed; the network's default se="delta").
FILLED = {
    "NLLS": {"crb_unit", "crb", "std_error", "sigma", "at_bound", "free_parameters", "status", "status_names",
             "n_iter", "n_jacobian"},
    "dictionary": {"crb_unit", "correlation", "index"},
    "fitted network": {"var_unit", "noise_residual_norm", "out_of_range"},
    "loaded network": {"var_unit", "noise_residual_norm", "out_of_range"},
}
NETWORKS = ("fitted network", "loaded network")


@pytest.fixture(scope="module")
def details(short_sequence, tmp_path_factory):
    sim, net, _ = train_small_model(short_sequence)
    folder = tmp_path_factory.mktemp("details") / "model"
    save_model(net, folder, simulator=sim)
    estimators = {
        "NLLS": NLLSFitter(short_sequence, basis=sim.basis_, estimate=("m0s", "R1f", "R2f")).fit(),
        "dictionary": DictionaryMatcher(short_sequence, basis=sim.basis_, n_atoms=100, random_state=0).fit(),
        "fitted network": net,
        "loaded network": load_model(folder, device="cpu"),
    }
    X = sim.make_dataset(6, random_state=1)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unconverged voxels are reported, not raised
        return {name: est.predict_details(X, compute_crb=True) for name, est in estimators.items()}


def _filled(det):
    return {f for f in PredictionDetails.field_names() if getattr(det, f) is not None}


@pytest.mark.parametrize("name", ["NLLS", "dictionary", *NETWORKS])
def test_every_estimator_returns_the_one_result_type(details, name):
    det = details[name]
    assert type(det) is PredictionDetails
    assert tuple(f.name for f in dataclasses.fields(det)) == PredictionDetails.field_names()
    assert tuple(det.to_dict()) == PredictionDetails.field_names()
    assert set(SHARED) <= _filled(det), sorted(set(SHARED) - _filled(det))
    assert _filled(det) - set(SHARED) == FILLED[name], name
    assert det.prediction.shape == (6, len(det.estimate)) and det.theta.shape == (6, 8)
    np.testing.assert_array_equal(det.failed, ~det.converged)


def test_the_pattern_is_the_same_across_estimators_where_they_share_it(details):
    """The shared fields are filled everywhere; a fitted and a loaded network fill the same optional fields."""
    patterns = {name: _filled(det) for name, det in details.items()}
    assert all(set(SHARED) <= p for p in patterns.values())
    assert patterns["fitted network"] == patterns["loaded network"]
    names = {tuple(det.to_dict()) for det in details.values()}
    assert names == {PredictionDetails.field_names()}
