"""4-bit NF4 weights in bitsandbytes' layout."""
from .nf4 import NF4_CODE, NF4Weight, dynamic_code

__all__ = ["NF4_CODE", "NF4Weight", "dynamic_code"]
