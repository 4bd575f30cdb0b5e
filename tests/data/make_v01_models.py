"""Rebuild the release-0.1 model folders that tests/test_model_compat.py loads.

Run once with sklearn-crb 0.1.0 (commit 6028fc0): ``python tests/data/make_v01_models.py``.
The folders and ``expected.npz`` (the 0.1 predictions) are committed; later
releases must load them and predict bit-identically.
"""

from pathlib import Path

import numpy as np
import torch

from sklearn_crb import Sequence
from sklearn_crb.estimators.network import MLP
from sklearn_crb.estimators.regressor import CRBNetRegressor
from sklearn_crb.io.models import save_model
from sklearn_crb.simulator import MTFingerprintSimulator

HERE = Path(__file__).resolve().parent / "models_v0.1"


def main():
    torch.set_num_threads(1)
    seq = Sequence.default(n_pulses=120)
    sim = MTFingerprintSimulator(seq, n_components=6, estimate=("m0s", "R1f", "R2f"), random_state=0,
                                 n_basis_samples=200, tied_R1=True).fit()
    X, y, crb = sim.make_dataset(300, 1)
    out = {}
    plain = CRBNetRegressor(MLP, module__hidden=(16, 8), simulator=sim, max_epochs=2, random_state=0,
                            device="cpu").fit(X, y, crb=crb)
    save_model(plain, HERE / "plain", simulator=sim)
    Xt = sim.make_dataset(50, 2)[0]
    out["X"], out["plain"] = Xt, plain.predict(Xt)
    simb = MTFingerprintSimulator(seq, n_components=6, estimate=("m0s", "R1f", "R2f"), random_state=0,
                                  n_basis_samples=200, tied_R1=True, nuisance=("Rex", "T2s", "omega0")).fit()
    meas = CRBNetRegressor(MLP, module__hidden=(16, 8), simulator=simb, measured=("B1",), max_epochs=2,
                           random_state=0, device="cpu").fit_simulated(300)
    save_model(meas, HERE / "measured_b1", simulator=simb)
    b1 = np.linspace(0.8, 1.2, len(Xt))[:, None]
    out["X_b1"] = np.hstack([Xt, b1])
    out["measured_b1"] = meas.predict(out["X_b1"])
    np.savez(HERE / "expected.npz", **out)


if __name__ == "__main__":
    main()
