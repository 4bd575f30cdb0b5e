"""The numba kernels' on-disk cache is keyed on every source file compiled into them."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sklearn_crb.physics._numba import cache

PACKAGE = Path(cache.__file__).resolve().parents[2]  # .../sklearn_crb

_EDIT = ("    return R, dT2s, dB1\n", "    return 2.0 * R, dT2s, dB1\n")  # in r2sl/table.py: bilinear


def test_stamp_covers_every_kernel_source(tmp_path):
    names = {(f.parent.name, f.name) for f in cache.SOURCE_FILES}
    assert {("_numba", "kernel.py"), ("_numba", "bloch.py"), ("_numba", "expm.py"), ("_numba", "simd.py"),
            ("r2sl", "table.py")} <= names
    copies = []
    for i, f in enumerate(cache.SOURCE_FILES):
        c = tmp_path / f"{i}_{f.name}"
        shutil.copyfile(f, c)
        copies.append(c)
    s0 = cache.source_stamp(copies)
    assert s0 == cache.source_stamp(copies)  # deterministic
    table = copies[-1]
    text = table.read_text()
    assert text.count(_EDIT[0]) == 1
    table.write_text(text.replace(*_EDIT))
    assert cache.source_stamp(copies) != s0


def test_kernel_dispatchers_use_the_source_cache():
    from sklearn_crb.physics._numba import kernel

    for k in (kernel._simulate_kernel, kernel._jacobian_kernel):
        assert isinstance(k._cache, cache._SourceHashCache)
        assert k._cache._impl.locator.get_source_stamp()[1] == cache.source_stamp()


_SCRIPT = textwrap.dedent("""
    import json, sys, numpy as np
    from sklearn_crb.physics._numba import kernel
    from sklearn_crb.physics.sequence import Sequence
    seq = Sequence(np.full(4, 0.3), np.full(4, 3e-4), 3.5e-3)
    th = np.array([[0.15, 0.5, 15.0, 30.0, 3.0, 12e-6, 0.0, 1.0]])
    s = kernel.simulate_numba(seq, th)
    st = kernel._simulate_kernel.stats
    print(json.dumps({"file": kernel.__file__, "hits": sum(st.cache_hits.values()),
                      "misses": sum(st.cache_misses.values()), "re": s.real.tolist()}))
""")


def _run(root, cache_dir):
    env = dict(os.environ, PYTHONPATH=str(root), NUMBA_CACHE_DIR=str(cache_dir), OMP_NUM_THREADS="1",
               NUMBA_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_edit_to_the_lookup_invalidates_the_cached_kernel(tmp_path):
    """A copy of the package: compile, load from cache, edit the R2sl lookup, recompile."""
    root = tmp_path / "src"
    shutil.copytree(PACKAGE, root / "sklearn_crb", ignore=shutil.ignore_patterns("__pycache__"))
    cache_dir = tmp_path / "numba_cache"
    first = _run(root, cache_dir)
    assert first["file"].startswith(str(root))
    assert first["misses"] == 1 and first["hits"] == 0
    second = _run(root, cache_dir)  # a new process loads the compiled kernel
    assert second["hits"] == 1 and second["misses"] == 0
    assert second["re"] == first["re"]
    table = root / "sklearn_crb" / "physics" / "r2sl" / "table.py"
    text = table.read_text()
    assert text.count(_EDIT[0]) == 1
    table.write_text(text.replace(*_EDIT))  # only table.py changes, not the kernel's file
    third = _run(root, cache_dir)
    assert third["misses"] == 1 and third["hits"] == 0
    assert third["re"] != first["re"]  # the edit took effect in the compiled kernel
