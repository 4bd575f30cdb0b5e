"""Re-export of :mod:`sklearn_crb.estimators.net.regressor`, where the README's users import ``CRBNetRegressor``."""

from sklearn_crb.estimators.net.callbacks import (
                                                  CRBScoring,
                                                  DivergenceGuard,
                                                  OneCycleSchedule,
                                                  StepDecayWithFloor,
                                                  paper_lr_scheduler,
)
from sklearn_crb.estimators.net.losses import WeightedMSELoss
from sklearn_crb.estimators.net.modules import TargetStandardizedModule
from sklearn_crb.estimators.net.regressor import CRBNetRegressor

__all__ = ["CRBNetRegressor", "WeightedMSELoss", "TargetStandardizedModule", "StepDecayWithFloor",
           "paper_lr_scheduler", "CRBScoring", "DivergenceGuard", "OneCycleSchedule"]
