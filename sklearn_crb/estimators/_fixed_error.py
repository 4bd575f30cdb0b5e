"""Moved to :mod:`sklearn_crb.estimators.fixed_sensitivity` (0.2); kept for the network's details until it
imports from there. Remove with the network's move to ``estimators/net/``."""

from sklearn_crb.estimators.fixed_sensitivity import *  # noqa: F401,F403
from sklearn_crb.estimators.fixed_sensitivity import __all__  # noqa: F401
