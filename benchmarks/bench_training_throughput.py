"""Training throughput of ``CRBNetRegressor`` against a plain torch loop (issue 9: within 1.3x).

Both train the same module (MLP 256-256-128, BatchNorm, ReLU, "l2" input), the
same CRB-weighted loss on standardised targets and the same per-batch fresh
M0/noise augmentation, on 16,000 noise-free samples for 10 epochs, batch 1024,
Adam, no validation split, ``--threads`` torch threads. The plain loop weights
the loss at the true parameters, so the comparison runs
``CRBNetRegressor(crb_at="truth")``; the ``auto (s)`` column is the default
``crb_at="auto"``, whose one-off fit of the log-CRB surrogate (``n/4`` Adam
steps, at most 3,000) does not grow with the epochs. Each time is the best of
3 repeats (1 with ``--quick``, on 2,000 samples for 2 epochs). Writes
``training_throughput.json`` and ``.png`` under ``--out``.

    python benchmarks/bench_training_throughput.py [--threads 2] [--device cuda]
"""

from __future__ import annotations

import time

import numpy as np
import torch
from _harness import parser, start, table

from sklearn_crb import CRBNetRegressor
from sklearn_crb.estimators.network import MLP
from sklearn_crb.simulator import apply_m0_and_noise, crb_gain, draw_m0_and_noise

HIDDEN, RANK, BATCH = (256, 256, 128), 13, 1024
SNR, SIGMA = (10.0, 100.0), 0.01


def data(n, seed=0):
    """Synthetic smooth features (the loop cost does not depend on the physics)."""
    rng = np.random.default_rng(seed)
    y = np.column_stack([rng.uniform(0, 0.35, n), rng.uniform(0.2, 1.6, n), rng.uniform(0.5, 40, n)])
    k = np.arange(1, RANK + 1)
    c = np.exp(1j * np.outer(y[:, 1], k)) * (1 + y[:, [0]]) / (1 + np.outer(y[:, 2] / 40, k))
    X = np.hstack([c.real, c.imag])
    crb = 1e-4 * (1 + rng.uniform(size=(n, 3)))
    return X, y, crb


def plain_loop(X, y, crb, device, epochs):
    torch.manual_seed(0)
    n = len(X)
    model = MLP(2 * RANK, 3, hidden=HIDDEN, normalization="l2", batch_norm=True, activation="relu").to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    m, s = y.mean(0), y.std(0)  # the regressor's target standardisation
    Xt = torch.as_tensor(X, dtype=torch.float32, device=device)
    Yt = torch.as_tensor((y - m) / s, dtype=torch.float32, device=device)
    Wt = torch.as_tensor(s**2 / crb, dtype=torch.float32, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(n, device=device, generator=gen)
        for i in range(0, n, BATCH):
            j = order[i: i + BATCH]
            M0, noise = draw_m0_and_noise(gen, j.numel(), RANK, SNR, SIGMA)
            xb = apply_m0_and_noise(Xt[j], M0, noise)
            wb = Wt[j] * crb_gain(M0, SIGMA).to(torch.float32)[:, None]
            opt.zero_grad()
            loss = torch.mean(wb * (model(xb) - Yt[j]) ** 2)
            loss.backward()
            opt.step()
    return time.perf_counter() - t0


def regressor(X, y, crb, device, epochs, crb_at="truth"):
    net = CRBNetRegressor(module=MLP, module__hidden=HIDDEN, module__normalization="l2", module__batch_norm=True,
                          module__activation="relu", optimizer=torch.optim.Adam, lr=1e-3, weight_decay=None,
                          lr_schedule=None, head=None, batch_size=BATCH, max_epochs=epochs, train_split=None,
                          augment=True, snr=SNR, sigma=SIGMA, n_threads=None, random_state=0, device=device,
                          crb_at=crb_at)
    t0 = time.perf_counter()
    net.fit(X, y, crb=crb)
    return time.perf_counter() - t0


def figure(run, row, n, epochs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar([0, 1, 2], [row["plain_s"], row["crbnet_s"], row["crbnet_auto_s"]])
    ax.set_xticks([0, 1, 2], ["plain torch loop", "CRBNetRegressor", "crb_at='auto'"])
    ax.set_ylabel(f"seconds for {epochs} epochs x {n}")
    fig.tight_layout()
    run.save_figure(fig, dpi=120)


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    args = p.parse_args(argv)
    run = start("training_throughput", "Training time of CRBNetRegressor against a plain torch loop", args, argv)
    n, epochs, repeats = (2000, 2, 1) if args.quick else (16_000, 10, 3)
    X, y, crb = data(n, args.seed)
    plain = min(plain_loop(X, y, crb, args.device, epochs) for _ in range(repeats))
    net = min(regressor(X, y, crb, args.device, epochs) for _ in range(repeats))
    auto = regressor(X, y, crb, args.device, epochs, crb_at="auto")
    threads = torch.get_num_threads()
    row = {"threads": threads, "device": args.device, "plain_s": plain, "crbnet_s": net, "ratio": net / plain,
           "crbnet_auto_s": auto}
    tables = [table(f"{epochs} epochs of {n} samples, batch {BATCH}, MLP {HIDDEN}",
                    ["threads", "device", "plain (s)", "CRBNet (s)", "ratio", "auto (s)"],
                    [[threads, args.device, plain, net, net / plain, auto]],
                    f"best of {repeats}; target ratio <= 1.3")]
    doc = run.write(tables, {"n_samples": n, "epochs": epochs, "batch_size": BATCH, "hidden": HIDDEN, "rank": RANK,
                             "repeats": repeats, "row": row})
    figure(run, row, n, epochs)
    return doc


if __name__ == "__main__":
    main()
