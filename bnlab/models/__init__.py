"""Models for the reproductions; every one takes ``norm=`` by name through ``bnlab.norm.factory``.

Where things live:
- ``mlp.py``      ``IoffeMLP``: Ioffe Fig. 1 MNIST MLP (784-100-100-100-10, sigmoid).
- ``vgg.py``      ``VGG``: VGG-11/16 with a width multiplier and Glorot init (Santurkar).
- ``convnet.py``  ``ConvNet``: small conv net, the CPU proxy for Ioffe's BN-Inception (Sec. 4.2).
- ``dln.py``      ``DLN``: Santurkar's 25-layer deep linear network.
- ``registry.py`` ``build_model`` / ``MODELS``: models by name for experiment configs.
- ``_base.py``    the shared layout: a flat chain of named layers and the three probe views
  ``weight_layers()``, ``norm_layers()``, ``nonlinearity_inputs()``.
"""

from bnlab.models._base import LayeredModel, uses_norm
from bnlab.models.convnet import ConvNet
from bnlab.models.dln import DLN
from bnlab.models.mlp import IoffeMLP
from bnlab.models.registry import MODELS, ModelSpec, build_model
from bnlab.models.vgg import VGG

__all__ = [
    "DLN",
    "MODELS",
    "VGG",
    "ConvNet",
    "IoffeMLP",
    "LayeredModel",
    "ModelSpec",
    "build_model",
    "uses_norm",
]
