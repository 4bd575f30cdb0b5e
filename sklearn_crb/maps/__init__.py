"""Parameter maps of coefficient images: :func:`fit_maps` and its result, :class:`Maps`.

* :mod:`.fit`: :func:`fit_maps` (an estimator applied to every voxel, with standard-error,
  goodness-of-fit and flag maps), the estimator check, the noise level and the map names;
* :mod:`.trust`: the trust map, per voxel whether the data contradict the estimate (misfit
  chi-squared, Gauss–Newton step in standard errors);
* :mod:`.result`: :class:`Maps`, the named maps with units, sigma and provenance, which write
  themselves to NIfTI.
"""

from sklearn_crb.maps.fit import (
    FLAGS,
    TIME_UNITS,
    check_estimator,
    estimate_sigma,
    fit_maps,
    map_names,
    resolve_trust,
)
from sklearn_crb.maps.result import SIGMA_METHODS, Maps
from sklearn_crb.maps.trust import TRUST_METHODS

__all__ = ["fit_maps", "Maps", "FLAGS", "SIGMA_METHODS", "TIME_UNITS", "TRUST_METHODS", "check_estimator",
           "estimate_sigma", "map_names", "resolve_trust"]
