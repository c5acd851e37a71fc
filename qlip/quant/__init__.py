"""Binary spherical quantization: exact int64 token ids, bit/group conversions, entropy terms."""
from .bsq import (BinarySphericalQuantizer, bits_to_ids, check_ids, group_ids_to_ids,
                  ids_to_bits, ids_to_group_ids)
from .vocab import VisualVocab

__all__ = ["BinarySphericalQuantizer", "bits_to_ids", "check_ids", "group_ids_to_ids",
           "ids_to_bits", "ids_to_group_ids", "VisualVocab"]
