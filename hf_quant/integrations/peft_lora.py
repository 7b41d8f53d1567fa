"""`QuantLoraLinear`: PEFT's LoRA layer on an hf_quant base (imports PEFT; loaded only when used).

Built as PEFT builds its layers for other quantized bases (bitsandbytes, HQQ, torchao): a subclass of
`peft.tuners.lora.Linear` whose forward and backward are PEFT's own (the base runs hf_quant's kernel
and its autograd function), with the operations that need a float base weight refused.
"""

from __future__ import annotations

from typing import Any

from peft.tuners.lora import Linear as LoraLinear

from ..runtime import QuantLinear
from .peft_checks import check_adapter_config, merge_refusal


class QuantLoraLinear(LoraLinear):
    def __init__(self, base_layer: Any, adapter_name: str, config: Any, **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        self.fan_in_fan_out = False  # QuantLinear computes x @ W.T like nn.Linear, also for a Conv1D origin

    def _quantized_base(self) -> bool:
        return isinstance(self.get_base_layer(), QuantLinear)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: Any, **kwargs: Any) -> None:
        if self._quantized_base():
            check_adapter_config(config, kwargs.get("target_name") or adapter_name)
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        if self._quantized_base():  # `hf_quant.merge_lora` swaps in a float base first
            raise merge_refusal(["this layer"])
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge(self) -> None:
        if self._quantized_base():
            raise merge_refusal(["this layer"])
        super().unmerge()
