"""The demo: the shipped networks by default, its honest tables, and what its output must not confuse."""

import io
import json
import warnings

import numpy as np
import pytest

from sklearn_crb.cli._main import _warning_line, build_parser
from sklearn_crb.demo import _medians, _tissue_table, run_demo
from sklearn_crb.phantom import LABELS, make_phantom
from sklearn_crb.physics.parameters import INDEX
from sklearn_crb.physics.sequence import Sequence
from sklearn_crb.pretrained import PRETRAINED, pretrained_provenance
from sklearn_crb.viz import _tissue_range


def _run(tmp_path, quick):
    stream = io.StringIO()
    summary = run_demo(tmp_path / "demo", quick=quick, progress=False, stream=stream)
    return summary, stream.getvalue()


def _check(summary, text, out):
    for label in ("CRB net", "MSE net", "NLLS", "prior mean", "Per-tissue medians"):
        assert label in text
    assert summary["pretrained"] and summary["networks"]["crb"]["name"] == "demo-crb"
    prov = pretrained_provenance("demo-crb")
    assert summary["sizes"]["n_train"] == prov["training_set"]["n_samples"]
    assert summary["sizes"]["epochs"] == prov["recipe"]["epochs"]
    assert {r["name"] for r in summary["results"]} == {"CRB net", "MSE net", "NLLS"}
    for r in summary["results"]:
        assert r["n_voxels"] > 0 and all(np.isfinite(r["nmse"]))
    assert {"WM", "GM", "CSF"} <= set(summary["tissue_medians"]["CRB net"])
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["tissue_table"] == summary["tissue_table"]
    assert (out / "crb_model" / "model.json").read_bytes() == (PRETRAINED / "demo-crb" / "model.json").read_bytes()


def test_the_quick_demo_uses_the_shipped_networks_and_prints_the_tables(tmp_path):
    summary, text = _run(tmp_path, quick=True)
    _check(summary, text, tmp_path / "demo")
    assert "training" not in text.split("[4/6]")[0]  # nothing trained


@pytest.mark.slow
def test_the_full_demo_uses_the_shipped_networks(tmp_path):
    summary, text = _run(tmp_path, quick=False)
    _check(summary, text, tmp_path / "demo")
    assert summary["sizes"]["n_nlls"] == 60


def test_the_cli_demo_trains_only_with_train():
    p = build_parser()
    assert not p.parse_args(["demo"]).train and p.parse_args(["demo", "--train"]).train


def _phantom():
    return make_phantom((24, 24), Sequence.default(120), n_components=6, snr=100.0, tied_R1=True, random_state=0)


def test_a_median_at_the_nlls_fit_box_is_printed_as_a_bound():
    ph = _phantom()
    m = {"m0s": ph.theta[..., INDEX["m0s"]].copy(), "R1f": ph.theta[..., INDEX["R1f"]].copy()}
    m["R1f"][ph.tissue_mask("CSF")] = 1e-3  # NLLS stopped at its lower R1f bound: T1 >= 1000 s
    med = {"NLLS": _medians(ph, m, ph.mask, bounds={"R1f": (1e-3, 10.0), "m0s": (0.0, 1.0)})}
    assert med["NLLS"]["CSF"]["T1_bound"] == "upper" and med["NLLS"]["WM"]["T1_bound"] is None
    table = _tissue_table(med)
    assert "≥ 1000 (bound)" in table
    assert table.count("(bound)") == 1


def test_the_colour_scales_show_the_wm_gm_contrast_not_csf():
    ph = _phantom()
    csf_t2 = 1e3 / np.median(ph.theta[..., INDEX["R2f"]][ph.labels == LABELS["CSF"]])
    tissue_t2 = 1e3 / ph.theta[..., INDEX["R2f"]][np.isin(ph.labels, [LABELS["WM"], LABELS["GM"]])]
    lo, hi = _tissue_range(ph, "R2f")
    assert hi < csf_t2 and lo <= tissue_t2.min() and hi >= tissue_t2.max()


def test_demo_figures_leave_unfitted_voxels_blank(tmp_path, monkeypatch):
    from matplotlib.image import AxesImage

    from sklearn_crb import viz

    ph = _phantom()
    names = ("m0s", "R1f", "R2f")
    sub = np.zeros(ph.labels.shape, dtype=bool)
    sub[10:12, 10:12] = True
    maps = {p: np.where(sub, ph.theta[..., INDEX[p]], 0.0) for p in names}  # zeros outside, as fit_maps writes
    maps.update({p + "_se": np.where(sub, 0.01, 0.0) for p in names}, mask=sub)
    shown = []
    monkeypatch.setattr(AxesImage, "set_data", lambda self, A, _orig=AxesImage.set_data: (shown.append(
        np.ma.getdata(A).copy()), _orig(self, A))[1])
    row = {"name": "NLLS", "bias_by_tissue": [[0, 0, 0], [0, 0, 0]], "std_by_tissue": [[1, 1, 1], [1, 1, 1]]}
    viz.demo_figures(tmp_path, ph, [row], names, {"NLLS": maps})
    nlls_m0s = shown[1]  # maps.png, column m0s: truth, then NLLS
    assert np.all(np.isnan(nlls_m0s[~sub])) and np.all(np.isfinite(nlls_m0s[sub]))
    assert (tmp_path / "maps.png").exists()


def test_cli_warnings_are_one_line_in_the_users_terms(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _warning_line("demo")
        warnings.warn("3 of 60 voxels did not converge;\n  see predict_details", UserWarning)
    err = capsys.readouterr().err
    assert err == "sklearn-crb demo: warning: 3 of 60 voxels did not converge; see predict_details\n"
