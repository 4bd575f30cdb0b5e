"""Sequence: validation, MATLAB v5 / v7.3 readers, the built-in default."""

import numpy as np
import pytest
from scipy.io import savemat

from sklearn_crb import Sequence


def test_v32_file_facts(v32_sequence):
    seq = v32_sequence
    assert seq.n_pulses == 1142
    assert seq.TR == pytest.approx(3.5e-3)
    assert seq.alpha[0] == pytest.approx(np.pi)
    assert seq.TRF[0] == pytest.approx(500e-6)
    assert seq.grad_moment[0] == "crusher" and set(seq.grad_moment[1:]) == {"balanced"}
    # facts of the published v3.2 sequence (Assländer et al., MRM 2022)
    assert seq.alpha[1:].min() == pytest.approx(0.040168, abs=1e-6)
    assert seq.TRF[1:].min() == pytest.approx(217.4e-6, rel=1e-3)
    assert np.sum(seq.omega1**2 * seq.TRF) / (seq.n_pulses * seq.TR) == pytest.approx(2.85e5, rel=1e-2)


def test_mat_v5_roundtrip(tmp_path):
    alpha = np.linspace(0.1, 1.0, 20)
    TRF = np.full(20, 300e-6)
    p = tmp_path / "seq.mat"
    savemat(p, {"alpha": alpha[:, None], "TRF": TRF[None, :]})
    seq = Sequence.from_mat(p, TR=4e-3)
    np.testing.assert_array_equal(seq.alpha, alpha)
    np.testing.assert_array_equal(seq.TRF, TRF)
    assert seq.TR == 4e-3 and seq.grad_moment[0] == "crusher"


@pytest.mark.parametrize(
    "content, match",
    [
        (b"this is not a mat file at all" * 10, "not a readable MATLAB"),
        (b"\x89HDF\r\n\x1a\n" + b"\x00" * 64, "not a readable MATLAB v7.3"),
    ],
)
def test_malformed_mat(tmp_path, content, match):
    p = tmp_path / "bad.mat"
    p.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        Sequence.from_mat(p)


def test_mat_missing_variable(tmp_path):
    p = tmp_path / "novar.mat"
    savemat(p, {"alpha": np.ones(3)})
    with pytest.raises(ValueError, match="TRF"):
        Sequence.from_mat(p)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        Sequence.from_mat(tmp_path / "nope.mat")


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(alpha=[0.1, 0.2], TRF=[1e-4], TR=1e-3), ValueError, "equal lengths"),
        (dict(alpha=[0.1, np.nan], TRF=[1e-4, 1e-4], TR=1e-3), ValueError, "alpha.*finite"),
        (dict(alpha=[0.1, 0.2], TRF=[1e-4, 2e-3], TR=1e-3), ValueError, r"TRF must lie in \(0, TR"),
        (dict(alpha=[0.1, 0.2], TRF=[0.0, 1e-4], TR=1e-3), ValueError, "TRF"),
        (dict(alpha=[0.1, 0.2], TRF=[1e-4, 1e-4], TR=-1.0), ValueError, "TR must be"),
        (dict(alpha=[0.1, 0.2], TRF=[1e-4, 1e-4], TR=1e-3, grad_moment=["x", "balanced"]), ValueError, "grad_moment"),
        (dict(alpha=[0.1, 0.2], TRF=[1e-4, 1e-4], TR=1e-3, grad_moment=["balanced"]), ValueError,
         "one entry per pulse"),
        (dict(alpha="abc", TRF=[1e-4], TR=1e-3), TypeError, "alpha"),
        (dict(alpha=[], TRF=[], TR=1e-3), ValueError, "non-empty"),
    ],
)
def test_sequence_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Sequence(**kwargs)


def test_default_sequence():
    seq = Sequence.default()
    assert seq.n_pulses == 1142 and seq.TR == 3.5e-3
    assert seq.alpha[0] == pytest.approx(np.pi) and seq.grad_moment[0] == "crusher"
    assert np.all(seq.TRF[1:] >= 220e-6) and np.all(seq.TRF <= 500e-6)
    assert np.all(seq.alpha[1:] > 0) and seq.alpha[1:].max() < 2.5
    # deterministic, hashable, JSON round trip
    assert Sequence.default() == seq
    assert Sequence.from_dict(seq.to_dict()) == seq
    assert Sequence.default(n_pulses=200).n_pulses == 200
