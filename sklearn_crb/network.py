"""Re-export of :mod:`sklearn_crb.estimators.net.modules` (the torch networks), where the README's users know it."""

from sklearn_crb.estimators.net.modules import MLP, InputNormalization, ResidualMLP, paper_hidden

__all__ = ["InputNormalization", "ResidualMLP", "MLP", "paper_hidden"]
