"""On-disk layout: packing of integer codes, buffer specs, and checkpoint validation."""

from .layout import buffer_specs, packed_in_features
from .packing import pack_codes, unpack_codes

__all__ = ["buffer_specs", "pack_codes", "packed_in_features", "unpack_codes"]
