"""Merge safety: a poisoned expert, attack success rate, and backdoor-robust merging (DAM).

- :mod:`~mergeflow.safety.poison` — trigger-phrase poisoning of a training split (seeded, pure).
- :mod:`~mergeflow.safety.asr` — attack success rate and the audit's flagging rule.
- :mod:`~mergeflow.safety.dam` — Defense-Aware Merging's dual Concrete masks over the functional
  merge of :mod:`mergeflow.coefficients` (Yang et al., ICLR 2025).
- :mod:`~mergeflow.safety.somf` — SOMF's subspace mask on a suspected expert's task vector (Yi et
  al., 2024), with DAM's simulated-trigger safety loss.

The prune-the-suspect baseline is a registered merge method (``prune_suspect``); the audit stage
(``mergeflow.pipeline.audit``) reports ASR and clean accuracy for experts and merges.
"""

from mergeflow.safety.asr import attack_success_rate, flag_merges
from mergeflow.safety.dam import (
    DamResult,
    DamSpec,
    Quarantine,
    TokenTrigger,
    dam,
    embedding_key,
    find_triggers,
    insert_token,
    invert_token_trigger,
    text_frequency,
    triggered_logits,
)
from mergeflow.safety.poison import PoisonSpec, insert_trigger, poison_split, triggered_test
from mergeflow.safety.somf import SomfSpec, somf, somf_merged

__all__ = [
    "DamResult",
    "DamSpec",
    "PoisonSpec",
    "Quarantine",
    "SomfSpec",
    "TokenTrigger",
    "attack_success_rate",
    "dam",
    "embedding_key",
    "find_triggers",
    "flag_merges",
    "insert_token",
    "insert_trigger",
    "invert_token_trigger",
    "poison_split",
    "somf",
    "somf_merged",
    "text_frequency",
    "triggered_logits",
    "triggered_test",
]
