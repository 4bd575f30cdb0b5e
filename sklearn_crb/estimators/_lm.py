"""Moved to :mod:`sklearn_crb.estimators.nlls.solver` (0.2); kept for the network's nuisance polish until it
imports from there. Remove with the network's move to ``estimators/net/``."""

from sklearn_crb.estimators.nlls.solver import *  # noqa: F401,F403
from sklearn_crb.estimators.nlls.solver import __all__  # noqa: F401
