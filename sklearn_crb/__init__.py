"""sklearn-crb: CRB-informed estimation of magnetization-transfer parameters."""
__version__ = "0.1.0"
