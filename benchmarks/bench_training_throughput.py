"""Training throughput of ``CRBNetRegressor`` against a plain torch loop (issue 9: within 1.3x).

Both train the same module (MLP 256-256-128, BatchNorm, ReLU, "l2" input), the
same CRB-weighted loss on standardised targets and the same per-batch fresh
M0/noise augmentation, on 16,000 noise-free samples for 10 epochs, batch 1024,
Adam, no validation split, 1 torch thread (``--threads`` to change it). The
plain loop weights the loss at the true parameters, so the comparison runs
``CRBNetRegressor(crb_at="truth")``; the ``auto (s)`` column is the default
``crb_at="auto"``, whose one-off fit of the log-CRB surrogate (``n/4`` Adam
steps, at most 3,000) does not grow with the epochs. Writes
``benchmarks/results/training_throughput.json`` and ``.png`` and prints a table.

    OMP_NUM_THREADS=1 python benchmarks/bench_training_throughput.py [--threads 1 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from sklearn_crb.estimators._training import target_scaling
from sklearn_crb.estimators.network import MLP
from sklearn_crb.estimators.regressor import CRBNetRegressor
from sklearn_crb.simulator import apply_m0_and_noise, crb_gain, draw_m0_and_noise
from _results import save_figure, write_json

N, EPOCHS, BATCH, HIDDEN, RANK = 16_000, 10, 1024, (256, 256, 128), 13
SNR, SIGMA = (10.0, 100.0), 0.01


def data(seed=0):
    """Synthetic smooth features (the loop cost does not depend on the physics)."""
    rng = np.random.default_rng(seed)
    y = np.column_stack([rng.uniform(0, 0.35, N), rng.uniform(0.2, 1.6, N), rng.uniform(0.5, 40, N)])
    k = np.arange(1, RANK + 1)
    c = np.exp(1j * np.outer(y[:, 1], k)) * (1 + y[:, [0]]) / (1 + np.outer(y[:, 2] / 40, k))
    X = np.hstack([c.real, c.imag])
    crb = 1e-4 * (1 + rng.uniform(size=(N, 3)))
    return X, y, crb


def plain_loop(X, y, crb, device):
    torch.manual_seed(0)
    model = MLP(2 * RANK, 3, hidden=HIDDEN, normalization="l2", batch_norm=True, activation="relu").to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    m, s = target_scaling(y)
    Xt = torch.as_tensor(X, dtype=torch.float32, device=device)
    Yt = torch.as_tensor((y - m) / s, dtype=torch.float32, device=device)
    Wt = torch.as_tensor(s**2 / crb, dtype=torch.float32, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(EPOCHS):
        order = torch.randperm(N, device=device, generator=gen)
        for i in range(0, N, BATCH):
            j = order[i: i + BATCH]
            M0, noise = draw_m0_and_noise(gen, j.numel(), RANK, SNR, SIGMA)
            xb = apply_m0_and_noise(Xt[j], M0, noise)
            wb = Wt[j] * crb_gain(M0, SIGMA).to(torch.float32)[:, None]
            opt.zero_grad()
            loss = torch.mean(wb * (model(xb) - Yt[j]) ** 2)
            loss.backward()
            opt.step()
    return time.perf_counter() - t0


def regressor(X, y, crb, device, crb_at="truth"):
    net = CRBNetRegressor(module=MLP, module__hidden=HIDDEN, module__normalization="l2", module__batch_norm=True,
                          module__activation="relu", optimizer=torch.optim.Adam, lr=1e-3, weight_decay=None,
                          lr_schedule=None, head=None, batch_size=BATCH, max_epochs=EPOCHS, train_split=None,
                          augment=True, snr=SNR, sigma=SIGMA, n_threads=None, random_state=0, device=device,
                          crb_at=crb_at)
    t0 = time.perf_counter()
    net.fit(X, y, crb=crb)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    X, y, crb = data()
    rows = []
    for n in args.threads:
        torch.set_num_threads(n)
        plain = min(plain_loop(X, y, crb, args.device) for _ in range(args.repeats))
        net = min(regressor(X, y, crb, args.device) for _ in range(args.repeats))
        auto = regressor(X, y, crb, args.device, crb_at="auto")
        rows.append({"threads": n, "device": args.device, "plain_s": plain, "crbnet_s": net, "ratio": net / plain,
                     "crbnet_auto_s": auto})
    print(f"{'threads':>7} {'device':>6} {'plain (s)':>10} {'CRBNet (s)':>11} {'ratio':>6} {'auto (s)':>9}")
    for r in rows:
        print(f"{r['threads']:>7} {r['device']:>6} {r['plain_s']:>10.2f} {r['crbnet_s']:>11.2f} {r['ratio']:>6.2f} "
              f"{r['crbnet_auto_s']:>9.2f}")
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    meta = {"n_samples": N, "epochs": EPOCHS, "batch_size": BATCH, "hidden": HIDDEN, "rank": RANK,
            "torch": torch.__version__, "rows": rows}
    write_json(out / "training_throughput.json", meta, indent=2)
    try:  # matplotlib is optional: only the figure needs it
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5, 3))
    lab = [f"{r['threads']} thr" for r in rows]
    xs = np.arange(len(rows))
    ax.bar(xs - 0.2, [r["plain_s"] for r in rows], 0.4, label="plain torch loop")
    ax.bar(xs + 0.2, [r["crbnet_s"] for r in rows], 0.4, label="CRBNetRegressor")
    ax.set_xticks(xs, lab)
    ax.set_ylabel(f"seconds for {EPOCHS} epochs x {N}")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, out / "training_throughput.png", dpi=120)


if __name__ == "__main__":
    main()
