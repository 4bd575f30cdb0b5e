"""The CLI under bad input: one line on stderr, exit status 2, no new file, every
existing file byte-identical; one overwrite policy; Ctrl-C leaves the old model."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from sklearn_crb.cli import main
from sklearn_crb.io.datasets import load_dataset

COMMON = ["--n-pulses", "120", "--quiet"]


def _snapshot(root):
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in Path(root).rglob("*")}


def _run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    cap = capsys.readouterr()
    return code, cap.err


def assert_refused(argv, root, capsys, match=None):
    """Exit 2, exactly one line on stderr, nothing created or changed under ``root``."""
    before = _snapshot(root)
    code, err = _run(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2, (argv, code, err)
    assert len(lines) == 1, (argv, err)
    assert "Traceback" not in err
    if match:
        assert match.lower() in err.lower(), (match, err)
    assert _snapshot(root) == before, argv


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A training set, a saved model and a coefficient image in its basis (120 pulses, rank 6)."""
    from sklearn_crb.phantom import make_phantom
    from sklearn_crb.physics.sequence import Sequence

    d = tmp_path_factory.mktemp("robust_cli")
    assert main(["simulate", "--out", str(d / "t.npz"), "--n-samples", "200", "--rank", "6",
                 "--n-basis-samples", "150", *COMMON]) == 0
    assert main(["train", "--data", str(d / "t.npz"), "--out", str(d / "model"), "--epochs", "1", "--hidden", "8",
                 "--device", "cpu", "--quiet"]) == 0
    U = np.load(d / "model" / "basis.npy")
    ph = make_phantom((8, 8), Sequence.default(n_pulses=120), basis=U, snr=50, random_state=0)
    nib.save(nib.Nifti1Image(ph.coefficients[:, :, None, :].astype(np.complex64), np.eye(4)), d / "coef.nii.gz")
    (d / "notes.txt").write_text("a user's file")
    (d / "user").mkdir()
    (d / "user" / "thesis.tex").write_text("precious")
    return d


def _fit(d, *extra):
    return ["fit", "--model", str(d / "model"), "--coefficients", str(d / "coef.nii.gz"), "--quiet", *extra]


def _train(d, *extra):
    return ["train", "--data", str(d / "t.npz"), "--epochs", "1", "--hidden", "8", "--quiet", *extra]


def _simulate(*extra):
    return ["simulate", "--n-samples", "20", "--rank", "6", "--n-basis-samples", "100", *COMMON, *extra]


# ------------------------------------------------------------------ every subcommand: one line, exit 2, no output
def bad_cases(d):
    file = d / "notes.txt"
    cases = {
        # unwritable output folder / output path that is a folder or under a file
        "simulate-out-is-folder": _simulate("--out", str(d / "user")),
        "simulate-out-under-file": _simulate("--out", str(file / "t.npz")),
        "simulate-unwritable": _simulate("--out", "/proc/sklearn_crb_t.npz"),
        "simulate-exists": _simulate("--out", str(d / "t.npz")),
        "simulate-foreign-overwrite": _simulate("--out", str(d / "x.npz"), "--overwrite"),
        "simulate-suffix": _simulate("--out", str(d / "t.csv")),
        "simulate-n-samples-1": _simulate("--out", str(d / "n.npz"), "--n-samples", "1"),
        "simulate-n-samples-neg": _simulate("--out", str(d / "n.npz"), "--n-samples", "-4"),
        "simulate-sigma-0": _simulate("--out", str(d / "n.npz"), "--sigma", "0"),
        "simulate-snr-neg": _simulate("--out", str(d / "n.npz"), "--snr", "-1", "10"),
        "simulate-rank-0": _simulate("--out", str(d / "n.npz"), "--rank", "0"),
        "simulate-TR-nan": _simulate("--out", str(d / "n.npz"), "--TR", "nan"),
        "train-device-bogus": _train(d, "--out", str(d / "m2"), "--device", "bogus"),
        "train-device-mps": _train(d, "--out", str(d / "m2"), "--device", "mps"),
        "train-batch-size-0": _train(d, "--out", str(d / "m2"), "--batch-size", "0"),
        "train-epochs-0": _train(d, "--out", str(d / "m2"), "--epochs", "0"),
        "train-epochs-neg": _train(d, "--out", str(d / "m2"), "--epochs", "-3"),
        "train-lr-0": _train(d, "--out", str(d / "m2"), "--lr", "0"),
        "train-hidden-0": _train(d, "--out", str(d / "m2"), "--hidden", "0"),
        "train-out-is-file": _train(d, "--out", str(file)),
        "train-out-under-file": _train(d, "--out", str(file / "m")),
        "train-out-unwritable": _train(d, "--out", "/proc/sklearn_crb_model"),
        "train-out-foreign": _train(d, "--out", str(d / "user")),
        "train-out-foreign-overwrite": _train(d, "--out", str(d / "user"), "--overwrite"),
        "train-out-model-exists": _train(d, "--out", str(d / "model")),
        "train-out-parent": _train(d, "--out", str(d), "--overwrite"),
        "train-data-missing": _train(d, "--out", str(d / "m2"), "--data", str(d / "missing.npz")),
        "train-data-corrupt": _train(d, "--out", str(d / "m2"), "--data", str(file)),
        "fit-prefix-dotdot": _fit(d, "--out", str(d / "f"), "--prefix", "../../x_"),
        "fit-prefix-slash": _fit(d, "--out", str(d / "f"), "--prefix", "a/b_"),
        "fit-out-is-file": _fit(d, "--out", str(file)),
        "fit-out-under-file": _fit(d, "--out", str(file / "f")),
        "fit-out-unwritable": _fit(d, "--out", "/proc/sklearn_crb_fit"),
        "fit-device-bogus": _fit(d, "--out", str(d / "f"), "--device", "bogus"),
        "fit-chunk-size-0": _fit(d, "--out", str(d / "f"), "--chunk-size", "0"),
        "fit-sigma-neg": _fit(d, "--out", str(d / "f"), "--sigma", "-1"),
        "fit-model-missing": ["fit", "--model", str(d / "nope"), "--coefficients", str(d / "coef.nii.gz"),
                              "--out", str(d / "f")],
        "fit-model-foreign": ["fit", "--model", str(d / "user"), "--coefficients", str(d / "coef.nii.gz"),
                              "--out", str(d / "f")],
        "fit-nothing": ["fit", "--coefficients", str(d / "coef.nii.gz"), "--out", str(d / "f")],
        "demo-out-is-file": ["demo", "--out", str(file), "--quiet"],
        "demo-out-foreign": ["demo", "--out", str(d / "user"), "--quiet", "--overwrite"],
        "demo-out-under-file": ["demo", "--out", str(file / "demo"), "--quiet"],
        "demo-out-unwritable": ["demo", "--out", "/proc/sklearn_crb_demo", "--quiet"],
    }
    if not torch.cuda.is_available():
        cases["train-device-cuda"] = _train(d, "--out", str(d / "m2"), "--device", "cuda")
        cases["fit-device-cuda"] = _fit(d, "--out", str(d / "f"), "--device", "cuda")
    else:
        cases["train-device-cuda-99"] = _train(d, "--out", str(d / "m2"), "--device", "cuda:99")
    return cases


CASE_NAMES = sorted(bad_cases(Path("/x")))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_is_one_line_exit_2_and_no_output(work, name, capsys):
    (work / "x.npz").write_bytes(b"not a training set")
    try:
        argv = bad_cases(work)[name]
        assert_refused(argv, work, capsys)
    finally:
        os.remove(work / "x.npz")


def test_unreachable_scheduler_fails_fast(work, capsys):
    pytest.importorskip("dask.distributed")
    import socket

    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = work
    U = np.load(d / "model" / "basis.npy")
    np.save(d / "U.npy", U)
    try:
        t0 = time.perf_counter()
        assert_refused(["fit", "--nlls", "--basis", str(d / "U.npy"), "--coefficients", str(d / "coef.nii.gz"),
                        "--out", str(d / "f"), "--scheduler", f"tcp://127.0.0.1:{port}", *COMMON], d, capsys,
                       match="--scheduler")
        assert time.perf_counter() - t0 < 30
    finally:
        os.remove(d / "U.npy")


# ------------------------------------------------------------------ one overwrite policy
def test_overwrite_replaces_only_package_outputs(work, capsys, tmp_path):
    d = work
    out = tmp_path / "fit"
    assert main(_fit(d, "--out", str(out), "--sigma", "0.02")) == 0
    files = sorted(os.listdir(out))
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["files"]) | {"summary.json"} == set(files)
    assert_refused(_fit(d, "--out", str(out)), tmp_path, capsys, match="--overwrite")
    assert main(_fit(d, "--out", str(out), "--overwrite")) == 0
    assert sorted(os.listdir(out)) == files
    # a file of the same name that the package did not write is never replaced
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "m0s.nii.gz").write_bytes(b"user data")
    assert_refused(_fit(d, "--out", str(tmp_path / "other"), "--overwrite"), tmp_path, capsys,
                   match="not written by sklearn-crb")
    # other files in the folder are left alone, and prefixes keep runs apart
    assert main(_fit(d, "--out", str(tmp_path / "other"), "--prefix", "run1_")) == 0
    assert (tmp_path / "other" / "m0s.nii.gz").read_bytes() == b"user data"
    assert (tmp_path / "other" / "run1_m0s.nii.gz").is_file()


@pytest.mark.slow
def test_train_overwrites_a_saved_model_atomically(work, tmp_path):
    d = work
    out = tmp_path / "model"
    assert main(_train(d, "--out", str(out))) == 0
    assert main(_train(d, "--out", str(out), "--overwrite", "--seed", "3")) == 0
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no .old or .tmp leftovers
    assert sorted(os.listdir(out)) == ["basis.npy", "model.json", "params.pt"]


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".npz", ".h5", ".hdf5"])
def test_every_simulate_format_trains(tmp_path, suffix):
    data = tmp_path / f"t{suffix}"
    assert main(_simulate("--out", str(data), "--estimate", "m0s", "R1f")) == 0
    meta = load_dataset(data)["meta"]
    assert meta["estimate"] == ["m0s", "R1f"] and isinstance(meta["sequence"], dict)
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "m"), "--epochs", "1", "--hidden", "4",
                 "--quiet"]) == 0
    assert main(_simulate("--out", str(data), "--overwrite")) == 0  # a training set of ours: replaced


def test_outputs_respect_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        assert main(_simulate("--out", str(tmp_path / "t.npz"))) == 0
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "t.npz").st_mode & 0o777 == 0o640


def test_help_documents_the_overwrite_policy(capsys):
    for cmd in ("simulate", "train", "fit", "demo"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "--overwrite" in out and "only outputs that sklearn-crb wrote" in out, cmd


# ------------------------------------------------------------------ Ctrl-C during train
def test_interrupted_train_keeps_the_old_model_in_process(work, tmp_path, capsys):
    d = work
    out = tmp_path / "model"
    assert main(_train(d, "--out", str(out))) == 0
    before = _snapshot(tmp_path)
    timer = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        code, err = _run(["train", "--data", str(d / "t.npz"), "--epochs", "100000", "--hidden", "8", "--quiet",
                          "--out", str(out), "--overwrite"], capsys)
    finally:
        timer.cancel()
    assert code == 130
    assert len(err.strip().splitlines()) == 1 and "interrupted" in err
    assert _snapshot(tmp_path) == before


@pytest.mark.slow
def test_sigint_to_a_train_subprocess_keeps_the_old_model(work, tmp_path):
    d = work
    out = tmp_path / "model"
    assert main(_train(d, "--out", str(out))) == 0
    before = _snapshot(tmp_path)
    cmd = [sys.executable, "-c", "import sys; from sklearn_crb.cli import main; sys.exit(main())", "train",
           "--data", str(d / "t.npz"), "--epochs", "100000", "--hidden", "8", "--out", str(out), "--overwrite"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    chunks = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    t0 = time.time()
    while "epoch" not in "".join(chunks) and time.time() - t0 < 120 and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)  # a few epochs in
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    reader.join(timeout=5)
    err = "".join(chunks)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyError" not in err
    last = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()][-1]
    assert last.startswith("sklearn-crb train: interrupted")
    assert _snapshot(tmp_path) == before


# ------------------------------------------------------------------ the commit protocol from the commands
def test_fit_overwrite_with_fewer_outputs_removes_the_previous_runs_extras(work, tmp_path):
    d = work
    out = tmp_path / "fit"
    assert main(_fit(d, "--out", str(out), "--sigma", "0.02", "--times")) == 0
    with_times = set(os.listdir(out))
    (out / "mine.txt").write_text("a user's file")
    assert main(_fit(d, "--out", str(out), "--sigma", "0.02", "--overwrite")) == 0
    listed = set(json.loads((out / "summary.json").read_text())["files"]) | {"summary.json"}
    assert set(os.listdir(out)) == listed | {"mine.txt"}  # the summary lists exactly what is there
    assert {f for f in with_times if f.startswith("T1f")} and not {f for f in listed if f.startswith("T1f")}
    assert (out / "mine.txt").read_text() == "a user's file"


def test_fit_does_not_replace_a_file_that_appears_during_the_work(work, tmp_path, capsys, monkeypatch):
    import sklearn_crb.cli.fit as cli_fit

    d = work
    out = tmp_path / "fit"
    real = cli_fit.fit_maps

    def fit_and_meanwhile(*a, **k):
        out.mkdir(exist_ok=True)
        (out / "m0s.nii.gz").write_bytes(b"written by someone else during the fit")
        return real(*a, **k)

    monkeypatch.setattr(cli_fit, "fit_maps", fit_and_meanwhile)
    code, err = _run(_fit(d, "--out", str(out), "--sigma", "0.02"), capsys)
    assert code == 2 and "m0s.nii.gz appeared or changed while this command ran" in err, err
    assert os.listdir(out) == ["m0s.nii.gz"]
    assert (out / "m0s.nii.gz").read_bytes() == b"written by someone else during the fit"


@pytest.mark.parametrize("command", ["fit", "train", "simulate"])
def test_a_second_command_into_one_out_is_refused_by_name(work, tmp_path, capsys, command):
    """While another process holds --out (a command at work), a second one is refused before any work."""
    import sklearn_crb._atomic as atomic

    d = work
    out = tmp_path / ("t.npz" if command == "simulate" else "out")
    hold = ("import importlib.util as u, sys, time; s = u.spec_from_file_location('a', %r); m = u.module_from_spec(s)"
            "; s.loader.exec_module(m); c = m.OutputClaim(%r); print('held', flush=True); time.sleep(60)"
            % (atomic.__file__, str(out)))
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        argv = {"fit": _fit(d, "--out", str(out)), "train": _train(d, "--out", str(out)),
                "simulate": _simulate("--out", str(out))}[command]
        t0 = time.perf_counter()
        code, err = _run(argv, capsys)
        assert code == 2 and "--out" in err and "is being written by another sklearn-crb process" in err, err
        assert time.perf_counter() - t0 < 5
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------ messages in the user's terms, before any work
def _message_cases(d):
    return {
        "prefix-too-long": (_fit(d, "--out", str(d / "f"), "--prefix", "p" * 240), "--prefix: 240 bytes is too long"),
        "TR-with-model": (_fit(d, "--out", str(d / "f"), "--TR", "5e-3"), "--TR: --model"),
        "n-pulses-with-model": (_fit(d, "--out", str(d / "f"), "--n-pulses", "500"), "--n-pulses: --model"),
        "n-pulses-with-sequence": (_simulate("--out", str(d / "n.npz"), "--sequence", str(d / "seq.mat")),
                                   "--n-pulses sets the length of the built-in sequence"),
        "zero-mask": (_fit(d, "--out", str(d / "f"), "--mask", str(d / "zero_mask.npy")), "selects no voxel"),
        "rank-over-pulses": (_simulate("--out", str(d / "n.npz"), "--rank", "500"), "--rank 500 exceeds the 120"),
        "rank-over-basis-samples": (_simulate("--out", str(d / "n.npz"), "--rank", "120"),
                                    "--rank 120 exceeds --n-basis-samples 100"),
        "crb-samples-below-rank": (_simulate("--out", str(d / "n.npz"), "--basis-method", "crb", "--n-crb-samples",
                                             "3"), "--n-crb-samples 3 is below --rank 6"),
        "n-samples-1e12": (["simulate", "--out", str(d / "n.h5"), "--n-samples", "1e12", "--quiet"],
                           "--n-samples 1000000000000"),
    }


@pytest.mark.parametrize("name", sorted(_message_cases(Path("/x"))))
def test_messages_name_the_option_given(work, name, capsys):
    import scipy.io

    (work / "x.npz").write_bytes(b"not a training set")
    np.save(work / "zero_mask.npy", np.zeros((8, 8, 1)))
    scipy.io.savemat(work / "seq.mat", {"alpha": np.full(120, 0.5), "TRF": np.full(120, 3e-4)})
    try:
        argv, match = _message_cases(work)[name]
        assert_refused(argv, work, capsys, match=match)
    finally:
        for f in ("x.npz", "zero_mask.npy", "seq.mat"):
            os.remove(work / f)
