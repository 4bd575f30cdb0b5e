"""Every benchmark script runs with ``--quick`` and writes one results file in the harness's schema.

Each script runs in a subprocess, as a user runs it (``python benchmarks/bench_x.py --quick --out DIR``); its
JSON is checked here against the schema documented in ``benchmarks/_harness.py``, independently of the
harness's own check. Scripts whose quick run takes more than about 10 s on one loaded core are marked slow
(run in CI), so that the plain suite keeps the fast ones.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCH.glob("bench_*.py"))
#: quick runs measured at about 10 s or less on one core of the shared 2-core machine (imports included)
FAST = {"bench_basis.py", "bench_posterior_mean.py", "bench_training_throughput.py", "bench_simulator.py"}

sys.path.insert(0, str(BENCH))  # the harness is a module of the benchmarks folder, not of the package
import _harness  # noqa: E402


def _params():
    return [pytest.param(s, marks=() if s in FAST else pytest.mark.slow, id=s[len("bench_"):-len(".py")])
            for s in SCRIPTS]


def _is_cell(v):
    return isinstance(v, str) or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))


def check_schema(doc, benchmark):
    """The documented results schema, field by field."""
    assert set(doc) == {"benchmark", "title", "command", "commit", "dirty", "machine", "date", "wall_s", "quick",
                        "tables", "data"}
    assert doc["benchmark"] == benchmark
    assert isinstance(doc["title"], str) and doc["title"]
    assert doc["command"].startswith(f"python benchmarks/bench_{benchmark}.py") and "--quick" in doc["command"]
    assert isinstance(doc["commit"], str) and doc["commit"]
    assert isinstance(doc["dirty"], bool)
    assert isinstance(doc["machine"], dict) and {"cpu", "cpu_count", "versions", "cuda"} <= set(doc["machine"])
    assert "T" in doc["date"] and doc["date"][:4].isdigit()
    assert isinstance(doc["wall_s"], float) and doc["wall_s"] > 0
    assert doc["quick"] is True
    assert isinstance(doc["data"], dict) and doc["data"]
    assert isinstance(doc["tables"], list) and doc["tables"]
    for t in doc["tables"]:
        assert set(t) == {"title", "columns", "rows", "notes"}
        assert isinstance(t["title"], str) and isinstance(t["notes"], str)
        assert t["columns"] and all(isinstance(c, str) for c in t["columns"])
        assert t["rows"], f"table {t['title']!r} has no rows"
        for r in t["rows"]:
            assert len(r) == len(t["columns"]) and all(_is_cell(v) for v in r), (t["title"], r)


def test_every_script_is_listed():
    assert len(SCRIPTS) >= 15
    assert not (BENCH / "_results.py").exists()


@pytest.mark.parametrize("script", _params())
def test_quick_run_writes_its_results(script, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    out = tmp_path / "results"
    # one thread: the quick runs measure nothing, and on a loaded machine more threads only oversubscribe it
    cmd = [sys.executable, str(BENCH / script), "--quick", "--threads", "1", "--out", str(out)]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    benchmark = script[len("bench_"):-len(".py")]
    files = sorted(p.name for p in out.glob("*.json"))
    assert files == [f"{benchmark}-quick.json"]  # a quick run never replaces a real result
    check_schema(json.loads((out / files[0]).read_text()), benchmark)


# ------------------------------------------------------------ the harness itself
def test_out_must_be_a_folder(tmp_path, capsys):
    f = tmp_path / "file.json"
    f.write_text("{}")
    with pytest.raises(SystemExit):
        _harness.parser(__doc__).parse_args(["--out", str(f)])
    assert "--out must be a folder" in capsys.readouterr().err
    assert f.read_text() == "{}"


def test_writer_records_the_run_and_keeps_strict_json(tmp_path):
    args = _harness.parser(__doc__).parse_args(["--out", str(tmp_path / "res"), "--seed", "3"])
    run = _harness.start("demo", "A title", args, argv=["--seed", "3"], variant="v")
    doc = run.write([_harness.table("t", ["a", "b"], [["x", float("nan")], ["y", 2.0]])],
                    {"value": float("inf"), "arr": [1.5]}, quiet=True)
    path = tmp_path / "res" / "demo-v.json"
    assert json.loads(path.read_text()) == doc
    check_schema({**doc, "command": doc["command"] + " --quick", "quick": True}, "demo")
    assert doc["command"] == "python benchmarks/bench_demo.py --seed 3"
    assert doc["tables"][0]["rows"][0] == ["x", "nan"] and doc["data"]["value"] is None
    assert doc["commit"] != "" and isinstance(doc["dirty"], bool)


def test_writer_refuses_a_table_off_the_schema_and_leaves_nothing(tmp_path):
    args = _harness.parser(__doc__).parse_args(["--out", str(tmp_path)])
    run = _harness.start("demo", "A title", args, argv=[])
    with pytest.raises(ValueError, match="row is not 2"):
        run.write([_harness.table("t", ["a", "b"], [["only one cell"]])], {"x": 1}, quiet=True)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------ bench_snr_efficiency
def _quick(script, out, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    cmd = [sys.executable, str(BENCH / script), "--quick", "--threads", "1", "--out", str(out)]
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((out / f"{script[len('bench_'):-len('.py')]}-quick.json").read_text())


@pytest.mark.slow
def test_snr_efficiency_reruns_from_its_cache_and_judges_every_cell(tmp_path):
    """The user's path runs once: a rerun takes the set and the three networks from the cache, and the verdict
    table judges every SNR x parameter x network (or says it has no informative draw)."""
    out = tmp_path / "results"
    first = _quick("bench_snr_efficiency.py", out, tmp_path)
    second = _quick("bench_snr_efficiency.py", out, tmp_path)
    steps = ("simulate", "net", "net-unconditioned", "net-bias-reduced")
    assert [first["data"]["cli"][s]["cached"] for s in steps] == [False] * 4
    assert [second["data"]["cli"][s]["cached"] for s in steps] == [True] * 4
    assert second["data"]["models"] == first["data"]["models"]
    verdict = next(t for t in second["tables"] if t["title"].startswith("The issue's targets"))
    assert len(verdict["rows"]) == 3 * 3 * 3
    col = verdict["columns"].index("all")
    assert {r[col] for r in verdict["rows"]} <= {"pass", "FAIL", "no informative draw"}
