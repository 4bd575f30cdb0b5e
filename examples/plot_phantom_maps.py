"""
Parameter, standard-error and residual maps of a brain phantom
==============================================================

Simulate the 2-D brain phantom through the built-in sequence and a rank-13
basis, train a small CRB-loss network, and turn the coefficient image into
maps with :func:`sklearn_crb.fit_maps`: the estimates, their standard
errors (the network's own, by the delta method; ``se="crb"`` gives sqrt(CRB)
at the estimate), the relative residual and the flag map.
"""

import matplotlib.pyplot as plt
import numpy as np

from sklearn_crb import CRBNetRegressor, MTFingerprintSimulator, Sequence
from sklearn_crb.maps import fit_maps
from sklearn_crb.estimators.network import MLP
from sklearn_crb.phantom import make_phantom

# %%
# A simulator fixes the sequence, the basis and what is estimated; the
# network trains with fresh noise and M0 every epoch (the paper's scheme).
seq = Sequence.default()
sim = MTFingerprintSimulator(seq, n_components=13, estimate=("m0s", "R1f", "R2f"), n_basis_samples=500,
                             random_state=0).fit()
net = CRBNetRegressor(MLP, module__hidden=(128, 128), simulator=sim, max_epochs=30, lr=3e-3, batch_size=256,
                      random_state=0, device="cpu")
net.fit_simulated(1500)

# %%
# The phantom: WM, GM and CSF with smooth B0 and B1 fields, SNR 50.
ph = make_phantom((40, 40), seq, basis=sim, snr=50, random_state=1)
maps = fit_maps(net, ph.coefficients, progress=True)
print(f"noise level estimated from the residuals: {maps['sigma']:.4f} (true {ph.sigma:.4f})")

# %%
# Estimates, standard errors and the relative residual.
fig, axes = plt.subplots(2, 4, figsize=(13, 6))
for j, p in enumerate(("m0s", "R1f", "R2f")):
    axes[0, j].imshow(maps[p]), axes[0, j].set_title(p)
    axes[1, j].imshow(maps[p + "_se"]), axes[1, j].set_title(f"std. error {p}")
axes[0, 3].imshow(ph.parameter_map("m0s")), axes[0, 3].set_title("true m0s")
axes[1, 3].imshow(maps.arrays["relative_residual"]), axes[1, 3].set_title("relative residual")
for ax in axes.ravel():
    ax.axis("off")
fig.tight_layout()
plt.show()
