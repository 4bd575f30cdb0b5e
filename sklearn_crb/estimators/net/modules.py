"""PyTorch modules for fingerprint-to-parameter regression.

``ResidualMLP`` is the architecture of Zhang et al., "Cramér–Rao bound-informed
training of neural networks for quantitative MRI", MRM 2022:
an L2-normalised input, a widening/narrowing stack of fully connected layers,
each followed by BatchNorm1d and ReLU, skip connections between layers of equal
width (added before BatchNorm/ReLU) and a linear output layer. ``MLP`` is a
plain fully connected network; its defaults (256-256-256, SiLU, no BatchNorm,
``"phase-l2"`` input) are the default recipe of ``CRBNetRegressor``. Both
start with ``InputNormalization``.

Features are real vectors ``[Re c, Im c]`` of ``n_features // 2`` complex
(compressed) coefficients ``c``, as made by ``MTFingerprintSimulator``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

__all__ = ["InputNormalization", "ResidualMLP", "MLP", "paper_hidden", "reset_parameters_with"]

_NORMALIZATIONS = ("l2", "first-coefficient", "phase-l2", None)
_ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def paper_hidden(n_features=26):
    """Hidden widths of the paper's network for ``n_features`` inputs.

    The paper (26 inputs) uses 128-256-512-1024-768-640-512-384-256-192-128-26-10-6;
    the 26-wide layer takes the skip from the (normalised) input, so it
    follows ``n_features`` here.
    """
    return (128, 256, 512, 1024, 768, 640, 512, 384, 256, 192, 128, int(n_features), 10, 6)


class InputNormalization(nn.Module):
    """Remove the unknown proton density ``M0`` from the input features.

    Parameters
    ----------
    mode : {"l2", "first-coefficient", "phase-l2", None}
        ``"l2"`` divides each feature vector by its Euclidean norm (Zhang et
        al. 2022; removes ``|M0|``, keeps its phase). ``"first-coefficient"``
        divides the complex coefficients by the first one (Mao et al.;
        removes magnitude and phase of ``M0``). ``"phase-l2"``:
        ``x = c conj(c1) / (|c1| ||c||)``, i.e. ``c`` rotated so that its
        first coefficient is real positive and scaled to unit norm: removes
        magnitude and phase of ``M0`` like ``"first-coefficient"`` but stays
        bounded (every feature in [-1, 1]) when ``|c1|`` is small. ``None``:
        identity.

    n_conditioning : int, default 0
        The last ``n_conditioning`` input columns are not coefficients but
        separately measured parameters (e.g. a B1 map, ``CRBNetRegressor(
        measured=...)``): they bypass the normalisation and are standardised
        by the buffers ``cond_loc``/``cond_scale`` (set from the training
        data by the regressor; saved in the state dict).

    n_standardized : int, default 0
        When positive, the normalised coefficient features (there must be
        ``n_standardized`` of them) are also standardised per feature,
        ``(x - feat_loc) / feat_scale``, with the mean and standard deviation
        of the first batch seen in training mode (a data-dependent
        initialisation, as ActNorm in Kingma & Dhariwal 2018; a feature with
        no spread, such as the imaginary part of the rotated first
        coefficient, keeps scale 1). The buffers are saved in the state dict
        and then fixed. The normalised coefficients span about 0.01-0.3
        (rank 13, v3.2); unit-scale inputs let the first layer weigh them
        alike (see ``MLP(standardize=True)`` for what it does to training).

    noise_input : bool, default False
        The column after the coefficient features (before the measured ones)
        is the noise standard deviation ``sigma`` of the row's features, per
        real component and in their units (``CRBNetRegressor(noise_input=True)``).
        It enters the network as ``log(||x|| / sigma)`` (``x`` the coefficient
        features before normalisation): the log signal-to-noise ratio that the
        normalisation removes from the features (``||x|| ~ |M0| ||u||``). It is
        standardised with the buffers ``snr_loc``/``snr_scale``, set from the
        first training batch like the feature standardisation and then fixed.

    Notes
    -----
    All-zero rows (background voxels of a coefficient image) have no
    direction; they raise ``ValueError`` instead of producing NaNs. Mask them
    before prediction.
    """

    #: class-level default: modules pickled before the input standardisation existed lack the attribute
    n_standardized = 0

    #: class-level default: modules pickled before the noise input existed lack the attribute
    noise_input = False

    def __init__(self, mode="l2", n_conditioning=0, n_standardized=0, noise_input=False):
        super().__init__()
        if mode not in _NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {_NORMALIZATIONS}, got {mode!r}")
        self.mode = mode
        self.n_conditioning = k = int(n_conditioning)
        if k:  # only then: state dicts of unconditioned networks keep their keys
            self.register_buffer("cond_loc", torch.zeros(k))
            self.register_buffer("cond_scale", torch.ones(k))
        self.n_standardized = m = int(n_standardized)
        if m < 0:
            raise ValueError(f"n_standardized must be >= 0, got {m}")
        if m:  # only then: state dicts of unstandardised networks keep their keys
            self.register_buffer("feat_loc", torch.zeros(m))
            self.register_buffer("feat_scale", torch.ones(m))
            self.register_buffer("feat_ready", torch.zeros((), dtype=torch.bool))
        self.noise_input = bool(noise_input)
        if self.noise_input:  # only then: state dicts of networks without it keep their keys
            self.register_buffer("snr_loc", torch.zeros(1))
            self.register_buffer("snr_scale", torch.ones(1))
            self.register_buffer("snr_ready", torch.zeros((), dtype=torch.bool))

    @staticmethod
    def _raise_zero(bad, what):
        idx = torch.nonzero(bad).ravel()[:5].tolist()
        raise ValueError(
            f"X has {int(bad.sum())} rows whose {what} is zero (e.g. rows {idx}); such rows (background "
            "voxels) cannot be normalised: mask them out before calling the network"
        )

    def forward(self, x):
        k, q = self.n_conditioning, int(self.noise_input)
        if not (k or q):
            return self._standardize(self._normalize(x))
        n = x.shape[-1] - k - q  # coefficient features
        feats = x[..., :n]
        parts = [self._standardize(self._normalize(feats))]
        if q:
            parts.append(self._log_snr(feats, x[..., n:n + 1]))
        if k:
            parts.append((x[..., n + q:] - self.cond_loc.to(x.dtype)) / self.cond_scale.to(x.dtype))
        return torch.cat(parts, dim=-1)

    def _log_snr(self, feats, sigma):
        """``log(||x|| / sigma)``, standardised (the first training batch initialises the buffers)."""
        bad = ~(torch.isfinite(sigma[..., 0]) & (sigma[..., 0] > 0))
        if bool(bad.any()):
            idx = torch.nonzero(bad).ravel()[:5].tolist()
            raise ValueError(f"X's noise column (sigma) must be positive and finite; {int(bad.sum())} rows are not "
                             f"(e.g. rows {idx})")
        z = torch.log(torch.linalg.vector_norm(feats, dim=-1, keepdim=True) / sigma)
        if self.training and not bool(self.snr_ready):
            with torch.no_grad():  # data-dependent initialisation, as the feature standardisation
                flat = z.detach().reshape(-1).to(self.snr_loc.dtype)
                sd = float(flat.std(unbiased=False)) if flat.numel() > 1 else 1.0
                self.snr_loc.fill_(float(flat.mean()))
                self.snr_scale.fill_(sd if np.isfinite(sd) and sd > 1e-6 else 1.0)
                self.snr_ready.fill_(True)
        return (z - self.snr_loc.to(z.dtype)) / self.snr_scale.to(z.dtype)

    def _standardize(self, z):
        if not self.n_standardized:
            return z
        if z.shape[-1] != self.n_standardized:
            raise ValueError(f"X has {z.shape[-1]} coefficient features, the input standardisation was built "
                             f"for {self.n_standardized}")
        if self.training and not bool(self.feat_ready):
            with torch.no_grad():  # data-dependent initialisation from the first training batch
                flat = z.detach().reshape(-1, z.shape[-1]).to(self.feat_loc.dtype)
                loc, sd = flat.mean(dim=0), flat.std(dim=0, unbiased=False)
                tiny = ~(sd > 1e-6 * sd.max().clamp_min(torch.finfo(sd.dtype).tiny))
                self.feat_loc.copy_(torch.where(tiny, torch.zeros_like(loc), loc))
                self.feat_scale.copy_(torch.where(tiny | ~torch.isfinite(sd), torch.ones_like(sd), sd))
                self.feat_ready.fill_(True)
        return (z - self.feat_loc.to(z.dtype)) / self.feat_scale.to(z.dtype)

    def _normalize(self, x):
        if self.mode is None:
            return x
        if self.mode == "l2":
            norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
            bad = norm[..., 0] == 0
            if bool(bad.any()):
                self._raise_zero(bad, "L2 norm")
            return x / norm
        r = x.shape[-1] // 2
        re, im = x[..., :r], x[..., r:]
        a, b = re[..., :1], im[..., :1]
        d = a * a + b * b
        bad = d[..., 0] == 0
        if bool(bad.any()):
            self._raise_zero(bad, "first complex coefficient")
        if self.mode == "phase-l2":  # c conj(c0) / (|c0| ||c||)
            d = torch.sqrt(d) * torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        # first-coefficient: c / c0 = c conj(c0) / |c0|^2
        return torch.cat([(re * a + im * b) / d, (im * a - re * b) / d], dim=-1)

    def extra_repr(self):
        return (f"mode={self.mode!r}" + (f", n_conditioning={self.n_conditioning}" if self.n_conditioning else "")
                + (f", n_standardized={self.n_standardized}" if self.n_standardized else "")
                + (", noise_input=True" if self.noise_input else ""))


def _check_dims(n_features, n_outputs, normalization, n_conditioning=0, noise_input=False):
    n_features, n_outputs, k = int(n_features), int(n_outputs), int(n_conditioning) + int(bool(noise_input))
    if n_features < 1 or n_outputs < 1:
        raise ValueError(f"n_features and n_outputs must be >= 1, got {n_features}, {n_outputs}")
    if not 0 <= k < n_features:
        raise ValueError(f"n_conditioning (+1 with noise_input) must be in [0, n_features) (the trailing noise and "
                         f"measured-parameter columns), got {k} for n_features={n_features}")
    if normalization in ("first-coefficient", "phase-l2") and (n_features - k) % 2:
        raise ValueError(
            f"normalization={normalization!r} needs [Re c, Im c] features (an even number of coefficient "
            f"columns), got {n_features - k}"
        )
    return n_features, n_outputs


def _check_hidden(hidden):
    try:
        hidden = tuple(int(h) for h in hidden)
    except TypeError:
        raise TypeError(f"hidden must be a sequence of layer widths, got {hidden!r}") from None
    if any(h < 1 for h in hidden):
        raise ValueError(f"hidden widths must be >= 1, got {hidden}")
    return hidden


class ResidualMLP(nn.Module):
    """The residual fully connected network of Zhang et al. 2022.

    Parameters
    ----------
    n_features : int
        Input width (``2 * rank``; 26 in the paper).
    n_outputs : int
        Number of estimated parameters (3 in the paper).
    hidden : sequence of int or None
        Hidden-layer widths; None: the paper's (``paper_hidden(n_features)``,
        about 2.7 M weights for 26 inputs).
    skips : "auto", None or sequence of (int, int)
        Skip connections ``(source, target)`` between hidden layers (index
        ``-1`` is the normalised input), added to the target's linear output
        before its BatchNorm and ReLU. ``"auto"``: every layer receives the
        most recent earlier activation of the same width that is not its
        direct predecessor (this reproduces the paper's 512-512, 256-256,
        128-128 and input-26 skips).
    normalization : {"l2", "first-coefficient", "phase-l2", None}
        See :class:`InputNormalization`.
    batch_norm : bool
        BatchNorm1d after every hidden layer (paper: True).
    n_conditioning : int, default 0
        Trailing measured-parameter input columns (see :class:`InputNormalization`).
    noise_input : bool, default False
        A noise-level column after the coefficient features (see :class:`InputNormalization`).

    Notes
    -----
    The output layer is linear; the regressor trains it on standardised
    targets.
    """

    def __init__(self, n_features=26, n_outputs=3, hidden=None, skips="auto", normalization="l2", batch_norm=True,
                 n_conditioning=0, noise_input=False):
        super().__init__()
        n_features, n_outputs = _check_dims(n_features, n_outputs, normalization, n_conditioning, noise_input)
        hidden = paper_hidden(n_features) if hidden is None else _check_hidden(hidden)
        self.n_features, self.n_outputs, self.hidden = n_features, n_outputs, hidden
        self.normalize = InputNormalization(normalization, n_conditioning, noise_input=noise_input)
        widths = (n_features,) + hidden  # widths[k + 1] is hidden layer k, widths[0] the input (-1)
        if skips == "auto":
            pairs = []
            for j in range(len(hidden)):
                for i in range(j - 2, -2, -1):
                    if widths[i + 1] == hidden[j]:
                        pairs.append((i, j))
                        break
        elif skips is None:
            pairs = []
        else:
            try:
                pairs = [(int(i), int(j)) for i, j in skips]
            except (TypeError, ValueError):
                raise TypeError(f"skips must be 'auto', None or (source, target) pairs, got {skips!r}") from None
            for i, j in pairs:
                if not (-1 <= i < j - 1 and 0 <= j < len(hidden)) or widths[i + 1] != hidden[j]:
                    raise ValueError(f"invalid skip ({i}, {j}) for hidden widths {hidden} (input {n_features})")
        self.skips = tuple(pairs)
        self._skip_into = {j: i for i, j in pairs}
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm1d(h) if batch_norm else nn.Identity() for h in hidden)
        self.out = nn.Linear(widths[-1], n_outputs)

    def forward(self, X):
        h = self.normalize(X)
        acts = {-1: h}
        for j, (lin, bn) in enumerate(zip(self.linears, self.norms)):
            z = lin(h)
            if j in self._skip_into:
                z = z + acts[self._skip_into[j]]
            h = torch.relu(bn(z))
            acts[j] = h
        return self.out(h)


def _activation(name):
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]


class MLP(nn.Module):
    """A plain fully connected network (Linear-[BatchNorm]-activation blocks, linear output).

    The defaults are the default recipe of ``CRBNetRegressor`` (measured on
    the v3.2 sequence, rank 13, tied model: ``"phase-l2"`` halves the
    CRB-normalised training loss of ``"l2"`` at equal budget, and SiLU
    without BatchNorm trains reliably with AdamW and a one-cycle schedule).

    Parameters
    ----------
    n_features, n_outputs : int
    hidden : sequence of int, default (256, 256, 256)
        Hidden-layer widths.
    normalization : {"l2", "first-coefficient", "phase-l2", None}, default "phase-l2"
    batch_norm : bool, default False
    activation : {"relu", "silu", "gelu", "tanh"}, default "silu"
    n_conditioning : int, default 0
        Trailing measured-parameter input columns (see :class:`InputNormalization`).
    noise_input : bool, default False
        A noise-level column after the coefficient features (see :class:`InputNormalization`).
    standardize : bool, default True
        Standardise the normalised coefficient features per feature, from the
        first training batch (``InputNormalization(n_standardized=...)``).
        Part of the default recipe: with it the default budget (96,000 draws,
        150 epochs) trains a better net in about half the time of the earlier
        default (48,000 draws, 600 epochs, not standardised); see the README's
        efficiency benchmark. With 12,000 draws and 300+ epochs it overfits them.
    """

    standardize = False  # class-level default for nets pickled before the option existed

    def __init__(self, n_features=26, n_outputs=3, hidden=(256, 256, 256), normalization="phase-l2",
                 batch_norm=False, activation="silu", n_conditioning=0, standardize=True, noise_input=False):
        super().__init__()
        n_features, n_outputs = _check_dims(n_features, n_outputs, normalization, n_conditioning, noise_input)
        hidden = _check_hidden(hidden)
        act = _activation(activation)
        self.n_features, self.n_outputs, self.hidden = n_features, n_outputs, hidden
        self.standardize = bool(standardize)
        n_std = n_features - int(n_conditioning) - int(bool(noise_input)) if self.standardize else 0
        self.normalize = InputNormalization(normalization, n_conditioning, n_standardized=n_std,
                                            noise_input=noise_input)
        layers = []
        for a, b in zip((n_features,) + hidden[:-1], hidden):
            layers += [nn.Linear(a, b), nn.BatchNorm1d(b) if batch_norm else nn.Identity(), act()]
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(hidden[-1] if hidden else n_features, n_outputs)

    def forward(self, X):
        return self.out(self.body(self.normalize(X)))


@torch.no_grad()
def reset_parameters_with(module, generator):
    """Re-draw the weights of ``module`` with PyTorch's default distributions from ``generator``.

    ``nn.Linear``: weight ``kaiming_uniform_(a=sqrt(5))``, bias
    ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (what ``Linear.reset_parameters``
    does, but from a private generator, so that no draw touches torch's
    process-global RNG, which other threads may use at the same time).
    BatchNorm/LayerNorm initialise deterministically (ones, zeros).

    Returns
    -------
    bool
        True when every submodule with parameters was handled (Linear or a
        deterministic norm layer); False if some other layer kept its
        original (global-RNG) initialisation.
    """
    complete = True
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
            if m.bias is not None:
                bound = 1.0 / math.sqrt(m.weight.shape[1]) if m.weight.shape[1] > 0 else 0.0
                nn.init.uniform_(m.bias, -bound, bound, generator=generator)
        elif isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm)):
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        elif any(True for _ in m.parameters(recurse=False)):
            complete = False
    return complete


class TargetStandardizedModule(nn.Module):
    """Wraps the regression network; stores the target scaling and the output bounds as buffers.

    ``forward`` returns standardised outputs (what the loss sees);
    :meth:`to_physical` maps them to SI units. Keeping the scaling in the
    module's ``state_dict`` makes ``save_params``/``load_params`` and
    ``Checkpoint`` restore a net that predicts in physical units.

    Outputs with finite ``low``/``high`` (physical units) go through a
    bounded head: ``theta = low + (high - low) sigmoid(z)`` (sigmoid head),
    or, where ``log_head`` is set, ``theta = exp(log low + (log high - log
    low) sigmoid(z))`` (log-space head, for relaxation rates and times whose
    prior spans a decade or more). Both are returned in standardised units
    ``(theta - m) / s``, so the loss is the same function of ``theta`` as with
    a linear head. Outputs with an infinite bound are linear.

    Parameters
    ----------
    module : nn.Module
        The network mapping ``(batch, n_features)`` to ``(batch, n_outputs)``.
    n_outputs : int
    """

    def __init__(self, module, n_outputs):
        super().__init__()
        self.module = module
        n = int(n_outputs)
        self.register_buffer("mean", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("scale", torch.ones(n, dtype=torch.float64))
        self.register_buffer("low", torch.full((n,), -torch.inf, dtype=torch.float64))
        self.register_buffer("high", torch.full((n,), torch.inf, dtype=torch.float64))
        self.register_buffer("log_head", torch.zeros(n, dtype=torch.bool))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # models saved before the bounded head (linear outputs) or before the log-space head (sigmoid outputs)
        for name in ("low", "high", "log_head"):
            state_dict.setdefault(prefix + name, getattr(self, name).clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, X):
        z = self.module(X)
        bounded = torch.isfinite(self.low) & torch.isfinite(self.high)
        if not bool(bounded.any()):
            return z
        dt = z.dtype
        lo_s = ((self.low - self.mean) / self.scale).to(dt)
        span_s = ((self.high - self.low) / self.scale).to(dt)
        sig = torch.sigmoid(z)
        head = torch.where(bounded, lo_s, torch.zeros_like(lo_s)) + torch.where(
            bounded, span_s, torch.zeros_like(span_s)) * sig
        out = torch.where(bounded.to(z.device), head, z)
        is_log = self.log_head & bounded
        if not bool(is_log.any()):
            return out
        # Exponentiate only the log entries (by index): exp of every entry inside torch.where would
        # overflow for large non-log outputs (omega0 ~ 1e3 rad/s) and back-propagate inf * 0 = NaN.
        idx = torch.nonzero(is_log).ravel().to(z.device)
        log_lo = torch.log(self.low[is_log])
        u = log_lo.to(dt) + (torch.log(self.high[is_log]) - log_lo).to(dt) * sig.index_select(-1, idx)
        m, s = self.mean[is_log].to(dt), self.scale[is_log].to(dt)
        return out.index_copy(-1, idx, (torch.exp(u) - m) / s)

    def to_physical(self, out):
        return out.to(self.scale.dtype) * self.scale + self.mean
