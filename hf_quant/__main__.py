"""`python -m hf_quant ...` is the `hf-quant` command line."""

from .cli import main

main()
