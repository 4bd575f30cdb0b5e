"""GPU readiness: training throughput, torch-backend physics, NLLS from a network, and CPU/GPU agreement.

On one CUDA device (``--device cuda``, the default), in under 5 minutes (``--quick``: under one):

1. training throughput of the default recipe (:func:`sklearn_crb.recipes.make_network`, CRB loss, fresh
   noise per epoch) at a few batch sizes, on fingerprints of the built-in sequence (tied model, brain prior,
   rank-13 SVD basis): samples per second over a short run (first epoch included);
2. the torch backend's fingerprints and Jacobians on the device against the CPU's (the numba kernel where
   installed): voxels per second and the largest relative difference;
3. NLLS started from the network (``NLLSFitter(init=net, device=...)``) on held-out noisy draws: voxels
   per second and convergence;
4. agreement of the CPU and the device: the same trained network's predictions (the weights copied to a CPU
   model through ``save_model``/``load_model``) and the same NLLS fits, as the largest difference in units
   of the CRB's standard deviation.

Without a CUDA device it says so, writes a results file stating "no CUDA device" and exits 0.
``--device cpu`` runs every step on the CPU (a smoke test of this script; its agreement rows compare the
CPU with itself).

    python benchmarks/gpu_check.py [--quick] [--device cuda] [--out DIR]
"""

from __future__ import annotations

import shlex
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
from _harness import parser, start, table

from sklearn_crb.estimators.nlls import NLLSFitter
from sklearn_crb.io.datasets import simulate_dataset
from sklearn_crb.io.models import load_model, save_model
from sklearn_crb.physics.parameters import free_parameters
from sklearn_crb.physics.sequence import Sequence
from sklearn_crb.physics.signal import jacobian, simulate
from sklearn_crb.recipes import make_network
from sklearn_crb.simulator import MTFingerprintSimulator, apply_m0_and_noise

TITLE = "GPU readiness: training throughput, torch physics, NLLS from a network, CPU/GPU agreement"
SIZES = {False: {"n_train": 20000, "epochs": 3, "batches": (512, 2048, 8192), "n_phys": 256, "n_nlls": 64},
         True: {"n_train": 2000, "epochs": 1, "batches": (512, 2048), "n_phys": 16, "n_nlls": 16}}
SNR = 50.0  # |M0|/sigma of the held-out draws


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def throughput(sim, data, device, cfg, seed, log):
    """Samples per second of the default recipe at each batch size (the median epoch, from skorch's history:
    the one-off set-up, such as the CRB surrogate's fit, is in the total seconds only); the last network."""
    rows, net = [], None
    for b in cfg["batches"]:
        # unconditioned: its predictions take the coefficients alone (the noise column costs no throughput)
        net = make_network("crb", sim, epochs=cfg["epochs"], device=str(device), seed=seed, progress=False,
                           batch_size=b, noise_input=False)
        net.set_params(augment=True)
        _, s = _timed(lambda: net.fit(data["X_clean"], data["y"], crb=data["crb_unit"]), device)
        epoch = float(np.median(net.history[:, "dur"]))
        rows.append([b, cfg["epochs"], round(cfg["n_train"] / epoch), round(epoch, 3), round(s, 2)])
        log(f"training, batch {b}: {rows[-1][2]} samples/s per epoch, {s:.1f} s in all")
    return rows, net


def physics(seq, theta, device, log):
    """The torch backend on ``device`` against the CPU default: voxels/s and the largest relative difference."""
    th_dev = torch.as_tensor(theta, device=device)
    rows = []
    for name, fn in (("simulate", simulate), ("jacobian", jacobian)):
        fn(seq, th_dev[:2], backend="torch")  # warm-up (kernels, caches)
        dev_out, s_dev = _timed(lambda: fn(seq, th_dev, backend="torch"), device)
        cpu_out, s_cpu = _timed(lambda: fn(seq, theta), torch.device("cpu"))
        dev_out = dev_out if isinstance(dev_out, tuple) else (dev_out,)
        cpu_out = cpu_out if isinstance(cpu_out, tuple) else (cpu_out,)
        rel = max(float(np.abs(d.cpu().numpy() - c).max() / np.abs(c).max()) for d, c in zip(dev_out, cpu_out))
        rows.append([name, len(theta), round(len(theta) / s_dev, 1), round(len(theta) / s_cpu, 1), rel])
        log(f"{name}: {rows[-1][2]} voxels/s on {device}, {rows[-1][3]} on the CPU, max rel. diff {rel:.2g}")
    return rows


def held_out(sim, n, seed):
    """Noisy features of ``n`` held-out prior draws at ``SNR``, their truth and their CRB."""
    ev = simulate_dataset(sim, n, seed, progress=False, n_jobs=-1)
    rng = np.random.default_rng(seed)
    f = ev["X_clean"].shape[1]
    M0 = sim.sigma * SNR * np.exp(2j * np.pi * rng.uniform(0, 1, n))
    eps = sim.sigma * (rng.standard_normal((n, f // 2)) + 1j * rng.standard_normal((n, f // 2)))
    return apply_m0_and_noise(ev["X_clean"], M0, eps), ev["y"], ev["crb_unit"] / SNR**2


def _nlls(seq, sim, net, device):
    return NLLSFitter(seq, basis=sim.basis_, estimate=sim.estimate_, tied_R1=True, init=net, device=str(device),
                      backend="torch" if device.type != "cpu" else "auto", progress=False).fit()


def agreement(seq, sim, net, device, X, crb, log):
    """Predictions and NLLS fits on the device and on the CPU; differences in units of sqrt(CRB)."""
    with tempfile.TemporaryDirectory() as tmp:
        save_model(net, f"{tmp}/m", simulator=sim)
        cpu_net = load_model(f"{tmp}/m", device="cpu")
        dev_net = load_model(f"{tmp}/m", device=str(device))
    sd = np.sqrt(crb)
    p_dev, p_cpu = np.asarray(dev_net.predict(X)), np.asarray(cpu_net.predict(X))
    pred = float(np.nanmax(np.abs(p_dev - p_cpu) / sd))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unconverged voxels are counted below, not printed per chunk
        f_dev, s_dev = _timed(lambda: np.asarray(_nlls(seq, sim, dev_net, device).predict(X)), device)
        f_cpu, s_cpu = _timed(lambda: np.asarray(_nlls(seq, sim, cpu_net, torch.device("cpu")).predict(X)),
                              torch.device("cpu"))
    ok = np.all(np.isfinite(f_dev), 1) & np.all(np.isfinite(f_cpu), 1)
    fit = float(np.max(np.abs(f_dev[ok] - f_cpu[ok]) / sd[ok])) if ok.any() else float("nan")
    log(f"agreement: predictions {pred:.2g}, NLLS fits {fit:.2g} sqrt(CRB); NLLS {len(X) / s_dev:.1f} voxels/s "
        f"on {device}, {len(X) / s_cpu:.1f} on the CPU")
    nlls_rows = [[str(device), len(X), round(len(X) / s_dev, 2), int(np.all(np.isfinite(f_dev), 1).sum())],
                 ["cpu", len(X), round(len(X) / s_cpu, 2), int(np.all(np.isfinite(f_cpu), 1).sum())]]
    return [["network predictions", len(X), pred], ["NLLS from the network", int(ok.sum()), fit]], nlls_rows


def _no_cuda(run, device):
    msg = f"no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False): nothing measured"
    print(f"gpu_check: {msg}")
    run.write([table(TITLE, ["status"], [[msg]], notes=f"--device {device}")],
              {"cuda": False, "status": "no CUDA device", "device": device})
    return 0


def main(argv=None):
    p = parser(__doc__, threads=None)
    p.add_argument("--device", default="cuda", help="torch device to check (default cuda; cpu: a smoke test)")
    args = p.parse_args(argv)
    run = start("gpu_check", TITLE, args, argv=argv)
    run.command = ("python benchmarks/gpu_check.py " + shlex.join(sys.argv[1:] if argv is None else argv)).strip()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        return _no_cuda(run, args.device)
    device, cfg = torch.device(args.device), SIZES[bool(args.quick)]
    seq = Sequence.default()
    sim = MTFingerprintSimulator(seq, n_components=13, estimate=free_parameters(True), tied_R1=True,
                                 prior="brain", n_basis_samples=300, random_state=args.seed).fit()
    data = simulate_dataset(sim, cfg["n_train"], args.seed, progress=False, n_jobs=-1)  # every CPU core
    run.log(f"{cfg['n_train']} training fingerprints of {seq.n_pulses} pulses")
    train_rows, net = throughput(sim, data, device, cfg, args.seed, run.log)
    phys_rows = physics(seq, sim.prior_.sample(cfg["n_phys"], args.seed + 1), device, run.log)
    X, _, crb = held_out(sim, cfg["n_nlls"], args.seed + 2)
    agree_rows, nlls_rows = agreement(seq, sim, net, device, X, crb, run.log)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    tables = [
        table("Training throughput (default recipe, CRB loss)", ["batch", "epochs", "samples/s", "s/epoch",
                                                                 "s in all"], train_rows,
              notes=f"{cfg['n_train']} samples, {name}"),
        table("Torch-backend physics (voxels/s)", ["function", "voxels", f"{device.type}", "cpu (default)",
                                                   "max rel. diff"], phys_rows),
        table("NLLS from the network", ["device", "voxels", "voxels/s", "finite"], nlls_rows, notes=f"SNR {SNR:g}"),
        table("CPU/device agreement (max |difference| / sqrt(CRB))", ["what", "voxels", "max"], agree_rows),
    ]
    run.write(tables, {"cuda": device.type == "cuda", "device": str(device), "device_name": name,
                       "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
