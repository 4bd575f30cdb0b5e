"""The batch loaders of ``CRBNetRegressor``, its batched forward pass and its torch thread settings.

skorch's default iterator builds every batch sample by sample
(``Dataset.__getitem__`` per sample, then ``default_collate``): for a dict of
arrays of 16,000 samples that is 160,000 ``__getitem__`` and 640,000
``torch.as_tensor`` calls in 10 epochs, over half of the fit time of a
256-256-128 MLP on one CPU thread. :class:`TensorBatches` turns the arrays
into tensors once (on the training device) and takes each batch by tensor
indexing with a seeded permutation, the way a plain torch loop does.

Sets larger than memory (an HDF5 training set, :class:`sklearn_crb.io.h5.H5Rows`)
are trained through :class:`PackedRows`, a torch ``Dataset`` over a lazy row
source and a packing function, and :class:`RowBatches`, which draws the same
permutation as :class:`TensorBatches` and reads each batch's rows (index set
sorted for the file, rows put back in permutation order) only when the batch
is due: the batches are the same as from the arrays in memory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import contextmanager

import numpy as np
import torch
from skorch.dataset import Dataset

__all__ = ["TensorBatches", "PackedRows", "RowBatches", "tensor_batches_or_none", "row_batches_or_none",
           "make_iterator", "forward_in_batches", "net_threads",
           "torch_threads", "default_threads"]

#: ``iterator_train__*``/``iterator_valid__*`` options that only skorch's DataLoader implements.
_LOADER_ONLY = ("num_workers", "sampler", "batch_sampler", "collate_fn", "pin_memory", "worker_init_fn",
                "persistent_workers", "prefetch_factor", "multiprocessing_context", "timeout")


class TensorBatches:
    """Whole batches by tensor indexing: ``({key: tensor[idx]}, y[idx])``.

    Parameters
    ----------
    X : dict of arrays
    y : array or None
    batch_size : int
    shuffle : bool
        A new permutation every epoch (``torch.randperm`` with ``generator``).
    drop_last : bool
    generator : torch.Generator or None
        CPU generator of the permutations (None: torch's global RNG).
    device : torch.device
        Where the tensors live (moved once).
    """

    def __init__(self, X, y, batch_size, shuffle=False, drop_last=False, generator=None, device="cpu"):
        self.X = {k: torch.as_tensor(np.asarray(v)).to(device) for k, v in X.items()}
        self.y = None if y is None else torch.as_tensor(np.asarray(y)).to(device)
        self.n = len(next(iter(self.X.values())))
        self.batch_size = max(1, int(batch_size))
        self.shuffle, self.drop_last, self.generator = bool(shuffle), bool(drop_last), generator

    def __len__(self):
        if self.drop_last:
            return self.n // self.batch_size
        return -(-self.n // self.batch_size)

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.n, generator=self.generator)
        else:
            order = torch.arange(self.n)
        dev = next(iter(self.X.values())).device
        order = order.to(dev)
        stop = len(self) * self.batch_size if self.drop_last else self.n
        for i in range(0, stop, self.batch_size):
            j = order[i: i + self.batch_size]
            yield {k: v[j] for k, v in self.X.items()}, (None if self.y is None else self.y[j])


class PackedRows(torch.utils.data.Dataset):
    """A lazy training set: rows of ``source`` packed per batch by ``pack``.

    Parameters
    ----------
    source : object
        Has ``len(source)`` and ``source.read(keys, idx) -> {key: ndarray}``
        returning rows ``idx`` in the order given (e.g.
        :class:`sklearn_crb.io.h5.H5Rows`).
    keys : sequence of str
        Arrays of ``source`` that ``pack`` needs.
    pack : callable
        ``pack(rows) -> (X dict of ndarrays, y ndarray or None)`` for one
        batch (the estimator's float32 features, loss weights and
        standardised targets); it must act row by row.
    """

    def __init__(self, source, keys, pack):
        self.source, self.keys, self.pack = source, tuple(keys), pack
        self.n = len(source)

    def __len__(self):
        return self.n

    def take(self, idx):
        """Packed batch ``(X dict, y)`` of the rows ``idx`` (in that order)."""
        return self.pack(self.source.read(self.keys, np.asarray(idx, dtype=np.int64)))

    def __getitem__(self, i):  # skorch's DataLoader path (one sample); RowBatches reads whole batches
        X, y = self.take([int(i)])
        return {k: v[0] for k, v in X.items()}, (None if y is None else y[0])


class RowBatches:
    """Whole batches of a :class:`PackedRows`, read from its source batch by batch.

    Same parameters and the same permutations as :class:`TensorBatches`
    (``torch.randperm(n, generator=generator)``), so for one generator state
    both yield the same batches; ``indices`` restricts the set to those rows
    (a ``Subset``, e.g. the training part of a validation split), exactly as
    :class:`TensorBatches` over ``arrays[indices]``.
    """

    def __init__(self, rows, batch_size, shuffle=False, drop_last=False, generator=None, device="cpu",
                 indices=None):
        self.rows = rows
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        self.n = len(rows) if self.indices is None else len(self.indices)
        self.batch_size = max(1, int(batch_size))
        self.shuffle, self.drop_last, self.generator = bool(shuffle), bool(drop_last), generator
        self.device = torch.device(device)

    __len__ = TensorBatches.__len__

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        order = order.numpy()
        if self.indices is not None:
            order = self.indices[order]
        stop = len(self) * self.batch_size if self.drop_last else self.n
        for i in range(0, stop, self.batch_size):
            X, y = self.rows.take(order[i: i + self.batch_size])
            X = {k: torch.as_tensor(v).to(self.device) for k, v in X.items()}
            yield X, (None if y is None else torch.as_tensor(y).to(self.device))


def row_batches_or_none(dataset, kwargs, device, generator):
    """A :class:`RowBatches` for a :class:`PackedRows` (or a ``Subset`` of one), else None."""
    if any(k in kwargs for k in _LOADER_ONLY):
        return None
    idx = None
    if isinstance(dataset, torch.utils.data.Subset):
        idx, dataset = np.asarray(dataset.indices), dataset.dataset
    if not isinstance(dataset, PackedRows):
        return None
    return RowBatches(dataset, kwargs["batch_size"], shuffle=kwargs.get("shuffle", False),
                      drop_last=kwargs.get("drop_last", False), generator=kwargs.get("generator", generator),
                      device=device, indices=idx)


def _dict_arrays(dataset):
    """``(X dict, y)`` of a skorch ``Dataset`` of a dict of arrays, or of a ``Subset`` of one; else None."""
    idx = None
    if isinstance(dataset, torch.utils.data.Subset):
        idx, dataset = np.asarray(dataset.indices), dataset.dataset
    if type(dataset) is not Dataset or not isinstance(dataset.X, Mapping):
        return None
    if not all(isinstance(v, np.ndarray) for v in dataset.X.values()):
        return None
    y = dataset.y
    if y is not None and not isinstance(y, np.ndarray):
        return None
    if idx is None:
        return dict(dataset.X), y
    return {k: v[idx] for k, v in dataset.X.items()}, (None if y is None else y[idx])


def tensor_batches_or_none(dataset, kwargs, device, generator):
    """A :class:`TensorBatches` for ``dataset`` with the iterator options ``kwargs``, or None.

    None (use skorch's DataLoader) when the dataset is not a dict of numpy
    arrays or an option needs the DataLoader (workers, samplers, collate...).
    """
    if any(k in kwargs for k in _LOADER_ONLY):
        return None
    arrays = _dict_arrays(dataset)
    if arrays is None:
        return None
    X, y = arrays
    gen = kwargs.get("generator", generator)
    return TensorBatches(X, y, kwargs["batch_size"], shuffle=kwargs.get("shuffle", False),
                         drop_last=kwargs.get("drop_last", False), generator=gen, device=device)


def make_iterator(net, dataset, training=False, seed=None):
    """The batch iterator of ``CRBNetRegressor.get_iterator``.

    :class:`TensorBatches` for the packed data, :class:`RowBatches` for a lazy
    :class:`PackedRows` set, skorch's DataLoader for other
    datasets or options that need it (workers, samplers, ...). Training
    batches are shuffled by a generator seeded by ``seed`` (None: torch's global RNG), and a
    last batch of one sample is dropped (BatchNorm cannot train on it).
    """
    kwargs = net.get_params_for("iterator_train" if training else "iterator_valid")
    bs = kwargs.get("batch_size", net.batch_size)
    bs = len(dataset) if bs == -1 else bs
    kwargs["batch_size"] = bs
    if training:
        if len(dataset) > 1 and len(dataset) % bs == 1 and "drop_last" not in kwargs:
            kwargs["drop_last"] = True
        kwargs.setdefault("shuffle", True)
        if seed is not None and "generator" not in kwargs:
            kwargs["generator"] = torch.Generator().manual_seed(seed)
    fast = tensor_batches_or_none(dataset, kwargs, net.device_, kwargs.get("generator"))
    if fast is None:
        fast = row_batches_or_none(dataset, kwargs, net.device_, kwargs.get("generator"))
    if fast is not None:
        return fast
    return (net.iterator_train if training else net.iterator_valid)(dataset, **kwargs)


def forward_in_batches(module, X, device, batch_size=None):
    """Physical outputs (float64 ndarray) of a ``TargetStandardizedModule`` for ``X``, ``batch_size`` rows at once.

    Default: 1024 rows on CPU (activations stay in cache: a 37,625-voxel
    slice through the paper's network took 0.85 s against 1.23 s with 65,536
    on 2 cores), 65,536 on CUDA.
    """
    if batch_size is None:
        batch_size = 1024 if device.type == "cpu" else 65536
    bs = int(batch_size)
    if bs < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    module.eval()
    outs = []
    with torch.inference_mode():
        for i in range(0, X.shape[0], bs):
            xb = torch.as_tensor(X[i: i + bs], dtype=torch.float32, device=device)
            outs.append(module.to_physical(module(xb)).cpu())
    if not outs:
        return np.zeros((0, int(module.mean.shape[0])))
    return torch.cat(outs).numpy().astype(np.float64, copy=False)


def default_threads():
    """Default torch CPU threads for training: 1.

    Measured (``benchmarks/bench_training_throughput.py``) for the 256-wide
    MLPs of this package, batch 512-1024: a second thread gains little on an
    idle machine, while on a loaded 2-core machine 2 threads slowed a fit
    about 10x (threads spin-waiting for each other); one thread degrades in
    proportion to the load. ``SKLEARN_CRB_TORCH_THREADS`` overrides it.
    """
    env = os.environ.get("SKLEARN_CRB_TORCH_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"SKLEARN_CRB_TORCH_THREADS must be a positive integer, got {env!r}") from None
        if n >= 1:
            return n
        raise ValueError(f"SKLEARN_CRB_TORCH_THREADS must be a positive integer, got {env!r}")
    return 1


def net_threads(net):
    """torch CPU threads of a net's ``fit``/``predict`` (``n_threads``; None off the CPU or for torch's setting)."""
    if net.device_.type != "cpu" or net.n_threads is None:
        return None
    return default_threads() if net.n_threads == "auto" else int(net.n_threads)


@contextmanager
def torch_threads(n):
    """Run the block with ``torch.set_num_threads(n)`` (None: unchanged), then restore.

    torch's thread count is process-wide: nets fitted concurrently in threads
    with different settings see each other's; the count only changes speed.
    """
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    if old != n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        if old != n:
            torch.set_num_threads(old)
