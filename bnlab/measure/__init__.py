"""Probes on any nn.Module; each module's docstring states its definition and its cost in passes."""
from bnlab.measure._util import is_batchnorm
from bnlab.measure.activations import LayerActivations, record_activations
from bnlab.measure.drift import covariate_shift, moment_drift, percentile_drift, percentile_trace

__all__ = [
    "LayerActivations",
    "covariate_shift",
    "is_batchnorm",
    "moment_drift",
    "percentile_drift",
    "percentile_trace",
    "record_activations",
]
