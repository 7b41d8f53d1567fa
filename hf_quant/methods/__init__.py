"""Quantization methods: one module each, registered in one registry (see `base.py`)."""

from .base import (BlockContext, Method, Options, accumulate_hessian, available_methods, get_method, hessian,
                   methods_taking, option, option_fields, register_method)

from . import awq, bitnet, gptq, llm_int8, omniquant, onebit, rtn, w8a8  # noqa: E402,F401  (register the methods)

__all__ = ["BlockContext", "Method", "Options", "accumulate_hessian", "available_methods", "get_method", "hessian",
           "methods_taking", "option", "option_fields", "register_method"]
