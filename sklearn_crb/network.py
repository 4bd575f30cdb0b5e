"""Re-export of :mod:`sklearn_crb.estimators.network` (the torch modules), where the README's users know it."""

from sklearn_crb.estimators.network import MLP, InputNormalization, ResidualMLP, paper_hidden

__all__ = ["InputNormalization", "ResidualMLP", "MLP", "paper_hidden"]
