"""Nonlinear least-squares fits of MT fingerprints: the estimator, its solver and the step linear algebra.

* :mod:`.fitter`: :class:`NLLSFitter`, the scikit-learn estimator (validation, bounds, starts, chunking,
  ``predict_details``);
* :mod:`.solver`: the batched variable-projection Levenberg–Marquardt solver (no scikit-learn);
* :mod:`.steps`: the linear algebra of one LM step (box-constrained step, secant updates).
"""

from sklearn_crb.estimators.nlls.fitter import DEFAULT_BOUNDS, DEFAULT_START, STATUS, NLLSFitter, NLLSFitWarning

__all__ = ["NLLSFitter", "NLLSFitWarning", "STATUS", "DEFAULT_START", "DEFAULT_BOUNDS"]
