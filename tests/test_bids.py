"""``sklearn-crb fit --bids``: BIDS derivative names and sidecars, read back with pybids (an external tool)."""

import fnmatch
import json
import os

import nibabel as nib
import numpy as np
import pytest
from conftest import small_cli_model

from sklearn_crb.cli import main


def _pybids():
    if os.environ.get("CI", "").lower() == "true":
        import bids  # under CI the check must run, not skip
        return bids
    return pytest.importorskip("bids")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A small network, a BIDS raw dataset holding a BIDS-named coefficient image, and its --bids fit."""

    d = tmp_path_factory.mktemp("bids")
    ph, c = small_cli_model(d)  # (x, y, z=1, r)
    raw = d / "raw"
    (raw / "sub-01" / "ses-a" / "anat").mkdir(parents=True)
    (raw / "dataset_description.json").write_text(json.dumps({"Name": "raw", "BIDSVersion": "1.10.0"}))
    coef = raw / "sub-01" / "ses-a" / "anat" / "sub-01_ses-a_coef.nii.gz"
    nib.save(nib.Nifti1Image(np.concatenate([c.real, c.imag], -1).astype(np.float32), np.eye(4)), coef)
    out = d / "derivatives" / "sklearn-crb"
    base = ["fit", "--model", str(d / "model"), "--coefficients", str(coef), "--times", "--sigma", "0.02", "--quiet"]
    assert main([*base, "--out", str(out), "--bids"]) == 0
    assert main([*base, "--out", str(d / "plain")]) == 0  # the same fit without --bids, to compare values
    return d, out, coef


EXPECTED = {  # (desc, suffix) of the maps BIDS has a suffix for, and desc labels of those it has none for
    "R1f": (None, "R1map"), "R2f": (None, "R2map"), "T1f": (None, "T1map"), "T2f": (None, "T2map"),
    "m0s": ("m0s", "map"), "Rex": ("Rex", "map"), "R1s": ("R1s", "R1map"), "T2s": ("T2s", "T2map"),
    "R1f_se": ("R1fSE", "R1map"), "m0s_se": ("m0sSE", "map"), "mask": ("fit", "mask"),
}


def test_pybids_reads_the_maps_and_their_sidecars(fitted):
    bids = _pybids()
    d, out, coef = fitted
    layout = bids.BIDSLayout(out, validate=False, is_derivative=True)
    assert layout.get_subjects() == ["01"] and layout.get_sessions() == ["a"]
    desc = layout.get_dataset_description()
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "sklearn-crb"
    assert desc["BIDSVersion"] and desc["GeneratedBy"][0]["Version"]
    plain_summary = json.loads((d / "plain" / "summary.json").read_text())
    model_meta = json.loads((d / "model" / "model.json").read_text())  # the saved network's own record
    for name, (label, suffix) in EXPECTED.items():
        files = layout.get(subject="01", session="a", datatype="anat", suffix=suffix, extension=".nii.gz",
                           desc=label if label else bids.layout.Query.NONE)
        assert len(files) == 1, (name, [f.filename for f in files])
        meta = files[0].get_metadata()  # the sidecar, found and read by pybids
        assert meta["Units"] == ({"T2f": "s", "mask": "n/a"}.get(name) or plain_summary["units"][name])
        assert meta["EstimationReference"].endswith("10.1002/mrm.29206")
        assert "network" in meta["EstimationAlgorithm"]
        assert meta["Sources"] == ["bids:raw:sub-01/ses-a/anat/sub-01_ses-a_coef.nii.gz"]
        assert meta["NoiseSigma"] == 0.02 and meta["NoiseSigmaMethod"] == "given"
        assert meta["SoftwareVersion"] == plain_summary["sklearn_crb_version"]
        assert meta["SequenceSHA256"] == model_meta["sequence_sha256"]
        assert meta["BasisSHA256"] == model_meta["basis_sha256"]
        # the BIDS map holds the plain fit's values (T2f: BIDS times in s, the plain map in ms)
        value = np.asarray(files[0].get_image().dataobj, dtype=float)
        plain = nib.load(d / "plain" / f"{name}.nii.gz").get_fdata()
        np.testing.assert_allclose(value, plain * (1e-3 if name == "T2f" else 1.0), rtol=1e-6, equal_nan=True)
    # the BIDS URI resolves through DatasetLinks to the input
    assert (out / desc["DatasetLinks"]["raw"] / "sub-01/ses-a/anat/sub-01_ses-a_coef.nii.gz").resolve() == \
        coef.resolve()


def test_bids_validator_accepts_the_names_bids_defines(fitted):
    """The bids-validator package checks raw-dataset names: the suffixed maps and the description pass it
    (names with desc- are derivative-only and outside its rules)."""
    pytest.importorskip("bids_validator") if os.environ.get("CI", "").lower() != "true" else None
    from bids_validator import BIDSValidator

    _, out, _ = fitted
    ignored = (out / ".bidsignore").read_text().split()
    files = [p for p in out.rglob("*") if p.is_file() and p.name != ".bidsignore"]
    extra = [p.name for p in files if any(fnmatch.fnmatch(p.name, pat) for pat in ignored)]
    assert sorted(extra) == ["sub-01_ses-a_overview.png", "sub-01_ses-a_report.html", "sub-01_ses-a_summary.json"]
    names = ["/" + p.relative_to(out).as_posix() for p in files if "desc-" not in p.name and p.name not in extra]
    assert len(names) == 1 + 2 * 5  # the description; R1map R2map T1map T2map M0map, each .nii.gz and .json
    assert all(BIDSValidator().is_bids(n) for n in names), [n for n in names if not BIDSValidator().is_bids(n)]


def test_subject_from_option_second_subject_and_refusals(fitted, capsys):
    d, out, coef = fitted
    before = (out / "dataset_description.json").read_text()
    plain_name = d / "coef_plain.nii.gz"
    plain_name.write_bytes(coef.read_bytes())
    base = ["fit", "--model", str(d / "model"), "--sigma", "0.02", "--quiet", "--out", str(out), "--bids"]
    # no sub- in the file name and no --bids-subject: refused before any work, nothing written
    assert main([*base, "--coefficients", str(plain_name)]) == 2
    assert "--bids-subject" in capsys.readouterr().err
    assert main([*base, "--coefficients", str(plain_name), "--bids-subject", "0-2"]) == 2
    assert "--bids-subject" in capsys.readouterr().err
    assert main([*base, "--coefficients", str(plain_name), "--bids-subject", "02"]) == 0
    assert (out / "sub-02" / "anat" / "sub-02_R1map.nii.gz").exists()
    assert (out / "sub-02" / "anat" / "sub-02_R1map.json").exists()
    assert (out / "sub-02" / "anat" / "sub-02_report.html").exists()
    assert (out / "dataset_description.json").read_text() == before  # the shared description is kept
    # the same subject again: refused without --overwrite, replaced with it
    assert main([*base, "--coefficients", str(plain_name), "--bids-subject", "02"]) == 2
    assert main([*base, "--coefficients", str(plain_name), "--bids-subject", "02", "--overwrite"]) == 0
    # a fit that fails while writing leaves neither maps nor a report nor new folders
    import sklearn_crb.cli.fit as cli_fit

    def broken(*a, **k):
        raise RuntimeError("report failed")

    snapshot = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli_fit, "render_report", broken)
        assert main([*base, "--coefficients", str(plain_name), "--bids-subject", "03"]) == 2
        new = d / "new_derivative"
        assert main([*base[:-3], "--out", str(new), "--bids", "--coefficients", str(coef)]) == 2
    assert "report failed" in capsys.readouterr().err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == snapshot and not new.exists()
    # a derivative folder another tool described is refused, and nothing is written into it
    foreign = d / "foreign"
    foreign.mkdir()
    (foreign / "dataset_description.json").write_text(json.dumps({"Name": "x", "BIDSVersion": "1.10.0",
                                                                   "DatasetType": "derivative",
                                                                   "GeneratedBy": [{"Name": "fmriprep"}]}))
    assert main(["fit", "--model", str(d / "model"), "--coefficients", str(coef), "--quiet", "--bids",
                 "--out", str(foreign)]) == 2
    assert "dataset_description.json" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["dataset_description.json"]


def test_nlls_fit_sidecars_name_nlls(fitted):
    bids = _pybids()
    d, out, coef = fitted
    assert main(["fit", "--nlls", "--tied-R1", "--n-pulses", "120", "--basis", str(d / "model" / "basis.npy"),
                 "--coefficients", str(coef), "--bids-subject", "04", "--bids", "--out", str(d / "nlls"),
                 "--quiet"]) == 0
    layout = bids.BIDSLayout(d / "nlls", validate=False, is_derivative=True)
    files = layout.get(subject="04", session="a", suffix="R1map", extension=".nii.gz", desc=bids.layout.Query.NONE)
    meta = files[0].get_metadata()
    assert meta["EstimationAlgorithm"].startswith("NLLS") and meta["StandardError"] == "crb"
    assert meta["NoiseSigmaMethod"] == "residuals"
    assert not layout.get(subject="04", desc="Rex")  # NLLS estimated m0s, R1f, R2f only
