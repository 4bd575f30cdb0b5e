"""``Maps``: the result of :func:`sklearn_crb.maps.fit_maps`, named maps with their units, noise level and provenance.

The maps of one fit travel together with what is needed to read them: the
unit of every map, the noise level ``sigma`` the standard errors were computed
at and how it was obtained, and which estimator made them from which
acquisition. ``Maps`` writes itself to NIfTI (all files or none, see
:func:`sklearn_crb.io.images.save_maps`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from sklearn_crb.io.images import save_maps

__all__ = ["Maps", "SIGMA_METHODS"]

#: How ``Maps.sigma`` was obtained.
SIGMA_METHODS = {
    "given": "the sigma= argument",
    "residuals": "the median of the squared residual norms of the fitted voxels (chi-squared corrected)",
    "noise_residuals": "the median of the residuals with the model misfit projected out (a network's "
                       "noise_residual_norm, chi-squared corrected)",
    "given_map": "the sigma= noise map (the median is reported)",
    "noise_residuals_first_pass": "a first pass of the noise-aware network on up to 1024 voxels: the median of its "
                                  "residuals with the model misfit projected out (chi-squared corrected), two rounds",
}


@dataclass(frozen=True, eq=False)
class Maps:
    """Named parameter, standard-error, residual and flag maps of a coefficient image.

    Attributes
    ----------
    arrays : dict of str -> ndarray (spatial)
        ``<p>`` and ``<p>_se`` for each estimated target (SI units; a time target such as ``T1f`` in s),
        with ``times=True`` the time maps ``T1f``/``T2f``/``T1s`` and their ``_se``, ``M0_abs``,
        ``M0_phase`` (rad), ``relative_residual``, the trust maps ``trust_chi2`` (misfit chi-squared per
        degree of freedom) and ``trust_step`` (Gauss–Newton step, in standard errors) where asked for
        (:mod:`sklearn_crb.maps.trust`), ``flags`` (int16, bits of ``maps.FLAGS``) and ``mask`` (bool).
        Outside the mask 0; NaN where no finite estimate; every problem flagged.
    units : dict of str -> str
        The unit of each map (``flags`` and ``mask`` have none).
    sigma : float
        Noise standard deviation per real coefficient component used for the standard errors (and as a
        noise-aware network's input); the median of a noise map.
    sigma_method : str
        How ``sigma`` was obtained, a key of :data:`SIGMA_METHODS`.
    estimate : tuple of str
        The estimator's targets, in its column order.
    provenance : dict
        ``estimator`` (class name), ``sequence_sha256``, ``basis_sha256``, ``rank``, ``standard_error``
        (``"crb"``, ``"delta"`` or None when not computed), ``fixed`` (names of the fixed maps),
        ``fixed_se`` (names of those whose map error is in the standard errors) and ``trust`` (the trust
        test's ``method``, ``alpha``, ``max_step``, ``dof`` and ``n_untrusted``; None without a trust map).
    affine : ndarray (4, 4)
        The input image's affine (identity for a bare array).
    header : nibabel header or None
        The input NIfTI header, reused when the maps are written.
    """

    arrays: dict
    units: dict
    sigma: float
    sigma_method: str
    estimate: tuple
    provenance: dict = field(default_factory=dict)
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    header: object = None

    def __getattr__(self, name):
        # a map by name (maps.m0s); only for names that are maps, never for private names
        arrays = self.__dict__.get("arrays", {})
        if not name.startswith("_") and name in arrays:
            return arrays[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or map {name!r}")

    @property
    def names(self):
        """The names of the maps, in order."""
        return tuple(self.arrays)

    def to_nifti(self, folder, *, prefix="", names=None):
        """Write ``<folder>/<prefix><name>.nii.gz`` for every map (or ``names``), with the input's affine and header.

        All files are staged and replaced together (none is written if one fails). Returns
        ``{name: Path}``. Boolean maps are stored as uint8, integer maps as int16, the others as float32.
        """
        return save_maps(self.arrays, folder, affine=self.affine, header=self.header, prefix=prefix, names=names)

    def summary(self):
        """A JSON-ready description: sigma and how it was obtained, units, provenance and flag counts."""
        flags = self.arrays.get("flags")
        counts = {} if flags is None else {int(k): int(v) for k, v in zip(*np.unique(flags, return_counts=True))}
        return {"sigma": self.sigma, "sigma_method": self.sigma_method, "units": dict(self.units),
                "estimate": list(self.estimate), "provenance": dict(self.provenance), "flag_counts": counts,
                "n_voxels_fitted": int(np.sum(self.arrays["mask"])) if "mask" in self.arrays else 0}

    # ---- the 0.1 dict protocol (fit_maps returned a dict), kept for one release
    def _deprecated(self, how):
        warnings.warn(f"fit_maps() returns a Maps object since 0.2: {how}", DeprecationWarning, stacklevel=3)

    def __getitem__(self, key):
        if key == "sigma":
            self._deprecated("use maps.sigma instead of maps['sigma']")
            return self.sigma
        if key == "units":
            self._deprecated("use maps.units instead of maps['units']")
            return self.units
        self._deprecated(f"use maps.arrays[{key!r}] (or maps.{key}) instead of maps[{key!r}]")
        return self.arrays[key]

    def __contains__(self, key):
        self._deprecated("use `name in maps.arrays`")
        return key in self.arrays or key in ("sigma", "units")

    def __iter__(self):
        self._deprecated("iterate over maps.arrays")
        return iter((*self.arrays, "sigma", "units"))

    def keys(self):
        """Deprecated (the 0.1 dict): the map names, then ``"sigma"`` and ``"units"``."""
        self._deprecated("use maps.arrays.keys()")
        return [*self.arrays, "sigma", "units"]

    def items(self):
        """Deprecated (the 0.1 dict): ``(name, map)`` pairs, then sigma and the units."""
        self._deprecated("use maps.arrays.items(), maps.sigma and maps.units")
        return [*self.arrays.items(), ("sigma", self.sigma), ("units", self.units)]
