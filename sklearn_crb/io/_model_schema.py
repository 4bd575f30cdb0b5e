"""What a ``model.json`` may describe, and the checks of its untrusted content.

A saved model folder (:mod:`sklearn_crb.io.models`) is untrusted input: it may
name only the package's own networks (:data:`NETWORKS`), each constructor
argument is checked against a JSON type schema (:data:`SCHEMAS`), and the
state dict in ``params.pt`` must have exactly the shapes of the network so
described (built on the meta device, without memory) and finite values.
Every failure is a ``ValueError`` naming the file and the key.
"""

from __future__ import annotations

import inspect

import torch

from sklearn_crb.estimators.net.modules import MLP, ResidualMLP

__all__ = ["NETWORKS", "SCHEMAS", "BOUND_KEYS", "LOG_KEY", "head_kinds", "jsonable", "registry_name",
           "constructor_kwargs", "fail", "is_int", "parse_module_kwargs", "require", "expected_state",
           "check_state_values"]

_JSON_TYPES = (str, int, float, bool, type(None))

#: The only network classes a ``model.json`` may name. Nothing else is
#: imported or called: a model folder from someone else is untrusted input.
NETWORKS = {"MLP": MLP, "ResidualMLP": ResidualMLP}
#: ``module_class`` values written by format version 1 (a dotted path).
_LEGACY_NAMES = {f"{mod}:{cls}": cls for mod in ("sklearn_crb.network", "sklearn_crb.estimators.network")
                 for cls in NETWORKS}
#: JSON type of every constructor argument (checked against the signatures in the tests).
SCHEMAS = {
    "MLP": {"n_features": "size", "n_outputs": "size", "hidden": "widths", "normalization": "str|null",
            "batch_norm": "bool", "activation": "str", "n_conditioning": "count", "standardize": "bool",
            "noise_input": "bool"},
    "ResidualMLP": {"n_features": "size", "n_outputs": "size", "hidden": "widths|null", "skips": "skips",
                    "normalization": "str|null", "batch_norm": "bool", "n_conditioning": "count",
                    "noise_input": "bool"},
}
#: Constructor defaults of the networks as format versions <= 2 saved them (only the non-default
#: arguments were written then): what an older model.json that omits a key means.
_V2_DEFAULTS = {
    "MLP": {"hidden": (256, 256, 128), "normalization": "l2", "batch_norm": True, "activation": "relu"},
    "ResidualMLP": {"hidden": None, "skips": "auto", "normalization": "l2", "batch_norm": True},
}
_KIND_TEXT = {"size": "an integer in [1, 65536]", "count": "an integer in [0, 8]",
              "widths": "a list of integers in [1, 65536]",
              "widths|null": "null or a list of integers in [1, 65536]", "str|null": "a string or null",
              "str": "a string", "bool": "true or false",
              "skips": '"auto", null or a list of [source, target] integer pairs'}
_MAX_WIDTH, _MAX_LAYERS = 65536, 256


def jsonable(v):
    """Whether ``v`` is a JSON scalar or a (nested) list of them."""
    if isinstance(v, _JSON_TYPES):
        return True
    if isinstance(v, (list, tuple)):
        return all(jsonable(x) for x in v)
    return False


def registry_name(module):
    """The :data:`NETWORKS` name of a network class or instance; other classes are refused."""
    cls = module if isinstance(module, type) else type(module)
    for name, known in NETWORKS.items():
        if cls is known:
            return name
    raise ValueError(f"only the package's own networks {sorted(NETWORKS)} can be saved in the portable format, "
                     f"got {cls.__module__}.{cls.__qualname__}; use skorch save_params with your own loading code")


def constructor_kwargs(net):
    """Every constructor argument of the net's module: its defaults, overridden by ``module__*``."""
    cls = net.module if isinstance(net.module, type) else type(net.module_.module)
    kwargs = {k: p.default for k, p in inspect.signature(cls).parameters.items()
              if p.default is not inspect.Parameter.empty and k not in ("n_features", "n_outputs")}
    kwargs.update({k[len("module__"):]: v for k, v in net.get_params(deep=False).items() if k.startswith("module__")})
    if "n_conditioning" in kwargs:  # filled in from the data (the measured columns), like n_features
        kwargs["n_conditioning"] = int(net.module_.module.normalize.n_conditioning)
    if "noise_input" in kwargs:  # set by the regressor's noise_input, like n_conditioning
        kwargs["noise_input"] = bool(getattr(net.module_.module.normalize, "noise_input", False))
    return kwargs


def fail(file, key, what):
    """Raise the ``ValueError`` naming the file and the key."""
    raise ValueError(f"model: {file}: {key!r} {what}")


def is_int(v):
    """An ``int`` that is not a ``bool``."""
    return isinstance(v, int) and not isinstance(v, bool)


def _check_kwarg(file, key, kind, v):
    """One JSON-typed constructor argument of a registered network."""
    width = lambda x: is_int(x) and 1 <= x <= _MAX_WIDTH  # noqa: E731
    ok = {
        "size": lambda: width(v),
        "count": lambda: is_int(v) and 0 <= v <= 8,
        "widths": lambda: isinstance(v, list) and len(v) <= _MAX_LAYERS and all(width(x) for x in v),
        "widths|null": lambda: v is None or (isinstance(v, list) and len(v) <= _MAX_LAYERS
                                             and all(width(x) for x in v)),
        "str|null": lambda: v is None or isinstance(v, str),
        "str": lambda: isinstance(v, str),
        "bool": lambda: isinstance(v, bool),
        "skips": lambda: v is None or v == "auto" or (isinstance(v, list) and all(
            isinstance(pair, list) and len(pair) == 2 and all(is_int(i) for i in pair) for pair in v)),
    }[kind]()
    if not ok:
        fail(file, f"module_kwargs.{key}", f"must be {_KIND_TEXT[kind]}, got {v!r:.80}")
    return tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v


def parse_module_kwargs(file, name, kwargs, version):
    """Validate ``module_kwargs`` against the registered constructor's schema.

    Format versions <= 2 recorded only non-default arguments: the omitted
    ones get the defaults of that time (``_V2_DEFAULTS``).
    """
    if name not in NETWORKS:
        legacy = _LEGACY_NAMES.get(name)
        if legacy is None:
            fail(file, "module_class", f"names {name!r}, which is not one of the package's networks "
                                        f"{sorted(NETWORKS)}; refusing to load it")
        name = legacy
    if not isinstance(kwargs, dict):
        fail(file, "module_kwargs", f"must be a JSON object, got {type(kwargs).__name__}")
    schema = SCHEMAS[name]
    unknown = sorted(set(kwargs) - set(schema))
    if unknown:
        fail(file, "module_kwargs", f"has keys {unknown} that {name} does not take (it takes {sorted(schema)})")
    checked = {k: _check_kwarg(file, k, schema[k], v) for k, v in kwargs.items()}
    if version <= 2:
        checked = {**_V2_DEFAULTS.get(name, {}), **checked}
    if version <= 3 and name == "MLP":  # the input standardisation came with format version 4
        checked.setdefault("standardize", False)
    elif name == "MLP" and "standardize" not in checked:  # format 4 records it; its default is not what old files meant
        fail(file, "module_kwargs.standardize", "is missing (format 4 and later record it: true or false)")
    return name, checked


def require(meta, file, key, types, what):
    """``meta[key]``, which must exist and be of ``types`` (a bool is not an int)."""
    if key not in meta:
        fail(file, key, "is missing")
    v = meta[key]
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(v, types) or (int in types and bool not in types and isinstance(v, bool)):
        fail(file, key, f"must be {what}, got {type(v).__name__}")
    return v


def expected_state(cls, kwargs, n_outputs):
    """Shapes of the state dict of the wrapped network, built without memory (meta device)."""
    with torch.device("meta"):
        inner = cls(**kwargs)
    shapes = {f"module.{k}": tuple(v.shape) for k, v in inner.state_dict().items()}
    shapes.update(mean=(n_outputs,), scale=(n_outputs,))
    return shapes


#: Output-bound buffers of the wrapper (bounded heads): +-inf marks a linear output; absent in older models.
BOUND_KEYS = ("low", "high")
#: Boolean buffer of the wrapper marking the log-space outputs; absent in models saved before it (sigmoid).
LOG_KEY = "log_head"


def check_state_values(state, params):
    """Finite weights and scaling; bounds may be +-inf (linear output) but never NaN, and low < high."""
    for k, v in state.items():
        if not v.is_floating_point():
            continue
        ok = ~torch.isnan(v) if k in BOUND_KEYS else torch.isfinite(v)
        if not bool(torch.all(ok)):
            raise ValueError(f"model: {params} holds non-finite values in {k!r}")
    for key in ("module.normalize.cond_scale", "module.normalize.feat_scale"):  # the standardisations divide by it
        scale = state.get(key)
        if scale is not None and not bool(torch.all(scale > 0)):
            raise ValueError(f"model: {params}: {key!r} must be positive")
    ready = state.get("module.normalize.feat_ready")
    if ready is not None and ready.dtype != torch.bool:
        raise ValueError(f"model: {params}: 'module.normalize.feat_ready' must be a boolean tensor, got {ready.dtype}")
    _check_head_buffers(state, params)


def _check_head_buffers(state, params):
    """The output bounds (low < high) and the log-space flags (boolean, with finite positive bounds)."""
    if all(k in state for k in BOUND_KEYS) and not bool(torch.all(state["low"] < state["high"])):
        raise ValueError(f"model: {params}: the output bounds must satisfy low < high")
    if LOG_KEY not in state:
        return
    log = state[LOG_KEY]
    if log.dtype != torch.bool:
        raise ValueError(f"model: {params}: {LOG_KEY!r} must be a boolean tensor, got {log.dtype}")
    if bool(log.any()):
        if not all(k in state for k in BOUND_KEYS):
            raise ValueError(f"model: {params}: {LOG_KEY!r} marks log-space outputs but there are no bounds")
        lo, hi = state["low"][log], state["high"][log]
        if not bool(torch.all((lo > 0) & torch.isfinite(hi))):
            raise ValueError(f"model: {params}: log-space outputs need finite positive bounds")


def head_kinds(low, high, log):
    """Per-output head kind (``"log"``, ``"sigmoid"`` or ``"linear"``) from the wrapper's buffers."""
    return ["log" if g else "sigmoid" if (abs(lo) < float("inf") and abs(hi) < float("inf")) else "linear"
            for lo, hi, g in zip(low.tolist(), high.tolist(), log.tolist())]
