"""Integrations with other libraries: PEFT (LoRA merge and guards)."""
