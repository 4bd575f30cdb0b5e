"""Result writers shared by the benchmark scripts: every JSON, table and figure appears whole or not at all.

They go through the package's one atomic writer (:func:`sklearn_crb._atomic.atomic_path`), so an interrupted
benchmark leaves the previous results as they were. Import with ``from _results import ...`` (a script's own
folder is first on ``sys.path``).
"""

from __future__ import annotations

import json
from pathlib import Path

from sklearn_crb._atomic import atomic_path

__all__ = ["write_text", "write_json", "save_figure"]


def write_text(path, text):
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
    return Path(path)


def write_json(path, obj, indent=1, default=None):
    """Write ``obj`` as JSON to ``path`` atomically; returns the path."""
    return write_text(path, json.dumps(obj, indent=indent, default=default))


def save_figure(fig, path, dpi=110):
    """Save a matplotlib figure to ``path`` atomically (the format from its suffix); returns the path."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    return Path(path)
