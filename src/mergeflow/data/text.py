"""What one example's input is: a text, or a ``(text, text_pair)`` sentence pair.

Sentence-pair tasks (NLI, paraphrase, claim + evidence) keep their two texts apart from the corpus
to the tokenizer, which encodes them as the model was pre-trained to read pairs
(``[CLS] a [SEP] b [SEP]`` with segment ids for BERT; Devlin et al., NAACL 2019, §3) — see
:func:`mergeflow.models.inference.encode`.
"""

from __future__ import annotations

from typing import Any

from mergeflow.data.errors import DataError

Text = str | tuple[str, str]
"""One input: a string, or ``(text, text_pair)`` for a sentence-pair task."""


def is_pair(text: Any) -> bool:
    """Whether ``text`` is a ``(text, text_pair)`` tuple."""
    return isinstance(text, tuple)


def check_text(text: Any, where: str, *, pair: bool) -> None:
    """Raise :class:`DataError` unless ``text`` is a string (``pair`` false) or a pair of strings.

    Args:
        text: The value to check.
        where: What to name in the message (e.g. ``"text #3"``).
        pair: Whether the corpus is a sentence-pair corpus (every example must be of one kind).
    """
    if pair:
        if not (is_pair(text) and len(text) == 2 and all(isinstance(t, str) for t in text)):
            raise DataError(
                f"{where} is {text!r:.80}, expected a (text, text_pair) pair of strings"
            )
    elif not isinstance(text, str):
        raise DataError(f"{where} is {type(text).__name__}, expected str")


def text_fields(text: Text) -> dict[str, str]:
    """``{"text": ...}`` or ``{"text": ..., "text_pair": ...}`` (the split files' columns)."""
    if is_pair(text):
        return {"text": text[0], "text_pair": text[1]}
    return {"text": text}


def split_pairs(texts: list[Text]) -> tuple[list[str], list[str] | None]:
    """``(first texts, second texts)``; second is ``None`` for single-text inputs.

    Raises:
        DataError: ``texts`` mixes strings and pairs.
    """
    if not texts or not is_pair(texts[0]):
        if any(is_pair(t) for t in texts):
            raise DataError("texts mix strings and (text, text_pair) pairs")
        return list(texts), None  # type: ignore[arg-type]
    if not all(is_pair(t) for t in texts):
        raise DataError("texts mix strings and (text, text_pair) pairs")
    return [t[0] for t in texts], [t[1] for t in texts]  # type: ignore[index]
