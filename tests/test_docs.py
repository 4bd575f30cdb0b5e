"""The documentation's generated benchmarks page: fresh against the results files, and the generator itself."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("generate_benchmarks", ROOT / "docs" / "generate_benchmarks.py")
gen = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gen)


def result(**changes):
    """A results file as the benchmark harness writes it."""
    out = {
        "benchmark": "crb_vs_mse", "title": "CRB loss against MSE loss", "quick": False,
        "command": "python benchmarks/bench_crb_vs_mse.py --train-snr 10 300 --seed 7",
        "commit": "0123456789abcdef0123456789abcdef01234567", "dirty": False,
        "machine": {"cpu": "Intel Xeon (2 cores)", "gpu": "none", "torch": "2.13"},
        "date": "2026-12-07T20:00:00+00:00", "wall_s": 432.25,
        "tables": [{"title": "Informative draws, SNR 100", "columns": ["estimator", "m0s nMSE", "bias/√CRB"],
                    "rows": [["CRB net", 0.81234, "+0.08"], ["prior mean", 143, None], ["*MSE* twin_", 23.2, "- 1"]],
                    "notes": "nMSE beside bias | spread and the prior mean."}],
        "data": {"per_draw_errors_xyz": [1, 2, 3]},
    }
    out.update(changes)
    return out


def write(folder, name, obj):
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(json.dumps(obj))


def test_committed_page_is_up_to_date():
    """Fails when a results file (or a benchmark script's summary) changes without the page being regenerated."""
    stale = "docs/benchmarks.rst is stale: run python docs/generate_benchmarks.py"
    assert gen.PAGE.read_text() == gen.generate(), stale


def test_fixture_page_names_command_commit_machine_and_date(tmp_path):
    write(tmp_path, "crb_vs_mse.json", result())
    write(tmp_path, "smoke.json", result(benchmark="aaa_smoke", title="Quick smoke run", quick=True))
    page = gen.generate(tmp_path, tmp_path)
    assert "CRB loss against MSE loss" in page
    assert "python benchmarks/bench_crb_vs_mse.py --train-snr 10 300 --seed 7" in page
    assert "0123456789abcdef0123456789abcdef01234567" in page and "uncommitted" not in page
    assert "cpu: Intel Xeon (2 cores)" in page and "2026-12-07T20:00:00+00:00" in page
    assert "0.8123" in page and "143" in page and "432.2 s" in page
    assert "Quick smoke run" not in page and "No results yet" not in page
    assert "per_draw_errors_xyz" not in page  # the free-form data are not rendered
    write(tmp_path / "dirty", "r.json", result(dirty=True))
    assert "(uncommitted changes)" in gen.generate(tmp_path / "dirty", tmp_path)


def test_fixture_section_is_valid_restructuredtext(tmp_path):
    """Cells with markup characters and list-like starts are escaped: docutils parses the section cleanly."""
    docutils_core = pytest.importorskip("docutils.core")
    text = gen.render_result("crb_vs_mse.json", result())
    tree = docutils_core.publish_doctree(text, settings_overrides={"report_level": 2, "halt_level": 2})
    rendered = tree.astext()
    assert "*MSE* twin_" in rendered and "- 1" in rendered and "bias | spread" in rendered
    assert len(list(tree.findall(lambda n: n.tagname == "table"))) == 1


def test_check_mode_fails_when_a_json_changes(tmp_path):
    results, page = tmp_path / "results", tmp_path / "benchmarks.rst"
    write(results, "crb_vs_mse.json", result())
    assert gen.main(["--results", str(results), "--out", str(page)]) == 0
    assert gen.main(["--results", str(results), "--out", str(page), "--check"]) == 0
    write(results, "crb_vs_mse.json", result(wall_s=500.0))
    assert gen.main(["--results", str(results), "--out", str(page), "--check"]) == 1


def test_no_results_lists_the_commands(tmp_path):
    (tmp_path / "bench_speed.py").write_text('"""Throughput of something."""\n')
    page = gen.generate(tmp_path / "none", tmp_path)
    assert "No results yet" in page
    assert "``python benchmarks/bench_speed.py``: Throughput of something." in page


@pytest.mark.parametrize("change, match", [
    ({"commit": None}, "'commit' must be str"),
    ({"quick": "no"}, "'quick' must be bool"),
    ({"tables": [{"title": "t", "columns": ["a", "b"], "rows": [[1]], "notes": ""}]}, r"rows\[0\] must be a list of 2"),
])
def test_bad_results_file_is_refused_naming_file_and_key(tmp_path, change, match):
    write(tmp_path, "broken.json", result(**change))
    with pytest.raises(ValueError, match="broken.json.*" + match):
        gen.load_results(tmp_path)


def test_missing_key_is_refused(tmp_path):
    bad = result()
    del bad["machine"]
    write(tmp_path, "nomachine.json", bad)
    with pytest.raises(ValueError, match="nomachine.json: missing key 'machine'"):
        gen.load_results(tmp_path)


def _github_slug(heading):
    """The anchor GitHub (and MyST) gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_readme_is_a_short_guide_with_the_two_commands_in_order():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 220
    first = 'pip install -e ".[examples]" && sklearn-crb demo'
    second = 'pip install -e ".[test]" && pytest'
    assert first in text and second in text and text.index(first) < text.index(second)
    assert "10.1002/mrm.29206" in text


def test_readme_links_resolve():
    """Every relative link of the README names a file of the repository, and every anchor a heading in it."""
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    relative = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert relative, "the README links to the documentation"
    for link in relative:
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.exists(), f"README links to a missing file: {link}"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", target.read_text(), flags=re.M)
            assert anchor in {_github_slug(h) for h in headings}, f"README links to a missing heading: {link}"
