"""The commit protocol of every multi-file output (``sklearn_crb._atomic``).

After a failure or a kill at any step of a commit, the output holds the old
complete output or the new complete output and nothing else; two writers of
one output never end with a mix; a file that appears during the work is not
replaced; stale files of a previous run go in the same commit.
"""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sklearn_crb import _atomic
from sklearn_crb._atomic import OutputBusy, atomic_dir, atomic_files, claim_output, recover

OLD = {"a.nii.gz": "old a", "b.nii.gz": "old b", "summary.json": "old summary"}
NEW = {"a.nii.gz": "new a", "c.nii.gz": "new c", "summary.json": "new summary"}


def _contents(folder):
    """``{name: text}`` of everything in ``folder``, hidden entries included (they must not stay)."""
    return {n: (folder / n).read_text() if (folder / n).is_file() else "<dir>" for n in sorted(os.listdir(folder))}


def _old_folder(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for n, text in OLD.items():
        (folder / n).write_text(text)


def _commit_new(folder):
    with atomic_files(folder, list(NEW), remove=["b.nii.gz"]) as tmp:
        for n, text in NEW.items():
            tmp[n].write_text(text)


def _assert_whole(folder, old=OLD, new=NEW):
    got = _contents(folder)
    assert got in (old, new), f"a mix or leftovers: {got}"
    parent = os.listdir(folder.parent)
    assert [p for p in parent if "sklearn-crb" in p] == [], parent
    return got == new


def _steps_of(fn):
    """Every (step, occurrence) a successful commit passes through."""
    seen, counts = [], {}

    def hook(step):
        counts[step] = counts.get(step, 0) + 1
        seen.append((step, counts[step]))

    _atomic._step_hook = hook
    try:
        fn()
    finally:
        _atomic._step_hook = None
    return seen


def test_the_steps_are_named_and_a_commit_passes_each(tmp_path):
    _old_folder(tmp_path / "out")
    seen = {s for s, _ in _steps_of(lambda: _commit_new(tmp_path / "out"))}
    assert seen == set(_atomic.STEPS)
    assert _contents(tmp_path / "out") == NEW


def _every_step_of_files(tmp_path):
    _old_folder(tmp_path / "probe")
    return _steps_of(lambda: _commit_new(tmp_path / "probe"))


def test_an_exception_at_every_step_leaves_the_old_or_the_new_output(tmp_path):
    for i, (step, k) in enumerate(_every_step_of_files(tmp_path)):
        folder = tmp_path / f"out{i}"
        _old_folder(folder)
        counts = {}

        def hook(s, step=step, k=k):
            counts[s] = counts.get(s, 0) + 1
            if (s, counts[s]) == (step, k):
                raise KeyboardInterrupt(f"at {step} #{k}")

        _atomic._step_hook = hook
        try:
            with pytest.raises(KeyboardInterrupt):
                _commit_new(folder)
        finally:
            _atomic._step_hook = None
        # in-process: rolled back at once, before any later claim
        assert _contents(folder) == OLD or (step == "cleanup" and _contents(folder) == NEW), (step, k)


@pytest.mark.parametrize("fail_at", range(1, 7))
def test_a_failed_rename_leaves_the_old_output(tmp_path, monkeypatch, fail_at):
    """Any rename into or out of the folder failing (full disk, permissions): never a mix."""
    out = tmp_path / "out"
    _old_folder(out)
    calls = []

    def failing(real):
        def move(src, dst, *a, **k):
            if out in (Path(src).parent, Path(dst).parent):
                calls.append(src)
                if len(calls) == fail_at:
                    raise OSError(28, "No space left on device")
            return real(src, dst, *a, **k)
        return move

    monkeypatch.setattr(os, "rename", failing(os.rename))
    monkeypatch.setattr(os, "replace", failing(os.replace))
    with pytest.raises(OSError, match="No space"):
        _commit_new(out)
    monkeypatch.undo()
    assert _contents(out) == OLD


_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import importlib.util
    spec = importlib.util.spec_from_file_location("_atomic", {path!r})  # the module alone: no torch import
    _atomic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(_atomic)
    step, k, kind, exchange = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
    if not exchange:
        _atomic._renameat2 = lambda *a: False  # the two-rename fallback (file systems without RENAME_EXCHANGE)
    counts = {{}}
    def hook(s):
        counts[s] = counts.get(s, 0) + 1
        if (s, counts[s]) == (step, k):
            os.kill(os.getpid(), signal.SIGKILL)
    _atomic._step_hook = hook
    out = Path(sys.argv[5])
    new = {new!r}
    if kind == "files":
        with _atomic.atomic_files(out, list(new), remove=["b.nii.gz"]) as tmp:
            for n, t in new.items():
                tmp[n].write_text(t)
    else:
        with _atomic.atomic_dir(out) as tmp:
            for n, t in new.items():
                (tmp / n).write_text(t)
""")


def _dir_commit(folder):
    with atomic_dir(folder) as tmp:
        for n, text in NEW.items():
            (tmp / n).write_text(text)


@pytest.mark.parametrize("kind,exchange", [("files", True), ("dir", True), ("dir", False)])
def test_a_kill_at_every_step_leaves_the_old_or_the_new_output(tmp_path, kind, exchange):
    """SIGKILL at each step, in a subprocess; then the next claim of the output (any sklearn-crb writer)."""
    commit = _commit_new if kind == "files" else _dir_commit
    _old_folder(tmp_path / "probe")
    if not exchange:
        real = _atomic._renameat2
        _atomic._renameat2 = lambda *a: False
    try:
        steps = _steps_of(lambda: commit(tmp_path / "probe"))
    finally:
        if not exchange:
            _atomic._renameat2 = real
    script = _KILL_SCRIPT.format(path=_atomic.__file__, new=NEW)
    outcomes = set()
    for i, (step, k) in enumerate(steps):
        folder = tmp_path / f"k{i}" / "out"
        _old_folder(folder)
        r = subprocess.run([sys.executable, "-c", script, step, str(k), kind, "1" if exchange else "0", str(folder)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == -9, (step, k, r.stderr[-500:])
        recover(folder)
        outcomes.add(_assert_whole(folder))
    assert outcomes == {False, True}  # some kills came before the commit point, some after


_RACE_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import importlib.util
    spec = importlib.util.spec_from_file_location("_atomic", {path!r})  # the module alone: no torch import
    _atomic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(_atomic)
    atomic_files, OutputBusy = _atomic.atomic_files, _atomic.OutputBusy
    out, tag, go = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    while not go.exists():
        time.sleep(0.005)
    try:
        with atomic_files(out, ["a", "b", "c"]) as tmp:
            for n in ("a", "b", "c"):
                tmp[n].write_text(tag)
                time.sleep(0.05)
    except OutputBusy as exc:
        print("busy:", exc)
        sys.exit(3)
""")


def test_two_processes_into_one_folder_never_mix(tmp_path):
    for trial in range(3):
        out, go = tmp_path / f"race{trial}", tmp_path / f"go{trial}"
        script = _RACE_SCRIPT.format(path=_atomic.__file__)
        procs = [subprocess.Popen([sys.executable, "-c", script, str(out), tag, str(go)], stdout=subprocess.PIPE,
                                  text=True) for tag in ("P", "Q")]
        time.sleep(1.0)  # both started and waiting
        go.touch()
        codes = [p.wait(timeout=120) for p in procs]
        got = _contents(out)
        assert set(codes) <= {0, 3} and 0 in codes, codes
        assert got in ({n: "P" for n in "abc"}, {n: "Q" for n in "abc"}), got
        if 3 in codes:  # the loser was refused by name
            loser = procs[codes.index(3)]
            assert "is being written by another sklearn-crb process" in loser.stdout.read()


def test_a_second_claim_is_refused_by_name_and_released_with_the_first(tmp_path):
    out = tmp_path / "out"
    first = claim_output(out, argname="--out")
    code = ("import importlib.util as u; s = u.spec_from_file_location('a', %r); m = u.module_from_spec(s); "
            "s.loader.exec_module(m); m.OutputClaim(%r, argname='--out')" % (_atomic.__file__, str(out)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--out" in r.stderr and "another sklearn-crb process" in r.stderr
    first.release()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert os.listdir(tmp_path) == []  # no lock file, no folder made for it


def test_busy_is_a_value_error_naming_the_argument(tmp_path):
    assert issubclass(OutputBusy, ValueError)


def test_a_file_that_appears_during_the_work_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    _old_folder(out)
    claim = claim_output(out, argname="--out")
    (out / "c.nii.gz").write_text("someone else's")  # appears while the command works
    with pytest.raises(ValueError, match=r"--out: .*c\.nii\.gz appeared or changed while this command ran"):
        with atomic_files(out, list(NEW)) as tmp:
            for n, text in NEW.items():
                tmp[n].write_text(text)
    claim.release()
    assert _contents(out) == {**OLD, "c.nii.gz": "someone else's"}


def test_a_folder_that_changes_during_the_work_is_not_replaced(tmp_path):
    out = tmp_path / "model"
    _old_folder(out)
    claim = claim_output(out, argname="--out")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="appeared or changed while this command ran"):
        _dir_commit(out)
    claim.release()
    assert _contents(out) == {**OLD, "notes.txt": "mine"}
    _dir_commit(out)  # unclaimed, unchanged since the commit's own claim: replaced whole
    assert _contents(out) == NEW


def test_stale_files_of_the_previous_output_go_in_the_same_commit(tmp_path):
    out = tmp_path / "out"
    _old_folder(out)
    (out / "mine.txt").write_text("not listed")
    _commit_new(out)
    assert _contents(out) == {**NEW, "mine.txt": "not listed"}


def test_kill_leftovers_are_never_taken_for_outputs(tmp_path):
    """A killed run's staging is removed by the next claim, and a journal rolls its moves back."""
    out = tmp_path / "out"
    _old_folder(out)
    staging = out / f"{_atomic.STAGING}.dead"
    (staging / "old").mkdir(parents=True)
    (staging / "new").mkdir()
    os.rename(out / "a.nii.gz", staging / "old" / "a.nii.gz")
    (out / "a.nii.gz").write_text("new a")
    (staging / "journal.json").write_text(json.dumps({"moves": [["a.nii.gz", True]]}))
    claim_output(out).release()
    assert _contents(out) == OLD
