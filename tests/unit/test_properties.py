"""Property-based tests (hypothesis) of the merge methods' invariants, over the whole registry.

Random state dicts (1–3 tensors of rank 0–3, odd sizes included), 1–4 experts, fp32/bf16/fp16:

- one expert with weight 1 returns the expert, for the methods where that holds by definition;
- scaling 0 returns the base, bit for bit, for every method with a ``scaling``;
- the result does not depend on the order in which experts are given;
- the output has the base's keys, shapes and dtypes, and finite inputs give finite outputs;
- 1-bit mask packing round-trips for any shape.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergeflow import masks, methods

PROFILE = settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Hyper-parameters under which one expert merged with weight 1 is, by definition, that expert.
IDENTITY = {
    "task_arithmetic": {"scaling": 1.0},
    "ties": {"density": 1.0, "scaling": 1.0},
    "dare": {"drop_rate": 0.0, "scaling": 1.0},
    "emr": {"scaling": 1.0},
    "consensus": {"k": 1, "scaling": 1.0},  # one task: its TALL mask keeps every weight
    "tsv": {"scaling": 1.0},  # one task: a full-rank SVD, i.e. τ itself
}
SCALED = [m for m in methods.available() if "scaling" in methods.get(m).params_model.model_fields]


@st.composite
def problems(draw, min_experts: int = 1, max_experts: int = 4):
    """(base, experts) with random shapes, values and dtype; an int buffer rides along."""
    dtype = draw(st.sampled_from(DTYPES))
    n_tensors = draw(st.integers(1, 3))
    shapes = [
        tuple(draw(st.lists(st.integers(1, 7), min_size=0, max_size=3))) for _ in range(n_tensors)
    ]
    n_experts = draw(st.integers(min_experts, max_experts))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    base = {f"layer{i}.w": torch.randn(s, generator=g).to(dtype) for i, s in enumerate(shapes)}
    base["position_ids"] = torch.arange(5)
    experts = {}
    for t in range(n_experts):
        experts[f"task{t}"] = {
            k: (v + 0.1 * torch.randn(v.shape, generator=g).to(dtype)) if v.is_floating_point()
            else v.clone()
            for k, v in base.items()
        }
    return base, experts


def _tol(dtype: torch.dtype) -> dict:
    if not dtype.is_floating_point:
        return {"atol": 0, "rtol": 0}
    return {torch.float32: {"atol": 1e-5, "rtol": 1e-5},
            torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
            torch.float16: {"atol": 2e-3, "rtol": 2e-3}}[dtype]


@pytest.mark.parametrize("method", sorted(IDENTITY))
@PROFILE
@given(problem=problems(max_experts=1))
def test_one_expert_with_weight_one_is_the_expert(method, problem):
    base, experts = problem
    (expert,) = experts.values()
    out = methods.merge(method, base, experts, **IDENTITY[method])
    for k, v in expert.items():
        torch.testing.assert_close(out[k], v, **_tol(v.dtype), msg=f"{method}: {k}")


@pytest.mark.parametrize("method", SCALED)
@PROFILE
@given(problem=problems())
def test_scaling_zero_is_the_base(method, problem):
    base, experts = problem
    out = methods.merge(method, base, experts, scaling=0.0)
    for k, v in base.items():
        assert torch.equal(out[k], v), f"{method}: {k}"


@pytest.mark.parametrize("method", methods.available())
@PROFILE
@given(problem=problems(min_experts=2), data=st.data())
def test_expert_order_does_not_matter(method, problem, data):
    base, experts = problem
    names = list(experts)
    perm = data.draw(st.permutations(names))
    a = methods.merge(method, base, experts)
    b = methods.merge(method, base, {t: experts[t] for t in perm})
    for k in base:
        torch.testing.assert_close(a[k], b[k], **_tol(base[k].dtype), msg=f"{method}: {k}")


@pytest.mark.parametrize("method", methods.available())
@PROFILE
@given(problem=problems())
def test_output_matches_base_layout_and_is_finite(method, problem):
    base, experts = problem
    out = methods.merge(method, base, experts)
    assert list(out) == list(base)
    for k, v in base.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape, k
        if v.is_floating_point():
            assert torch.isfinite(out[k].float()).all(), f"{method}: {k}"
        else:
            assert torch.equal(out[k], v), f"{method}: {k} (buffers are copied from the base)"


@PROFILE
@given(
    shape=st.lists(st.integers(0, 19), min_size=0, max_size=4),
    p=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_bit_packing_round_trips_for_any_shape(shape, p, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) < p
    packed = masks.pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(masks.unpack_bits(packed, mask.shape), mask)
