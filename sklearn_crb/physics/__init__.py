"""Physics of the generalized-Bloch MT model: parameters, sequence, R2sl, signal and Jacobian.

``sklearn_crb.physics.simulate`` and ``sklearn_crb.physics.jacobian`` are the
two entry points (Assländer et al., MRM 2022, linear approximation of the
generalized Bloch model); they live in :mod:`sklearn_crb.physics.signal`,
imported on first use so that ``parameters`` and ``sequence`` stay light.
"""

from importlib import import_module

__all__ = ["simulate", "jacobian", "pulse_hamiltonian", "free_precession_propagator"]


def __getattr__(name):
    if name in __all__:
        return getattr(import_module("sklearn_crb.physics.signal"), name)
    raise AttributeError(f"module 'sklearn_crb.physics' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
