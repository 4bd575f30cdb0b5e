"""The ``sklearn-crb`` command line: demo, simulate, train and fit (argparse only).

``sklearn-crb demo``
    The end-to-end demo of :mod:`sklearn_crb.demo` (no downloads).
``sklearn-crb simulate``
    Writes a training set (:mod:`sklearn_crb.io.datasets`).
``sklearn-crb train``
    Trains a network from such a set and saves it (:mod:`sklearn_crb.io.models`).
``sklearn-crb fit``
    Applies a saved network or NLLS to a coefficient image
    (:func:`sklearn_crb.maps.fit_maps`) and writes NIfTI maps, a PNG overview
    (:mod:`sklearn_crb.viz`) and ``summary.json``.

Every output is written atomically (a failed or interrupted run leaves no
partial file and an existing output as it was), with the permissions of the
umask. Every error is one line on stderr with exit status 2 (130 after
Ctrl-C), and every check runs before any work.

One module per command (:mod:`~sklearn_crb.cli.simulate`, :mod:`~sklearn_crb.cli.train`,
:mod:`~sklearn_crb.cli.fit`); the parser and entry point are in ``_main``.
"""

from sklearn_crb.cli._common import CLIError
from sklearn_crb.cli._main import build_parser, main
from sklearn_crb.io.datasets import load_dataset, simulate_dataset
from sklearn_crb.recipes import make_network

__all__ = ["main", "build_parser", "CLIError", "load_dataset", "make_network", "simulate_dataset"]
