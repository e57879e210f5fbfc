"""Task-localisation masks (TALL / consensus) and their 1-bit storage format."""

from mergeflow.masks.bitpack import pack_bits, pack_masks, unpack_bits, unpack_masks
from mergeflow.masks.tall import (
    consensus_mask,
    tall_mask_stack,
    tall_masks,
    tall_masks_from_vectors,
)

__all__ = [
    "consensus_mask",
    "pack_bits",
    "pack_masks",
    "tall_mask_stack",
    "tall_masks",
    "tall_masks_from_vectors",
    "unpack_bits",
    "unpack_masks",
]
