"""Fused numba CPU kernel of the signal and its Jacobian (see :mod:`.kernel`)."""
