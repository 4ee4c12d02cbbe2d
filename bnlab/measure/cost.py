"""What a landscape instrument costs, counted as it runs and converted to forward+backward passes.

An instrument counts its work by kind (``Cost``): forward passes over the batch, ordinary backward
passes (one gradient), backward passes that keep their graph (the gradient a Hessian-vector product
differentiates again), double backward passes (one Hessian-vector product each), and the
parameter-length float64 vector work around them: elementwise operations that allocate their result
(a step w - ηg, a gradient difference, a flattening) and the dot products/axpys of Lanczos'
orthogonalization, done as matrix-vector products with its basis. ``CostModel`` says what each kind costs
in "passes", where 1 pass = one plain forward+backward of the model on the batch.

The kinds do not cost the same on every model, so no single set of constants is right for all: on
CPU (torch 2.13, bench/instruments.py) a double backward costs 2.3-3.3 passes on a conv net with BN
(the backward formulas of BN and convolution are themselves differentiated, on large activations)
but 1.6-2.1 on the Ioffe MLP (784-100-100-100-10, batch 60), whose pass time is per-op overhead;
the vector work on that MLP's 89k parameters (a fresh 0.7 MB float64 vector costs page faults)
adds about a third of a pass per step size of ``along_gradient`` and is negligible on the conv net.
``CostModel()`` holds generic constants (from the conv net, where the Hessian instruments are
expensive); ``calibrate_cost`` measures the constants of one model and batch, and every instrument
takes ``cost_model=`` to state its cost with them.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Passes per unit of work of each kind (1 pass = one plain forward+backward).

    forward: a forward pass alone, with the graph the instruments build.
    backward: an ordinary backward (generic: ``1 - forward``; calibrated, the instruments' forward
        and backward may together cost a little more than a plain pass: they swap in cloned buffers).
    graph_backward: a backward that keeps its graph (``create_graph=True``).
    double_backward: one Hessian-vector product's backward through that graph.
    vector_op: one elementwise operation on parameter-length float64 vectors, result freshly allocated.
    basis_dot: one dot product or axpy of parameter-length float64 vectors inside a matrix-vector
        product with a basis of them (Lanczos' orthogonalization), or in place.
    setup: isolating the model once per instrument call (flags, RNG fork, buffer snapshots).
    source: where the numbers come from (``"generic"`` or a description of the calibration).
    """

    forward: float = 1 / 3
    backward: float = 2 / 3
    graph_backward: float = 1.2
    double_backward: float = 3.0
    vector_op: float = 0.0  # generic: not counted (matters only when a pass takes about a millisecond)
    basis_dot: float = 0.0
    setup: float = 0.0
    source: str = "generic (conv net with BN on CPU, bench/instruments.py)"


@dataclasses.dataclass
class Cost:
    """Work done by an instrument, counted as it runs; ``passes`` converts it with ``model``."""

    forward: int = 0  # forward passes over the batch
    backward: int = 0  # ordinary backward passes (one gradient)
    graph_backward: int = 0  # backward passes that keep their graph (for Hessian-vector products)
    double_backward: int = 0  # backward passes through a gradient's graph (one Hessian-vector product each)
    vector_ops: int = 0  # parameter-length float64 elementwise operations with a fresh result
    basis_dots: int = 0  # parameter-length dot products / axpys in products with the Lanczos basis
    setups: int = 0  # isolations of the model (one per instrument call)
    model: CostModel = dataclasses.field(default_factory=CostModel)

    @property
    def passes(self) -> float:
        """Forward+backward equivalents under ``model``: a plain gradient evaluation costs exactly 1."""
        m = self.model
        return (self.forward * m.forward + self.backward * m.backward + self.graph_backward * m.graph_backward
                + self.double_backward * m.double_backward + self.vector_ops * m.vector_op
                + self.basis_dots * m.basis_dot + self.setups * m.setup)

    def as_dict(self) -> dict[str, float | str]:
        return {"forward": self.forward, "backward": self.backward, "graph_backward": self.graph_backward,
                "double_backward": self.double_backward, "vector_ops": self.vector_ops, "basis_dots": self.basis_dots, "setups": self.setups, "passes": self.passes,
                "cost_model": self.model.source}
