"""Running quantized layers: `QuantLinear` with its scheme, kernels registered per scheme, dispatch,
the autograd function and the custom op, and the model surgery that swaps layers in and out."""

from . import activations, kernels  # noqa: F401  (activations: register the quantizers)
from .dispatch import linear
from .quant_linear import QuantLinear
from .scheme import ActivationQuantizer, ActivationSpec, Scheme, get_activation, register_activation

__all__ = ["ActivationQuantizer", "ActivationSpec", "QuantLinear", "Scheme", "get_activation", "kernels", "linear",
           "register_activation"]
