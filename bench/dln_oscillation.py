"""Is the standard DLN at LR 1e-6 oscillating? (Santurkar Fig. 3b, the D.14a evidence.)

Trains the standard 25-layer DLN (summed loss, full batch, LR 1e-6, float64) for 3000 steps with A's
entries N(0, s^2) (s = argv[1], default 1) and prints, at a few steps, the loss, the cosine between
layer #17's gradients at consecutive steps (-1: the gradient flips sign every step, a period-2
oscillation) and the ICS cosine of layers #9 and #17 (Def. 2.1). ``python bench/dln_oscillation.py 1``
and ``... 0.316`` compare the paper's stated A ~ N(0, 1) with unit-variance targets.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from bnlab.data import make_gaussian_regression
from bnlab.measure import ics
from bnlab.models import build_model


def main() -> None:
    scale = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
    torch.set_num_threads(1)
    x, y, a = make_gaussian_regression(n=1000, dim=10, seed=0)
    y = y * scale
    torch.manual_seed(0)
    model = build_model("dln", norm="none", in_shape=(10,), num_classes=10, depth=25).double()
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)

    def loss_fn(out, target):
        return torch.nn.functional.mse_loss(out, target, reduction="sum")

    prev = None
    for step in range(3001):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        g17 = model.fc17.weight.grad.detach().clone().flatten()
        if step in (100, 1000, 2000, 3000) or 2990 <= step < 2996:
            cos = float(g17 @ prev / (g17.norm() * prev.norm()))
            r = ics(model, loss_fn, (x, y), ["fc9", "fc17"], update=1e-6)
            print(f"step {step}: loss {float(loss):.6g}, cos(g17_t, g17_t-1) {cos:+.3f}, "
                  f"ICS cosine fc9/fc17 {np.round(r.cosine, 3)}", flush=True)
        prev = g17
        opt.step()


if __name__ == "__main__":
    main()
