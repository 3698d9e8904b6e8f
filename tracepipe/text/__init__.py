"""Text helpers shared by the decontamination and dedup stages (normalization, n-grams, MinHash,
sentence embeddings) and a deterministic generator of near-duplicate variants for evaluating them.

Nothing here imports torch or sentence-transformers at module import time.
"""
