"""sklearn-crb: Cramér–Rao-bound-informed estimation of MT parameters.

Implements Zhang et al., "Cramér–Rao bound-informed training of neural
networks for quantitative MRI", Magn Reson Med 2022;88:436-448, on the
generalized-Bloch magnetization-transfer model.

Data flow (one module per step)::

    sequence -> physics (signal, Jacobian) -> crb -> simulator
             -> regressor (CRBNetRegressor) / nlls (NLLSFitter) -> metrics -> io / cli
"""

from importlib import import_module

from .parameters import PARAMETERS, ParameterPrior
from .sequence import Sequence

__version__ = "0.1.0"

# Heavier modules (skorch, scipy.optimize) are imported on first use.
_LAZY = {
    "MTFingerprintSimulator": "simulator",
    "CRBNetRegressor": "regressor",
    "NLLSFitter": "nlls",
    "crb_efficiency_score": "metrics",
    "crb_normalized_mse": "metrics",
    "make_crb_scorer": "metrics",
    "bias_variance_report": "metrics",
    "cramer_rao_bound": "crb",
    "DictionaryMatcher": "dictionary",
    "fit_maps": "maps",
    "make_phantom": "phantom",
    "save_model": "model_io",
    "load_model": "model_io",
    "load_coefficients": "io",
}

__all__ = ["PARAMETERS", "ParameterPrior", "Sequence", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'sklearn_crb' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
