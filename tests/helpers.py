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


def wait_for(cond, timeout_s: float = 60.0, poll_s: float = 0.1) -> bool:
    """Poll ``cond()`` until it is true or ``timeout_s`` passed; its last value."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(poll_s)
    return cond()


def live_processes(*argv_parts: str) -> list[int]:
    """Pids of live (not zombie) processes whose argv contains every one of ``argv_parts``."""
    import os
    from pathlib import Path

    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and all(p.encode() in argv for p in argv_parts):
            pids.append(int(d))
    return pids
