"""sklearn-crb: Cramér–Rao-bound-informed estimation of MT parameters.

Implements Zhang et al., "Cramér–Rao bound-informed training of neural
networks for quantitative MRI", Magn Reson Med 2022;88:436-448, on the
generalized-Bloch magnetization-transfer model.

Data flow (one module per step)::

    physics (parameters, sequence, R2sl, signal/Jacobian) -> crb -> simulator
        -> estimators (CRBNetRegressor, NLLSFitter, DictionaryMatcher) -> metrics
        -> maps -> io (images, saved models) -> demo / cli
"""

from importlib import import_module

from sklearn_crb._version import __version__
from sklearn_crb.physics.parameters import PARAMETERS
from sklearn_crb.physics.priors import ParameterPrior
from sklearn_crb.physics.sequence import Sequence

# Heavier modules (skorch, scipy.optimize) are imported on first use.
_LAZY = {
    "MTFingerprintSimulator": "simulator",
    "CRBNetRegressor": "estimators.regressor",
    "NLLSFitter": "estimators.nlls",
    "crb_efficiency_score": "metrics",
    "crb_normalized_mse": "metrics",
    "make_crb_scorer": "metrics",
    "bias_variance_report": "metrics",
    "cramer_rao_bound": "crb",
    "DictionaryMatcher": "estimators.dictionary",
    "fit_maps": "maps",
    "make_phantom": "phantom",
    "save_model": "io.models",
    "load_model": "io.models",
    "load_coefficients": "io.images",
}

__all__ = ["__version__", "PARAMETERS", "ParameterPrior", "Sequence", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'sklearn_crb' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
