"""The CRB-trained network (Zhang et al., MRM 2022): ``CRBNetRegressor`` and its rooms.

One module per concept, in the order ``CRBNetRegressor.fit`` visits them:
:mod:`~.measured` (measured inputs), :mod:`~.data` (one preparation path for
arrays and lazy row sets), :mod:`~.targets` (names, the bounded head),
:mod:`~.crb_weighting` (weight caps, the CRB at the estimate),
:mod:`~.modules` (the torch networks), then the training loop's
:mod:`~.loaders`, :mod:`~.augmentation`, :mod:`~.losses` and
:mod:`~.callbacks`; :mod:`~.details` is ``predict_details``.
"""

from sklearn_crb.estimators.net.callbacks import (
                                                  CRBScoring,
                                                  DivergenceGuard,
                                                  OneCycleSchedule,
                                                  StepDecayWithFloor,
                                                  paper_lr_scheduler,
)
from sklearn_crb.estimators.net.losses import WeightedMSELoss
from sklearn_crb.estimators.net.modules import (
                                                  MLP,
                                                  InputNormalization,
                                                  ResidualMLP,
                                                  TargetStandardizedModule,
                                                  paper_hidden,
)
from sklearn_crb.estimators.net.regressor import CRBNetRegressor, paper_recipe

__all__ = ["CRBNetRegressor", "paper_recipe", "MLP", "ResidualMLP", "InputNormalization", "paper_hidden",
           "TargetStandardizedModule", "WeightedMSELoss", "CRBScoring", "DivergenceGuard", "OneCycleSchedule",
           "StepDecayWithFloor", "paper_lr_scheduler"]
