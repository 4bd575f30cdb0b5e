"""Tests of the torch modules (sklearn_crb.network)."""

import numpy as np
import pytest
import torch

from sklearn_crb.estimators.network import MLP, InputNormalization, ResidualMLP, paper_hidden

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_paper_architecture_size_and_skips():
    m = ResidualMLP(26, 3)
    n_weights = sum(p.numel() for p in m.parameters())
    # Zhang et al. 2022: about 2.68 M parameters
    assert abs(n_weights - 2.68e6) / 2.68e6 < 0.01
    # 512->512, 256->256, 128->128 and input->26 skips
    widths = (26,) + paper_hidden(26)
    assert len(m.skips) == 4
    for i, j in m.skips:
        assert widths[i + 1] == widths[j + 1]
    assert (-1, 11) in m.skips


def test_residual_skip_is_used():
    torch.manual_seed(0)
    m = ResidualMLP(4, 2, hidden=(4, 8, 4), normalization=None, batch_norm=False).eval()
    x = torch.randn(5, 4)
    assert m.skips == ((0, 2),)  # the most recent equal-width layer that is not the predecessor
    # removing the skip changes the output
    m2 = ResidualMLP(4, 2, hidden=(4, 8, 4), skips=None, normalization=None, batch_norm=False).eval()
    m2.load_state_dict(m.state_dict())
    assert not torch.allclose(m(x), m2(x))
    # hand computation of the skip network
    h0 = torch.relu(m.linears[0](x))
    h1 = torch.relu(m.linears[1](h0))
    z2 = m.linears[2](h1) + h0
    assert torch.allclose(m(x), m.out(torch.relu(z2)), atol=1e-6)


def test_l2_normalization_removes_magnitude():
    norm = InputNormalization("l2")
    x = torch.randn(6, 10, dtype=torch.float64)
    y = norm(x)
    assert torch.allclose(torch.linalg.vector_norm(y, dim=1), torch.ones(6, dtype=torch.float64))
    assert torch.allclose(norm(3.7 * x), y)


def test_first_coefficient_removes_complex_m0():
    rng = np.random.default_rng(0)
    c = rng.standard_normal((5, 4)) + 1j * rng.standard_normal((5, 4))
    M0 = 0.3 * np.exp(1j * 1.1)
    feats = lambda z: torch.as_tensor(np.hstack([z.real, z.imag]))  # noqa: E731
    norm = InputNormalization("first-coefficient")
    a, b = norm(feats(c)), norm(feats(M0 * c))
    assert torch.allclose(a, b)
    ref = c / c[:, :1]
    assert torch.allclose(a, feats(ref))
    # the l2 mode keeps the phase of M0
    l2 = InputNormalization("l2")
    assert not torch.allclose(l2(feats(c)), l2(feats(M0 * c)))


@pytest.mark.parametrize("mode", ["l2", "first-coefficient"])
def test_all_zero_rows_raise(mode):
    x = torch.randn(4, 6)
    x[2] = 0
    with pytest.raises(ValueError, match="mask"):
        InputNormalization(mode)(x)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="normalization"):
        InputNormalization("max")
    with pytest.raises(ValueError, match="even"):
        ResidualMLP(5, 2, normalization="first-coefficient")
    with pytest.raises(ValueError, match="skip"):
        ResidualMLP(4, 2, hidden=(8, 16), skips=[(0, 1)])
    with pytest.raises(ValueError, match="hidden"):
        MLP(4, 2, hidden=(8, 0))


def test_mlp_shapes_and_gradients():
    m = MLP(6, 2, hidden=(8, 8))
    x = torch.randn(7, 6, requires_grad=True)
    y = m(x)
    assert y.shape == (7, 2)
    y.sum().backward()
    assert x.grad is not None and torch.all(torch.isfinite(x.grad))


def test_phase_l2_removes_complex_m0_and_is_bounded():
    rng = np.random.default_rng(1)
    c = rng.standard_normal((6, 5)) + 1j * rng.standard_normal((6, 5))
    feats = lambda z: torch.as_tensor(np.hstack([z.real, z.imag]))  # noqa: E731
    norm = InputNormalization("phase-l2")
    a, b = norm(feats(c)), norm(feats(0.02 * np.exp(-2.3j) * c))
    assert torch.allclose(a, b)
    ref = c * np.conj(c[:, :1]) / (np.abs(c[:, :1]) * np.linalg.norm(c, axis=1, keepdims=True))
    assert torch.allclose(a, feats(ref))
    assert float(a.abs().max()) <= 1.0 + 1e-12
    # the first coefficient becomes real positive
    assert torch.all(a[:, 0] > 0) and torch.allclose(a[:, 5], torch.zeros(6, dtype=torch.float64))


def test_input_standardisation_takes_the_first_training_batch_and_then_holds():
    rng = np.random.default_rng(2)
    c = (rng.standard_normal((64, 5)) + 1j * rng.standard_normal((64, 5))) * np.array([10, 1, 0.3, 0.05, 0.01])
    X = torch.as_tensor(np.hstack([c.real, c.imag]))
    norm = InputNormalization("phase-l2", n_standardized=10).double()
    ref = InputNormalization("phase-l2")(X)
    assert torch.equal(norm.eval()(X), ref)  # before any training batch: the identity
    z = norm.train()(X)
    keep = torch.ones(10, dtype=torch.bool)
    keep[5] = False  # Im of the rotated first coefficient is 0: no spread, scale stays 1, loc 0
    assert torch.allclose(z[:, keep].mean(0), torch.zeros(9, dtype=z.dtype), atol=1e-10)
    assert torch.allclose(z[:, keep].std(0, unbiased=False), torch.ones(9, dtype=z.dtype))
    assert torch.allclose(z[:, 5], torch.zeros(64, dtype=z.dtype)) and float(norm.feat_scale[5]) == 1.0
    assert torch.allclose(norm.feat_scale[keep], ref[:, keep].std(0, unbiased=False))
    loc, scale = norm.feat_loc.clone(), norm.feat_scale.clone()
    norm(3.0 * X[:7] + 1.0)  # a later training batch does not move them
    assert torch.equal(norm.feat_loc, loc) and torch.equal(norm.feat_scale, scale)
    assert torch.allclose(norm.eval()(X[:5]), z[:5])
    with pytest.raises(ValueError, match="coefficient features"):
        norm(X[:, :8])
    with pytest.raises(ValueError, match="n_standardized"):
        InputNormalization("phase-l2", n_standardized=-1)


def test_mlp_standardize_flag_sizes_the_buffers_and_skips_measured_columns():
    assert MLP(12, 2).normalize.n_standardized == 12  # on by default
    m = MLP(12, 2, hidden=(8,), n_conditioning=2)
    assert m.normalize.n_standardized == 10 and m.normalize.feat_loc.shape == (10,)
    m(torch.randn(16, 12))  # training mode: the first batch sets them; the measured columns are not standardised
    assert bool(m.normalize.feat_ready)
    off = MLP(12, 2, hidden=(8,), standardize=False)
    assert not any("feat_" in k for k in off.state_dict())


def test_modules_pickled_before_the_standardisation_still_run():
    """A pickle of an older release has no ``n_standardized``/``standardize`` attributes: the class defaults
    (off) apply, and the output is the plain normalisation's."""
    import pickle

    m = MLP(6, 2, hidden=(4,), standardize=False)  # as an older release built it
    x = torch.randn(5, 6)
    want = m(x)
    del m.normalize.__dict__["n_standardized"], m.__dict__["standardize"]
    old = pickle.loads(pickle.dumps(m))
    assert old.normalize.n_standardized == 0 and old.standardize is False
    assert torch.equal(old(x), want)


def test_private_generator_init_is_reproducible_and_ignores_the_global_rng():
    from sklearn_crb.estimators.network import reset_parameters_with

    m1, m2 = MLP(6, 2, hidden=(8, 8)), MLP(6, 2, hidden=(8, 8))
    assert reset_parameters_with(m1, torch.Generator().manual_seed(3))
    torch.randn(100)  # a global draw in between changes nothing
    reset_parameters_with(m2, torch.Generator().manual_seed(3))
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    w = m1.body[0].weight
    bound = 1 / np.sqrt(6)  # PyTorch's default Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.5 * bound


# ---------------------------------------------------------------- bounded output heads
from sklearn_crb.estimators.net.modules import TargetStandardizedModule  # noqa: E402
from sklearn_crb.estimators.net.targets import output_bounds  # noqa: E402
from sklearn_crb.physics.priors import resolve_prior  # noqa: E402

TIED7 = ("m0s", "R1f", "R2f", "Rex", "T2s", "omega0", "B1")


def _head_module(names, head="auto", prior=None):
    lo, hi, log = output_bounds(names, head, prior)
    m = TargetStandardizedModule(torch.nn.Identity(), len(names))
    m.low.copy_(torch.as_tensor(lo))
    m.high.copy_(torch.as_tensor(hi))
    m.log_head.copy_(torch.as_tensor(log))
    rng = np.random.default_rng(0)
    m.mean.copy_(torch.as_tensor(np.where(np.isfinite(lo + hi), (lo + hi) / 2, 0.0) * rng.uniform(0.5, 1, len(lo))))
    m.scale.copy_(torch.as_tensor(np.where(np.isfinite(hi - lo), (hi - lo) / 4, 1.0)))
    return m, lo, hi, log


def test_auto_head_is_log_for_relaxation_targets_only():
    _, lo, hi, log = _head_module(TIED7)
    assert log.tolist() == [False, True, True, False, False, False, False]
    _, _, _, log_t = _head_module(("m0s", "T1f", "T2f", "T1s", "B1"))
    assert log_t.tolist() == [False, True, True, True, False]
    assert not output_bounds(TIED7, "sigmoid")[2].any() and not np.isfinite(output_bounds(TIED7, "linear")[0]).any()
    with pytest.raises(ValueError, match="head"):
        output_bounds(TIED7, "log-ish")


def test_log_head_mapping_stays_in_support_with_finite_gradients():
    prior = resolve_prior("brain", tied_R1=True)
    m, lo, hi, log = _head_module(TIED7, prior=prior)
    assert lo[0] == 0.0  # the m0s sigmoid keeps its margin, floored at the physical bound
    np.testing.assert_array_equal([lo[1], lo[2], hi[1], hi[2]], [0.2, 0.5, 1.6, 40.0])  # the prior support
    z = torch.linspace(-40, 40, 81)[:, None].repeat(1, 7).requires_grad_(True)
    out = m(z)
    out.sum().backward()
    assert torch.isfinite(z.grad).all()  # omega0 among the outputs: exp only of the log entries
    theta = m.to_physical(out.detach()).numpy()
    tol = 1e-5 * np.maximum(np.abs(lo), np.abs(hi))
    assert np.all(theta >= lo - tol) and np.all(theta <= hi + tol)
    # the research's mapping: theta = exp(log lo + (log hi - log lo) sigmoid(z)) for the log entries,
    # lo + (hi - lo) sigmoid(z) for the others, returned in standardised units
    zz = torch.tensor([[-2.0, 0.0, 1.5, -0.3, 0.7, 3.0, -1.0]])
    sig = 1 / (1 + np.exp(-zz.numpy()[0].astype(np.float64)))
    log_lo, log_span = np.log(np.where(log, lo, 1)), np.log(np.where(log, hi, 1) / np.where(log, lo, 1))
    expect = np.where(log, np.exp(log_lo + log_span * sig), lo + (hi - lo) * sig)
    np.testing.assert_allclose(m.to_physical(m(zz)).detach().numpy()[0], expect, rtol=2e-6)
    np.testing.assert_allclose(np.exp(np.log(lo[1:3]) + np.log(hi[1:3] / lo[1:3]) * 0.5), np.sqrt(lo[1:3] * hi[1:3]))


def test_log_head_gradient_is_finite_for_large_omega0_and_r2f():
    m, *_ = _head_module(("R2f", "omega0"))
    z = torch.tensor([[80.0, 60.0], [-80.0, -60.0], [0.1, 5.0]], requires_grad=True)
    loss = (m(z) ** 2).sum()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    assert float(z.grad[2].abs().min()) > 0  # not a dead head in the interior
