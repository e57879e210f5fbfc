"""Shared test builders: tiny real Hugging Face models (random init, BERT architecture)."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification


def tiny_bert(
    num_labels: int = 2, seed: int = 0, *, vocab_size: int = 30522, max_positions: int = 64
) -> BertForSequenceClassification:
    """A 2-layer, 32-wide BERT classifier seeded with ``seed`` (train mode, as constructed)."""
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_positions,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg)


def forbid_full_sorts(monkeypatch) -> None:
    """Make every full-sort entry point raise: ``torch.sort``/``argsort``/``msort``, the same
    ``Tensor`` methods, and ``numpy.sort``/``argsort`` (selection — ``kthvalue``, ``topk``,
    ``ndarray.partition``, histograms — stays allowed: that is what "no full sort" promises).
    """
    import numpy as np

    def boom(*a, **k):
        raise AssertionError("full sort used")

    for owner in (torch, torch.Tensor):
        for name in ("sort", "argsort", "msort"):
            monkeypatch.setattr(owner, name, boom)
    for name in ("sort", "argsort"):
        monkeypatch.setattr(np, name, boom)
