"""Readers that turn tracepipe output shards into what trainers consume.

- :mod:`tracepipe.formats.opd`: ``opd`` shards -> padded tensor batches (``input_ids``,
  ``attention_mask``, ``loss_mask``, ``teacher_logprobs``, optional top-k) for offline on-policy
  distillation.
"""

from __future__ import annotations

from tracepipe.formats.opd import OPDReader, collate_opd, opd_files

__all__ = ["OPDReader", "collate_opd", "opd_files"]
