"""The installed hf_quant version (written into the provenance of every quantized model)."""

__version__ = "0.1.0"
