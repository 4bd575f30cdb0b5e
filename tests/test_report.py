"""``report.html``: parsed with the standard library's html.parser; written with the maps, all or nothing."""

import base64
import io
import json
import re
from html.parser import HTMLParser

import nibabel as nib
import numpy as np
import pytest
from conftest import small_cli_model

from sklearn_crb.cli import main
from sklearn_crb.maps import FLAGS, Maps
from sklearn_crb.report import render_report


class _Report(HTMLParser):
    """Sections, images, the text of elements with an id, and the rows of each table."""

    def __init__(self, text):
        super().__init__()
        self.sections, self.images, self.text, self.tables = [], [], {}, {}
        self.links = []
        self._ids, self._table, self._row = [], None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs.get("id"))
        if tag == "img":
            self.images.append((attrs.get("alt"), attrs.get("src")))
        if tag in ("link", "script") or "href" in attrs:
            self.links.append((tag, attrs))
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id"), [])
        if tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        self._ids.append(attrs.get("id"))
        if attrs.get("id"):
            self.text[attrs["id"]] = ""

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        if self._ids:
            self._ids.pop()

    def handle_data(self, data):
        for i in self._ids:
            if i:
                self.text[i] += data
        if self._row is not None and self._ids and self.lasttag in ("td", "th"):
            self._row.append(data)


def _png(src):
    from matplotlib.image import imread

    assert src.startswith("data:image/png;base64,")
    raw = base64.b64decode(src.split(",", 1)[1], validate=True)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(io.BytesIO(raw), format="png")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A small network and a phantom image, fitted with --check 6."""

    d = tmp_path_factory.mktemp("report")
    ph, c = small_cli_model(d)  # (x, y, z=1, r)
    nib.save(nib.Nifti1Image(np.concatenate([c.real, c.imag], -1).astype(np.float32), np.eye(4)),
             d / "coef.nii.gz")
    base = ["fit", "--model", str(d / "model"), "--coefficients", str(d / "coef.nii.gz"), "--quiet"]
    assert main([*base, "--out", str(d / "fit"), "--check", "6"]) == 0
    return d, base


def test_report_sections_images_sigma_flags_and_check(fitted):
    d, _ = fitted
    out = d / "fit"
    text = (out / "report.html").read_text()
    rep = _Report(text)
    assert rep.sections == ["summary", "sigma", "maps", "histograms", "flags", "trust", "check"]
    # self-contained: no external CSS, script or link, every image an embedded PNG that decodes
    assert not rep.links and "http://" not in text and "https://" not in text
    summary = json.loads((out / "summary.json").read_text())
    estimate = [k for k in summary["units"] if not k.endswith("_se") and f"{k}_se" in summary["units"]]
    alts = [a for a, _ in rep.images]
    maps = [a for a in alts if a.startswith("map ") and not a.startswith("map trust_")]
    assert maps == [f"map {p}" for p in estimate]
    assert {"map trust_chi2", "map trust_step"} <= set(alts)  # fit --model writes the trust maps by default
    assert [a for a in alts if a.startswith("histogram ")] == [f"histogram {p}" for p in estimate]
    assert "check scatter" in alts
    for _, src in rep.images:
        assert _png(src).ndim == 3
    # sigma and how it was obtained
    sigma = float(re.search(r"sigma = ([0-9.eE+-]+)", rep.text["sigma-line"]).group(1))
    assert sigma == pytest.approx(summary["sigma"], rel=1e-5)
    assert summary["sigma_method"] in rep.text["sigma-line"]
    # the flag table against the flag and mask maps
    flags = nib.load(out / "flags.nii.gz").get_fdata().astype(int)
    mask = nib.load(out / "mask.nii.gz").get_fdata() > 0
    rows = {r[0]: int(r[2]) for r in rep.tables["flag-table"][1:]}
    assert rows.pop("fitted without problems") == int(np.sum(mask & (flags == 0)))
    assert rows == {name: int(np.sum((flags & bit) != 0)) for name, bit in FLAGS.items()}
    # the --check table: one row per estimated parameter, at most 6 voxels each, medians as numbers
    check = rep.tables["check-table"]
    assert check[0][0] == "parameter" and [r[0] for r in check[1:]] == estimate
    for r in check[1:]:
        assert 0 < int(r[2]) <= 6
        assert all(v == "n/a" or np.isfinite(float(v)) for v in r[3:])
    assert "report.html" in summary["files"]


def _dark_pixels(maps):
    """Pixels of the first map panel drawn in viridis' lowest colour (how a zero or a clipped low value looks)."""
    rep = _Report(render_report(maps))
    rgba = _png(dict(rep.images)["map m0s"])
    low = np.array([0.267, 0.005, 0.329])  # viridis(0)
    return int(np.sum((np.abs(rgba[..., :3] - low).max(-1) < 0.04) & (rgba[..., 3] > 0.5)))


def test_unfitted_voxels_are_blank_and_the_colour_scale_is_robust():
    rng = np.random.default_rng(0)
    shape = (40, 40)
    mask = np.zeros(shape, bool)
    mask[10:30, 10:30] = True
    m0s = np.where(mask, rng.uniform(0.1, 0.2, shape), 0.0)  # outside the mask 0, as fit_maps writes it
    m0s[12:22, 12:22] = np.nan  # 100 voxels of the mask that could not be fitted
    m0s[20, 20] = 50.0  # one outlier (a CSF-like voxel) must not stretch the scale
    arrays = {"flags": np.zeros(shape, np.int16), "mask": mask}
    kw = dict(units={"m0s": "1"}, sigma=0.01, sigma_method="given", estimate=("m0s",))
    dark = _dark_pixels(Maps(arrays={"m0s": m0s, **arrays}, **kw))
    # drawn as zeros, the 100 unfitted voxels would add about 700 dark pixels, and a min-max scale would darken
    # all 300 fitted voxels (about 2000); a robust scale darkens about 2 % of them (plus the colour bar's dark end)
    zeros = _dark_pixels(Maps(arrays={"m0s": np.nan_to_num(m0s), **arrays}, **kw))
    assert dark < 1000 and zeros > dark + 500, (dark, zeros)


def test_report_is_written_with_the_maps_or_not_at_all(fitted, monkeypatch, capsys):
    d, base = fitted
    import sklearn_crb.cli.fit as cli_fit

    def broken(*a, **k):
        raise RuntimeError("report failed")

    monkeypatch.setattr(cli_fit, "render_report", broken)
    assert main([*base, "--out", str(d / "failed")]) == 2
    assert "report failed" in capsys.readouterr().err
    assert not (d / "failed").exists()  # neither the report nor any map
    monkeypatch.undo()
    # a bad input: refused before any work, no report
    assert main([*base, "--out", str(d / "bad"), "--mask", str(d / "model" / "basis.npy")]) == 2
    assert not (d / "bad").exists()
    # --check needs a network to start NLLS from
    assert main(["fit", "--nlls", "--n-pulses", "120", "--basis", str(d / "model" / "basis.npy"), "--coefficients",
                 str(d / "coef.nii.gz"), "--quiet", "--out", str(d / "nlls_check"), "--check", "3"]) == 2
    assert "--check" in capsys.readouterr().err and not (d / "nlls_check").exists()
    # a report.html sklearn-crb did not write is never replaced, and then nothing is written
    own = d / "foreign"
    own.mkdir()
    (own / "report.html").write_text("mine")
    assert main([*base, "--out", str(own), "--overwrite"]) == 2
    assert "report.html" in capsys.readouterr().err
    assert sorted(p.name for p in own.iterdir()) == ["report.html"] and (own / "report.html").read_text() == "mine"
    # its own report is replaced with --overwrite, refused without
    before = (d / "fit" / "report.html").read_text()
    assert main([*base, "--out", str(d / "fit")]) == 2
    assert (d / "fit" / "report.html").read_text() == before
    assert main([*base, "--out", str(d / "fit"), "--overwrite", "--sigma", "0.05"]) == 0
    after = _Report((d / "fit" / "report.html").read_text())
    assert "sigma = 0.05 (given" in after.text["sigma-line"] and "check" not in after.sections
