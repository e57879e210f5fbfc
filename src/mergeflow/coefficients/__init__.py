"""Learned merging coefficients: AdaMerging, aTLAS and Concrete subspace masks.

``θ(α) = θ_0 + Σ_t α_{t,b} ⊙ τ_{t,b}`` is built per forward pass (:class:`FunctionalMerge`), only α
(and Concrete mask logits) are trained (:func:`learn`), and the result is stored as safetensors
(:func:`save_learned`) that :func:`rebuild` turns back into a merged encoder.
"""

from mergeflow.coefficients.data import DataUse, Examples, few_shot_indices, load_examples
from mergeflow.coefficients.functional import (
    SCHEMES,
    BlockScheme,
    CoefficientError,
    FunctionalMerge,
    functional_logits,
)
from mergeflow.coefficients.methods import adamerging, atlas, concrete
from mergeflow.coefficients.store import (
    heatmap_png,
    layer_matrix,
    load_learned,
    rebuild,
    save_learned,
)
from mergeflow.coefficients.train import (
    CoefficientDivergence,
    LearnResult,
    LearnSpec,
    accuracies,
    learn,
)

__all__ = [
    "SCHEMES",
    "BlockScheme",
    "CoefficientDivergence",
    "CoefficientError",
    "DataUse",
    "Examples",
    "FunctionalMerge",
    "LearnResult",
    "LearnSpec",
    "accuracies",
    "adamerging",
    "atlas",
    "concrete",
    "few_shot_indices",
    "functional_logits",
    "heatmap_png",
    "layer_matrix",
    "learn",
    "load_examples",
    "load_learned",
    "rebuild",
    "save_learned",
]
