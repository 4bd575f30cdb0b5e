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
