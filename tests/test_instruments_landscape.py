"""measure.ics (Santurkar et al. 2018, Def. 2.1) and measure.along_gradient (Sec. 3.2, Figs. 4, 10, 11).

Oracles: hand computations in NumPy float64 (two-layer linear net, the quadratic ½ wᵀAw in closed
form), central finite differences on a small BN network, and exact equality for zero learning rates.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import bnlab
from bnlab.measure import along_gradient, ics, santurkar_grid
from bnlab.norm import convert

# ---------------------------------------------------------------------------------------------
# ICS


def bn_mlp(kind="bnlab"):
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(5, 6), bnlab.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 6), bnlab.BatchNorm1d(6),
                        nn.Tanh(), nn.Linear(6, 3)).double()
    return convert(net, to="torch") if kind == "torch" else net


def mse(out, y):
    return 0.5 * ((out - y) ** 2).sum(dim=1).mean()


@pytest.mark.parametrize("kind", ["bnlab", "torch"])
def test_ics_zero_lr_before_layer_gives_identical_gradient(kind):
    """D.7: with the layers before i frozen (zero learning rate), G' = G exactly."""
    net = bn_mlp(kind)
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    for i, (name, before) in enumerate([("3", ["0", "1"]), ("6", ["0", "1", "3", "4"])]):
        frozen = [p for n, p in net.named_parameters() if n.split(".")[0] in before]
        rest = [p for n, p in net.named_parameters() if n.split(".")[0] not in before]
        opt = torch.optim.SGD([{"params": frozen, "lr": 0.0}, {"params": rest, "lr": 0.5}], lr=0.5, momentum=0.9)
        r = ics(net, mse, (x, y), [name], update=opt)
        assert r.l2[0] == 0.0 and r.cosine[0] == pytest.approx(1.0, abs=1e-15) and r.n_before[0] == len(frozen)
        assert r.grad_norm[0] == r.grad_norm_after[0] > 0
    r = ics(net, mse, (x, y), ["0", "3", "6"], update=0.0)  # plain SGD with lr 0
    assert np.all(r.l2 == 0.0)
    r = ics(net, mse, (x, y), ["0", "3", "6"], update=0.5)  # and with a real step, G' != G after layer 1
    assert r.l2[0] == 0.0 and r.n_before[0] == 0 and np.all(r.l2[1:] > 1e-3) and np.all(r.n_before[1:] > 0)


def _two_layer_hand(W1, W2, X, Y, lr, buf1=None, mom=0.0):
    """L = 1/(2N) ||W2 W1 X - Y||_F^2, X (d, N): gradients by hand; W1 takes its (momentum) SGD step."""
    N = X.shape[1]
    R = W2 @ W1 @ X - Y
    G2 = R @ (W1 @ X).T / N
    G1 = W2.T @ R @ X.T / N
    step = G1 if buf1 is None else mom * buf1 + G1
    W1n = W1 - lr * step
    G2p = (W2 @ W1n @ X - Y) @ (W1n @ X).T / N
    return G2, G2p


def test_ics_two_layer_linear_net_matches_hand_computation():
    rng = np.random.default_rng(0)
    W1, W2 = rng.normal(size=(4, 3)), rng.normal(size=(2, 4))
    X, Y = rng.normal(size=(3, 10)), rng.normal(size=(2, 10))
    net = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.from_numpy(W1))
        net[1].weight.copy_(torch.from_numpy(W2))
    batch = (torch.from_numpy(X.T.copy()), torch.from_numpy(Y.T.copy()))

    G2, G2p = _two_layer_hand(W1, W2, X, Y, lr=0.3)
    r = ics(net, mse, batch, ["0", "1"], update=0.3)
    assert r.l2[0] == 0.0
    assert r.l2[1] == pytest.approx(np.linalg.norm(G2 - G2p), rel=1e-12)
    assert r.cosine[1] == pytest.approx(np.sum(G2 * G2p) / np.linalg.norm(G2) / np.linalg.norm(G2p), rel=1e-12)
    assert r.grad_norm[1] == pytest.approx(np.linalg.norm(G2), rel=1e-12)

    # momentum SGD: the optimizer's momentum buffer enters W1's update exactly
    opt = torch.optim.SGD(net.parameters(), lr=0.3, momentum=0.9)
    with torch.no_grad():
        buf = rng.normal(size=(4, 3))
    opt.state[net[0].weight]["momentum_buffer"] = torch.from_numpy(buf)
    opt.state[net[1].weight]["momentum_buffer"] = torch.zeros(2, 4, dtype=torch.float64)
    G2, G2p = _two_layer_hand(W1, W2, X, Y, lr=0.3, buf1=buf, mom=0.9)
    r = ics(net, mse, batch, ["1"], update=opt)
    assert r.l2[0] == pytest.approx(np.linalg.norm(G2 - G2p), rel=1e-12)
    assert torch.equal(opt.state[net[0].weight]["momentum_buffer"], torch.from_numpy(buf))  # untouched

    # a custom update function (here: SGD with lr 0.3 written out)
    r2 = ics(net, mse, batch, {"second": "1"}, update=lambda w, g: {n: w[n] - 0.3 * g[n] for n in w})
    G2, G2p = _two_layer_hand(W1, W2, X, Y, lr=0.3)
    assert r2.layers == ("second",) and r2.l2[0] == pytest.approx(np.linalg.norm(G2 - G2p), rel=1e-12)


def test_ics_layers_before_follow_the_execution_order():
    """Modules registered in one order but called in another: 'before' is the call order."""
    class Swapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.late = nn.Linear(4, 2, bias=False)
            self.early = nn.Linear(3, 4, bias=False)

        def forward(self, x):
            return self.late(self.early(x))

    torch.manual_seed(0)
    net = Swapped().double()
    batch = (torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64))
    r = ics(net, mse, batch, ["early", "late"], update=0.3)
    assert list(r.n_before) == [0, 1] and r.l2[0] == 0.0 and r.l2[1] > 0


def test_ics_before_is_the_order_of_first_use_of_each_parameter():
    """A parameter the parent module owns and uses after its children (a LayerScale gamma, a root-level
    temperature) is not "before" those children, and a layer BN follows is before it: an update that
    moves only parameters used after 'inp' and 'block.fc' leaves their G' equal to G; one that moves
    'inp' changes G' of 'block.fc' by the hand-computed amount (a fresh functional_call oracle)."""
    class LayerScale(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.fc = nn.Linear(d, d)
            self.gamma = nn.Parameter(torch.full((d,), 0.5))

        def forward(self, x):
            return x + self.gamma * torch.tanh(self.fc(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(4, 6)
            self.block = LayerScale(6)
            self.out = nn.Linear(6, 3)
            self.temperature = nn.Parameter(torch.tensor(2.0))  # owned by the root, used last

        def forward(self, x):
            return self.out(self.block(torch.tanh(self.inp(x)))) / self.temperature

    torch.manual_seed(0)
    net = Net().double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    lf = nn.functional.cross_entropy
    late = ("block.gamma", "temperature", "out.weight", "out.bias")

    def only_late(w, g):
        return {n: w[n] - 0.5 * g[n] if n in late else w[n] for n in w}

    r = ics(net, lf, (x, y), ["inp", "block.fc"], update=only_late)
    assert list(r.n_before) == [0, 2] and list(r.l2) == [0.0, 0.0]

    # moving 'inp' (used before block.fc): G' of block.fc.weight by an independent functional_call
    def only_inp(w, g):
        return {n: w[n] - 0.5 * g[n] if n.startswith("inp.") else w[n] for n in w}

    r = ics(net, lf, (x, y), ["block.fc"], update=only_inp)
    params = dict(net.named_parameters())
    g = torch.autograd.grad(lf(net(x), y), list(params.values()))
    moved = {n: (p - 0.5 * gi if n.startswith("inp.") else p).detach().requires_grad_(True)
             for (n, p), gi in zip(params.items(), g)}
    g1 = torch.autograd.grad(lf(torch.func.functional_call(net, moved, (x,)), y), [moved["block.fc.weight"]])[0]
    g0 = g[list(params).index("block.fc.weight")]
    assert r.l2[0] == pytest.approx(float((g0 - g1).norm()), rel=1e-12) and r.l2[0] > 1e-4


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, maximize=True),
    lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5, centered=True),
    lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
], ids=["sgd-nesterov", "adam-amsgrad", "adamw-maximize", "rmsprop-centered", "adagrad"])
def test_ics_update_is_the_optimizers_next_step(make_opt):
    """W^(t+1) of an optimizer equals the real next step of a deep copy of model and optimizer (state
    after two steps: momentum buffers, Adam's moments and step counts), bit for bit; the optimizer,
    its state and the gradients given are left untouched."""
    from bnlab.measure.ics import _optimizer_step

    net = bn_mlp()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    opt = make_opt(net.parameters())
    for _ in range(2):
        opt.zero_grad()
        mse(net(x), y).backward()
        opt.step()
    names = [n for n, _ in net.named_parameters()]
    grads = dict(zip(names, torch.autograd.grad(mse(net(x), y), list(net.parameters()))))
    w = {n: p.detach() for n, p in net.named_parameters()}
    before = copy.deepcopy(opt.state_dict())
    grads_before = {n: g.clone() for n, g in grads.items()}
    new = _optimizer_step(opt, net, w, grads)
    ref_net, ref_opt = copy.deepcopy((net, opt))
    for p, n in zip(ref_net.parameters(), names):
        p.grad = grads[n].clone()
    ref_opt.step()
    for n, p in ref_net.named_parameters():
        assert torch.equal(new[n], p.detach()), n
    after = opt.state_dict()
    for k, st in before["state"].items():
        for key, v in st.items():
            assert torch.equal(torch.as_tensor(after["state"][k][key]), torch.as_tensor(v)), (k, key)
    assert all(torch.equal(grads[n], grads_before[n]) for n in names)


# ---------------------------------------------------------------------------------------------
# along the gradient: the quadratic ½ wᵀAw in closed form


class Quadratic(nn.Module):
    def __init__(self, A: np.ndarray, w: np.ndarray):
        super().__init__()
        self.register_buffer("A", torch.from_numpy(A))
        self.w = nn.Parameter(torch.from_numpy(w.copy()))

    def forward(self, x):
        return 0.5 * self.w @ self.A @ self.w


def _value(out, y):
    return out


def test_along_gradient_quadratic_closed_forms():
    rng = np.random.default_rng(3)
    M = rng.normal(size=(6, 6))
    A = M @ M.T / 6 + np.diag(np.arange(6.0))  # symmetric positive definite
    w = rng.normal(size=6)
    etas = np.array([0.01, 0.05, 0.2, 0.5, 1.0])
    res = along_gradient(Quadratic(A, w), _value, (torch.zeros(2, 1), torch.zeros(2)), etas)
    g = A @ w
    L0, gg, gAg, Ag = 0.5 * w @ A @ w, g @ g, g @ A @ g, np.linalg.norm(A @ g)
    losses = L0 - etas * gg + 0.5 * etas ** 2 * gAg  # L(w - eta g), exactly, for a quadratic
    np.testing.assert_allclose(res.losses, losses, rtol=1e-12)
    assert res.loss_band == pytest.approx((losses.min(), losses.max()), rel=1e-12)
    np.testing.assert_allclose(res.grad_change, etas * Ag, rtol=1e-12)  # g - g_eta = eta A g
    assert res.predictiveness_band == pytest.approx((etas.min() * Ag, etas.max() * Ag), rel=1e-12)
    # effective beta: ||A g|| / ||g|| at every eta, which is >= the curvature g'Ag/||g||^2 ...
    np.testing.assert_allclose(res.beta, Ag / np.sqrt(gg), rtol=1e-12)
    assert res.effective_beta == pytest.approx(Ag / np.sqrt(gg), rel=1e-12)
    assert res.effective_beta > gAg / gg * (1 + 1e-3)
    assert res.grad_norm == pytest.approx(np.sqrt(gg), rel=1e-12) and res.loss0 == pytest.approx(L0, rel=1e-12)
    # ... with equality when g is an eigenvector of A: then it is the curvature along g (= that eigenvalue)
    lam, V = np.linalg.eigh(A)
    res = along_gradient(Quadratic(A, 2.0 * V[:, 4]), _value, (torch.zeros(2, 1), torch.zeros(2)), etas)
    g = A @ (2.0 * V[:, 4])
    assert res.effective_beta == pytest.approx(g @ A @ g / (g @ g), rel=1e-10)
    assert res.effective_beta == pytest.approx(lam[4], rel=1e-10)
    assert res.n_params == 6 and res.cost.forward == 1 + len(etas)


def _fd_grad(f, w, h=1e-6):
    g = np.zeros_like(w)
    for i in range(w.size):
        e = np.zeros_like(w)
        e[i] = h
        g[i] = (f(w + e) - f(w - e)) / (2 * h)
    return g


@pytest.mark.parametrize("kind", ["bnlab", "torch"])
def test_along_gradient_small_bn_net_matches_finite_differences(kind):
    """∇L(w - ηg) by central finite differences of the loss of a deep copy (BN in training mode)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), bnlab.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    net = convert(net, to="torch") if kind == "torch" else net
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randn(12, 2, dtype=torch.float64)
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).numpy()

    m = copy.deepcopy(net).train()  # training-mode BN ignores the running statistics it updates

    def loss_of(wflat):
        i = 0
        with torch.no_grad():
            for n, s in zip(names, shapes):
                k = int(np.prod(s))
                m.get_parameter(n).copy_(torch.from_numpy(wflat[i:i + k]).view(s))
                i += k
            return float(mse(m(x), y))

    g = _fd_grad(loss_of, w0)
    etas = santurkar_grid(0.1, (0.5, 4.0))
    res = along_gradient(net, mse, (x, y), etas)
    assert res.grad_norm == pytest.approx(np.linalg.norm(g), rel=1e-7)
    for j, eta in enumerate(etas):
        w_eta = w0 - eta * np.asarray(g)
        g_eta = _fd_grad(loss_of, w_eta)
        assert res.losses[j] == pytest.approx(loss_of(w_eta), rel=1e-8)
        assert res.grad_change[j] == pytest.approx(np.linalg.norm(g - g_eta), rel=1e-6)
        assert res.beta[j] == pytest.approx(np.linalg.norm(g - g_eta) / (eta * np.linalg.norm(g)), rel=1e-6)
