"""Pulse sequences: trains of rectangular RF pulses with a constant TR.

A hybrid-state sequence (Assländer et al., Phys Rev Research 2019) is given by
the flip angle ``alpha`` (rad) and the duration ``TRF`` (s) of each pulse, the
repetition time ``TR`` (s) and, per pulse, the gradient moment that decides how
the pulse acts on transverse magnetization (``"balanced"`` or ``"crusher"``,
the crushed inversion pulse of Assländer et al., MRM 2022, "Generalized Bloch
model").
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

__all__ = ["Sequence", "GRAD_MOMENTS", "TR_MAX"]

GRAD_MOMENTS = ("balanced", "crusher", "spoiler_dual", "spoiler_prepulse")

#: Longest accepted repetition time (s). MT fingerprinting uses TRs of a few ms;
#: beyond about 100 s the steady-state solve of the model loses all precision.
TR_MAX = 1.0


class Sequence:
    """A periodic train of rectangular RF pulses.

    Parameters
    ----------
    alpha : array_like, shape (n_pulses,)
        Nominal flip angles in rad (signed; the pulse rotates about y).
    TRF : array_like, shape (n_pulses,)
        Pulse durations in s, each in (0, TR].
    TR : float
        Repetition time in s, in (0, TR_MAX] (TR_MAX = 1 s).
    grad_moment : str or sequence of str, optional
        Per pulse ``"balanced"`` (default for all but the first),
        ``"crusher"`` (default for pulse 0: the inversion pulse with
        crushers), ``"spoiler_dual"`` or ``"spoiler_prepulse"``.
    rf_phase_increment : float, optional
        RF phase increment between pulses in rad (default pi); the signal is
        returned in the phase-cycled (demodulated) frame.
    name : str, optional
        Label used in reports and for provenance.

    Attributes
    ----------
    n_pulses : int
    omega1 : ndarray
        ``alpha / TRF`` in rad/s.
    """

    def __init__(self, alpha, TRF, TR, grad_moment=None, rf_phase_increment=np.pi, name="custom"):
        alpha = self._as_vector(alpha, "alpha")
        TRF = self._as_vector(TRF, "TRF")
        if alpha.shape != TRF.shape:
            raise ValueError(f"alpha and TRF must have equal lengths, got {alpha.size} and {TRF.size}")
        try:
            TR = float(TR)
        except (TypeError, ValueError):
            raise TypeError(f"TR must be a positive float in s, got {TR!r}") from None
        if not np.isfinite(TR) or TR <= 0 or TR > TR_MAX:
            raise ValueError(f"TR must be a positive finite time in (0, {TR_MAX:g}] s, got TR={TR!r}")
        if np.any(TRF <= 0) or np.any(TRF > TR):
            i = int(np.flatnonzero((TRF <= 0) | (TRF > TR))[0])
            raise ValueError(f"TRF must lie in (0, TR={TR:g} s]; TRF[{i}] = {TRF[i]:g} s")
        n = alpha.size
        if grad_moment is None:
            grad_moment = ["crusher"] + ["balanced"] * (n - 1)
        elif isinstance(grad_moment, str):
            grad_moment = [grad_moment] * n
        grad_moment = [str(g) for g in grad_moment]
        if len(grad_moment) != n:
            raise ValueError(f"grad_moment must have one entry per pulse ({n}), got {len(grad_moment)}")
        bad = sorted(set(grad_moment) - set(GRAD_MOMENTS))
        if bad:
            raise ValueError(f"grad_moment has unknown values {bad}; allowed: {GRAD_MOMENTS}")
        rf_phase_increment = float(rf_phase_increment)
        if not np.isfinite(rf_phase_increment):
            raise ValueError("rf_phase_increment must be finite")
        self.alpha = alpha
        self.TRF = TRF
        self.TR = TR
        self.grad_moment = tuple(grad_moment)
        self.rf_phase_increment = rf_phase_increment
        self.name = str(name)
        for a in (self.alpha, self.TRF):
            a.setflags(write=False)

    @staticmethod
    def _as_vector(x, argname):
        try:
            raw = np.asarray(x)
        except (TypeError, ValueError):
            raise TypeError(f"{argname} must be a real 1-D array, got {type(x).__name__}") from None
        if np.iscomplexobj(raw):
            raise TypeError(f"{argname} must be real, got complex dtype {raw.dtype}")
        if raw.dtype.kind not in "biuf":
            raise TypeError(f"{argname} must be a real numeric 1-D array, got dtype {raw.dtype}")
        arr = raw.astype(np.float64)
        arr = np.array(arr.reshape(-1) if arr.ndim == 2 and 1 in arr.shape else arr, dtype=np.float64)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"{argname} must be a non-empty 1-D array, got shape {np.shape(x)}")
        if not np.all(np.isfinite(arr)):
            i = int(np.flatnonzero(~np.isfinite(arr))[0])
            raise ValueError(f"{argname} must be finite; {argname}[{i}] = {arr[i]}")
        return arr

    # ------------------------------------------------------------------ props
    @property
    def n_pulses(self):
        return int(self.alpha.size)

    @property
    def omega1(self):
        return self.alpha / self.TRF

    def __len__(self):
        return self.n_pulses

    def __repr__(self):
        return f"Sequence(name={self.name!r}, n_pulses={self.n_pulses}, TR={self.TR:g} s)"

    def __eq__(self, other):
        return isinstance(other, Sequence) and self.sha256() == other.sha256()

    def __hash__(self):
        return hash(self.sha256())

    def sha256(self):
        """Hash of the pulse train (alpha, TRF, TR, grad moments, phase increment)."""
        h = hashlib.sha256()
        for a in (self.alpha, self.TRF, np.array([self.TR, self.rf_phase_increment])):
            h.update(np.ascontiguousarray(a, dtype="<f8").tobytes())
        h.update(",".join(self.grad_moment).encode())
        return h.hexdigest()

    def to_dict(self):
        """JSON-able description (lists of floats)."""
        return {
            "name": self.name,
            "alpha": self.alpha.tolist(),
            "TRF": self.TRF.tolist(),
            "TR": self.TR,
            "grad_moment": list(self.grad_moment),
            "rf_phase_increment": self.rf_phase_increment,
        }

    @classmethod
    def from_dict(cls, d):
        return cls(d["alpha"], d["TRF"], d["TR"], d.get("grad_moment"), d.get("rf_phase_increment", np.pi),
                   d.get("name", "custom"))

    @classmethod
    def resolve(cls, sequence, argname="sequence"):
        """``sequence`` itself, or ``Sequence.default()`` for None; TypeError otherwise."""
        if sequence is None:
            return cls.default()
        if not isinstance(sequence, cls):
            raise TypeError(f"{argname} must be a sklearn_crb.Sequence or None, got {type(sequence).__name__}")
        return sequence

    # ------------------------------------------------------------ factories
    @classmethod
    def from_mat(cls, path, TR=3.5e-3, grad_moment=None, name=None):
        """Read ``alpha`` (rad) and ``TRF`` (s) from a MATLAB v5 or v7.3 file.

        Parameters
        ----------
        path : str or path-like
        TR : float
            Repetition time in s (not stored in the published files).
        grad_moment : optional
            As in ``Sequence``; default: crusher on pulse 0, balanced otherwise.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"sequence file not found: {path}")
        data = None
        # v7.3 is HDF5: tell it by its signature first, since old scipy reads some HDF5 files as v5 garbage
        if not _is_hdf5(path):
            try:
                from scipy.io import loadmat

                data = {k: v for k, v in loadmat(path).items() if not k.startswith("__")}
            except Exception as exc:  # noqa: BLE001 - report any parse error uniformly
                raise ValueError(f"{path} is not a readable MATLAB file: {exc}") from exc
        if data is None:
            try:
                import h5py

                with h5py.File(path, "r") as f:
                    data = {k: np.array(f[k]) for k in f.keys() if isinstance(f[k], h5py.Dataset)}
            except Exception as exc:  # noqa: BLE001
                raise ValueError(f"{path} is not a readable MATLAB v7.3 (HDF5) file: {exc}") from exc
        for key in ("alpha", "TRF"):
            if key not in data:
                raise ValueError(f"{path} has no variable {key!r} (found {sorted(data)})")
        # a vector, (1, N) or (N, 1) only: a (2, N) variable is not a pulse train
        return cls(np.asarray(data["alpha"]), np.asarray(data["TRF"]), TR, grad_moment,
                   name=name or os.path.splitext(os.path.basename(path))[0])

    @classmethod
    def default(cls, n_pulses=1142, TR=3.5e-3):
        """The package's built-in hybrid-state MT sequence.

        A synthetic train in the style of the published v3.2 design (same TR
        and length): an inversion pulse with crushers, a short small-angle
        hybrid-state segment, two large-angle lobes, and TRF modulation (short,
        high-power pulses) for MT weighting. It is defined by a few control
        points joined by monotone cubic (PCHIP) interpolation, so the package
        works without any data file; rank 13 keeps about 95 % of the energy of
        prior fingerprints (99.6 % for v3.2). It is *not* the published
        sequence: use ``Sequence.from_mat`` on
        ``control_MT_v3p2_TR3p5ms_discretized.mat`` for that.

        Parameters
        ----------
        n_pulses : int
            Number of pulses (the design is stretched to fit), >= 10.
        TR : float
            Repetition time in s.
        """
        from scipy.interpolate import PchipInterpolator

        n = int(n_pulses)
        if n < 10:
            raise ValueError(f"n_pulses must be >= 10, got {n_pulses}")
        # control points: (position in the cycle as a fraction, flip angle in rad)
        a_ctrl = np.array([(0.001, 1.0), (0.005, 0.06), (0.026, 0.05), (0.037, 1.8), (0.053, 2.1),
                           (0.079, 1.0), (0.114, 0.45), (0.228, 0.42), (0.289, 0.25), (0.368, 0.10),
                           (0.578, 0.065), (0.613, 0.1), (0.652, 0.6), (0.674, 2.2), (0.701, 2.1),
                           (0.727, 1.0), (0.753, 0.75), (0.788, 0.8), (0.832, 0.2), (0.876, 0.12),
                           (0.963, 0.06), (1.0, 0.05)])
        # (position, TRF in us)
        t_ctrl = np.array([(0.001, 480), (0.088, 380), (0.350, 370), (0.613, 366), (0.648, 240),
                           (0.674, 490), (0.701, 480), (0.727, 240), (0.753, 220), (0.788, 260),
                           (0.832, 360), (1.0, 360)])
        x = np.clip(np.arange(n) / (n - 1), 0.001, 1.0)
        alpha = PchipInterpolator(a_ctrl[:, 0], a_ctrl[:, 1])(x)
        TRF = np.round(PchipInterpolator(t_ctrl[:, 0], t_ctrl[:, 1])(x) / 2.8) * 2.8e-6  # 2.8 us raster
        alpha[0], TRF[0] = np.pi, 500e-6
        return cls(alpha, TRF, TR, name="sklearn_crb_default_hybrid_state")


def _is_hdf5(path):
    with open(path, "rb") as f:
        head = f.read(1024)
    return b"\x89HDF\r\n\x1a\n" in head
