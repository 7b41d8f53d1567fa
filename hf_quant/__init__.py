"""hf_quant: post-training quantization for HuggingFace transformers.

`import hf_quant` registers `QuantConfig` and its quantizer with transformers under the
quant_method "hf_quant", so that `from_pretrained(..., quantization_config=hf_quant.QuantConfig(...))`
quantizes, and `from_pretrained(path)` reloads an hf_quant checkpoint.

Layers (README "Architecture"; tests/test_architecture.py enforces them): core, compat -> methods ->
config -> runtime -> io -> training -> calibration -> integrations -> this package's API and CLI.
"""

from transformers.quantizers import register_quantization_config

from .config import FORMAT_VERSION, QUANT_METHOD, QuantConfig
from .core import LayerSpec
from .runtime import QuantLinear, kernels
from .version import __version__

register_quantization_config(QUANT_METHOD)(QuantConfig)

from . import eval, training  # noqa: E402
from .integrations.hub import push_to_hub  # noqa: E402
from .integrations.lora_merge import merge_lora  # noqa: E402
from .integrations.peft import register_lora  # noqa: E402
from .integrations.transformers import HfQuantQuantizer, quantize  # noqa: E402
from .io.bitnet import export_bitnet, import_bitnet  # noqa: E402
from .io.bnb import export_bnb8, import_bnb8  # noqa: E402
from .io.gguf import export_gguf, import_gguf  # noqa: E402
from .io.gptq import export_gptq, import_gptq  # noqa: E402
from .io.onnx import export_onnx  # noqa: E402
from .streaming import quantize_checkpoint  # noqa: E402

__all__ = ["FORMAT_VERSION", "HfQuantQuantizer", "LayerSpec", "QuantConfig", "QuantLinear", "eval", "export_bitnet", "export_bnb8",
           "export_gguf", "export_gptq", "export_onnx", "import_bitnet", "import_bnb8", "import_gguf", "import_gptq", "kernels", "merge_lora", "push_to_hub", "quantize", "quantize_checkpoint", "register_lora", "training",
           "__version__"]
