"""Unit tests for mergeflow.tensors (state-dict arithmetic)."""

import math

import pytest
import torch

from mergeflow import tensors as T
from mergeflow.tensors import MergeError
from tests.helpers import forbid_full_sorts


def sd(**kw):
    return {k: torch.as_tensor(v) for k, v in kw.items()}


@pytest.fixture
def base():
    return {
        "w": torch.tensor([[1.0, 2.0, 3.0, 4.0]]),
        "b": torch.tensor(0.5),
        "pos": torch.arange(3),
    }


@pytest.fixture
def expert(base):
    return {
        "w": torch.tensor([[2.0, 2.0, 1.0, 4.5]]),
        "b": torch.tensor(1.0),
        "pos": torch.arange(3),
    }


# ----------------------------------------------------------------- is_mergeable / check


def test_is_mergeable_floats_only():
    assert T.is_mergeable("w", torch.zeros(2, dtype=torch.float16))
    assert T.is_mergeable("w", torch.zeros(2, dtype=torch.bfloat16))
    assert T.is_mergeable("w", torch.zeros(2, dtype=torch.float64))
    assert not T.is_mergeable("position_ids", torch.arange(3))
    assert not T.is_mergeable("mask", torch.ones(2, dtype=torch.bool))
    assert not T.is_mergeable("q", torch.ones(2, dtype=torch.int8))


def test_merge_error_is_value_error():
    assert issubclass(MergeError, ValueError)


def test_check_compatible_ok(base, expert):
    T.check_compatible(base, {"a": expert, "b": expert})


def test_check_compatible_empty(base):
    with pytest.raises(MergeError, match="at least one"):
        T.check_compatible(base, {})


def test_check_compatible_missing_key_names_task_and_key(base, expert):
    del expert["b"]
    with pytest.raises(MergeError, match=r"expert 'sst2' is missing key 'b'"):
        T.check_compatible(base, {"sst2": expert})


def test_check_compatible_extra_key(base, expert):
    expert["head.bias"] = torch.zeros(2)
    with pytest.raises(MergeError, match=r"expert 'mnli' has extra key 'head.bias'"):
        T.check_compatible(base, {"mnli": expert})


def test_check_compatible_shape_names_both_shapes(base, expert):
    expert["w"] = torch.zeros(4, 1)
    with pytest.raises(MergeError) as ei:
        T.check_compatible(base, {"t": expert})
    msg = str(ei.value)
    assert "'w'" in msg and "(4, 1)" in msg and "(1, 4)" in msg and "'t'" in msg


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_compatible_non_finite(base, expert, bad):
    expert["w"] = expert["w"].clone()
    expert["w"][0, 2] = bad
    with pytest.raises(MergeError, match=r"expert 'qnli'.*'w'.*non-finite"):
        T.check_compatible(base, {"ok": dict(base), "qnli": expert})


def test_check_compatible_non_finite_base(base, expert):
    base["b"] = torch.tensor(float("nan"))
    with pytest.raises(MergeError, match=r"base.*'b'"):
        T.check_compatible(base, {"t": expert})


def test_check_compatible_non_tensor(base, expert):
    expert["w"] = [1, 2, 3, 4]
    with pytest.raises(MergeError, match=r"'w'.*not a tensor"):
        T.check_compatible(base, {"t": expert})


# ----------------------------------------------------------------- task vectors


def test_task_vector_float32_mergeable_only(base, expert):
    base16 = {k: (v.half() if v.is_floating_point() else v) for k, v in base.items()}
    exp16 = {k: (v.half() if v.is_floating_point() else v) for k, v in expert.items()}
    tv = T.task_vector(base16, exp16)
    assert set(tv) == {"w", "b"}
    assert all(v.dtype == torch.float32 for v in tv.values())
    torch.testing.assert_close(tv["w"], torch.tensor([[1.0, 0.0, -2.0, 0.5]]))
    torch.testing.assert_close(tv["b"], torch.tensor(0.5))


def test_task_vector_missing_key(base, expert):
    del expert["w"]
    with pytest.raises(MergeError, match="'w'"):
        T.task_vector(base, expert)


def test_task_vectors_per_task(base, expert):
    tvs = T.task_vectors(base, {"x": expert, "y": base})
    assert list(tvs) == ["x", "y"]
    assert torch.count_nonzero(tvs["y"]["w"]) == 0


# ----------------------------------------------------------------- arithmetic


def test_add_sub_mul_scale():
    a = sd(x=[1.0, 2.0], y=3.0)
    b = sd(x=[0.5, -1.0], y=2.0)
    torch.testing.assert_close(T.add(a, b)["x"], torch.tensor([1.5, 1.0]))
    torch.testing.assert_close(T.sub(a, b)["y"], torch.tensor(1.0))
    torch.testing.assert_close(T.mul(a, b)["x"], torch.tensor([0.5, -2.0]))
    torch.testing.assert_close(T.scale(a, -2.0)["x"], torch.tensor([-2.0, -4.0]))
    # inputs untouched
    torch.testing.assert_close(a["x"], torch.tensor([1.0, 2.0]))


def test_mul_with_bool_mask():
    out = T.mul(sd(x=[1.0, 2.0, 3.0]), {"x": torch.tensor([True, False, True])})
    torch.testing.assert_close(out["x"], torch.tensor([1.0, 0.0, 3.0]))


@pytest.mark.parametrize("op", [T.add, T.sub, T.mul])
def test_binary_ops_key_mismatch(op):
    with pytest.raises(MergeError, match="'z'"):
        op(sd(x=1.0), sd(x=1.0, z=2.0))


def test_sum_all():
    parts = [sd(x=[1.0, 2.0]), sd(x=[3.0, -1.0]), sd(x=[0.5, 0.5])]
    out = T.sum_all(parts)
    torch.testing.assert_close(out["x"], torch.tensor([4.5, 1.5]))
    torch.testing.assert_close(parts[0]["x"], torch.tensor([1.0, 2.0]))  # not mutated
    with pytest.raises(MergeError):
        T.sum_all([])
    with pytest.raises(MergeError, match=r"operand 1.*'x'"):
        T.sum_all([sd(x=1.0), sd(y=1.0)])


def test_apply_casts_and_copies(base):
    b16 = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in base.items()}
    tv = {"w": torch.tensor([[2.0, 0.0, -2.0, 1.0]]), "b": torch.tensor(1.0)}
    out = T.apply(b16, tv, scale=0.5)
    assert list(out) == list(base)
    assert out["w"].dtype == torch.bfloat16 and out["b"].dtype == torch.bfloat16
    torch.testing.assert_close(out["w"].float(), torch.tensor([[2.0, 2.0, 2.0, 4.5]]))
    torch.testing.assert_close(out["b"].float(), torch.tensor(1.0))
    assert torch.equal(out["pos"], base["pos"]) and out["pos"] is not base["pos"]


def test_apply_errors(base):
    with pytest.raises(MergeError, match="missing mergeable key 'b'"):
        T.apply(base, {"w": torch.zeros(1, 4)})
    with pytest.raises(MergeError, match="'zzz'"):
        T.apply(base, {"w": torch.zeros(1, 4), "b": torch.tensor(0.0), "zzz": torch.zeros(1)})
    with pytest.raises(MergeError, match="'w'"):
        T.apply(base, {"w": torch.zeros(4), "b": torch.tensor(0.0)})


# ----------------------------------------------------------------- flatten


def test_flatten_unflatten_roundtrip():
    like = {"a": torch.arange(6.0).view(2, 3), "s": torch.tensor(7.0), "c": torch.ones(2, 1, 2)}
    vec = T.flatten(like)
    assert vec.shape == (11,)
    torch.testing.assert_close(vec[:7], torch.tensor([0.0, 1, 2, 3, 4, 5, 7]))
    back = T.unflatten(vec, like)
    assert list(back) == ["a", "s", "c"]
    for k in like:
        assert torch.equal(back[k], like[k])


def test_flatten_keys_subset_and_errors():
    like = {"a": torch.zeros(2), "b": torch.ones(3)}
    assert torch.equal(T.flatten(like, keys=["b"]), torch.ones(3))
    with pytest.raises(MergeError, match="'nope'"):
        T.flatten(like, keys=["nope"])
    with pytest.raises(MergeError, match="5"):
        T.unflatten(torch.zeros(4), like)


# ----------------------------------------------------------------- trim / elect


@pytest.mark.parametrize(
    ("n", "density", "k"),
    [(10, 0.3, 3), (4, 0.2, 1), (5, 0.2, 1), (4, 0.5, 2), (7, 1.0, 7), (0, 0.5, 0), (3, 0.01, 1)],
)
def test_num_keep(n, density, k):
    assert T.num_keep(n, density) == k


def test_topk_mask_closed_form():
    t = torch.tensor([[0.1, -5.0, 2.0], [-0.3, 4.0, 0.0]])
    m = T.topk_mask(t, 0.5)  # k = 3: |-5|, 4, 2
    assert torch.equal(m, torch.tensor([[False, True, True], [False, True, False]]))
    assert T.topk_mask(t, 1.0).all()
    assert T.magnitude_threshold(t, 0.5) == 2.0


def test_topk_mask_random_count_and_selection():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(1000, generator=g)
    m = T.topk_mask(t, 0.1)
    assert m.sum() == 100
    assert t[m].abs().min() > t[~m].abs().max()


def test_topk_mask_does_not_sort(monkeypatch):
    """Catches: the magnitude threshold taken from a full sort via any entry point
    (``Tensor.sort``, ``torch.msort``, ``numpy.sort``, ...)."""
    forbid_full_sorts(monkeypatch)
    assert T.topk_mask(torch.randn(100), 0.2).sum() == 20


def test_elect_sign_and_disjoint_mean():
    stacked = torch.tensor([[3.0, 0.0, -2.0, 1.0], [-1.0, -2.0, 0.0, -1.0], [2.0, 1.0, -1.0, 0.0]])
    sign = T.elect_sign(stacked)
    assert torch.equal(sign, torch.tensor([1.0, -1.0, -1.0, 0.0]))
    tm = T.disjoint_mean(stacked, sign)
    # e0: (3+2)/2; e1: -2 only; e2: (-2-1)/2; e3: mass cancels -> 0
    torch.testing.assert_close(tm, torch.tensor([2.5, -2.0, -1.5, 0.0]))


def test_per_task():
    assert T.per_task(0.4, ["a", "b"], "lam", 1.0) == {"a": 0.4, "b": 0.4}
    assert T.per_task(None, ["a"], "lam", 1.0) == {"a": 1.0}
    assert T.per_task({"b": 2, "a": 1}, ["a", "b"], "lam", 0.0) == {"a": 1.0, "b": 2.0}
    with pytest.raises(MergeError, match="'lam'.*task 'b'"):
        T.per_task({"a": 1.0}, ["a", "b"], "lam", 0.0)
    with pytest.raises(MergeError, match="unknown task 'c'"):
        T.per_task({"a": 1.0, "b": 1.0, "c": 1.0}, ["a", "b"], "lam", 0.0)
    with pytest.raises(MergeError, match="finite"):
        T.per_task(math.nan, ["a"], "lam", 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None])
def test_all_finite_matches_isfinite(dtype, bad):
    t = torch.randn(1001).to(dtype)
    if bad is not None:
        t[537] = bad
    assert T.all_finite(t) == bool(torch.isfinite(t).all()) == (bad is None)


def test_all_finite_edge_cases():
    assert T.all_finite(torch.empty(0))
    assert T.all_finite(torch.arange(5))  # integers are always finite
    assert not T.all_finite(torch.tensor([float("inf"), float("-inf")]))
