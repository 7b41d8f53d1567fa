"""Integrations with other libraries: PEFT (LoRA merge and guards), the Hub (atomic saves, model card,
push_to_hub) and GPTQ engines (checkpoint export/import)."""
