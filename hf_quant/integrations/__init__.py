"""Glue to the libraries around hf_quant: transformers (the quantizer, `quantize`), the Hub (atomic
saves, model card, push_to_hub) and PEFT (hf_quant's LoRA layer, guards, `merge_lora`)."""
