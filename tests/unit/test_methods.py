"""Unit tests for mergeflow.methods: closed forms, properties, and the per-method contract."""

import dataclasses
import math

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from mergeflow import methods
from mergeflow.methods import dare as dare_mod
from mergeflow.methods.dare import tensor_seed
from mergeflow.tensors import MergeError
from tests.helpers import forbid_full_sorts

REQUIRED = {"task_arithmetic", "ties", "dare", "consensus", "pcb", "emr", "tsv"}

# ----------------------------------------------------------------------------- fixtures
# Hand-checkable setup used by every closed-form test below.
#   base  w = [[1, 2, 3, 4]]   v = [0, 0]   pos = [0, 1, 2] (int64, never merged)
#   τ_A   w = [ 3,  -1,  0.5, 2   ]   v = [10,   8  ]
#   τ_B   w = [-1,  -2,  1.5, 0   ]   v = [-0.2, 0.3]
#   τ_C   w = [ 2,   1, -0.5, 0.25]   v = [0.05, -4 ]

BASE_W = [[1.0, 2.0, 3.0, 4.0]]
TAUS = {
    "A": {"w": [[3.0, -1.0, 0.5, 2.0]], "v": [10.0, 8.0]},
    "B": {"w": [[-1.0, -2.0, 1.5, 0.0]], "v": [-0.2, 0.3]},
    "C": {"w": [[2.0, 1.0, -0.5, 0.25]], "v": [0.05, -4.0]},
}


def _base():
    return {"w": torch.tensor(BASE_W), "v": torch.zeros(2), "pos": torch.arange(3)}


def _experts(tasks=("A", "B", "C")):
    b = _base()
    return {
        t: {
            "w": b["w"] + torch.tensor(TAUS[t]["w"]),
            "v": b["v"] + torch.tensor(TAUS[t]["v"]),
            "pos": torch.arange(3),
        }
        for t in tasks
    }


def _close(out, **expected):
    for k, v in expected.items():
        torch.testing.assert_close(out[k], torch.tensor(v), rtol=1e-6, atol=1e-6)
    assert torch.equal(out["pos"], torch.arange(3))


# ----------------------------------------------------------------------------- registry


def test_available_sorted_and_complete():
    names = methods.available()
    assert names == sorted(names)
    assert REQUIRED <= set(names)


def test_get_spec_shape():
    for name in methods.available():
        spec = methods.get(name)
        assert spec.name == name
        assert callable(spec.kernel)
        assert spec.prepare is None or callable(spec.prepare)
        assert issubclass(spec.params_model, BaseModel)
        assert spec.params_model.model_config["frozen"] is True
        assert spec.params_model.model_config["extra"] == "forbid"
        assert spec.paper and any(ch.isdigit() for ch in spec.paper)  # a year / arXiv id
        with pytest.raises(dataclasses.FrozenInstanceError):
            spec.name = "x"


def test_defaults_from_papers():
    def d(name):
        return methods.get(name).params_model()

    assert d("task_arithmetic").scaling == 0.3 and d("task_arithmetic").weights is None
    t = d("ties")
    assert (t.density, t.scaling, t.scope) == (0.2, 1.0, "global")
    p = d("dare")
    assert (p.drop_rate, p.rescale, p.combine, p.scaling, p.seed) == (
        0.9,
        "inverse",
        "task_arithmetic",
        1.0,
        0,
    )
    c = d("consensus")
    assert (c.scaling, c.k, c.tall_lambda) == (0.3, 2, 0.4)


def test_unknown_method_lists_available():
    with pytest.raises(MergeError, match=r"unknown method 'nope'; available: .*ties"):
        methods.get("nope")
    with pytest.raises(MergeError, match=r"unknown method 'nope'"):
        methods.merge("nope", _base(), _experts())


def test_register_new_method_and_duplicate():
    class P(BaseModel):
        model_config = ConfigDict(frozen=True, extra="forbid")
        shift: float = 0.0

    @methods.register("_test_shift", P, paper="Nobody, 2099")
    def shift(inp, params, ctx):  # τ_merged = shift everywhere
        return torch.full((inp.base.numel(),), params.shift)

    try:
        assert "_test_shift" in methods.available()
        out = methods.merge("_test_shift", _base(), _experts(), shift=1.5)
        _close(out, w=[[2.5, 3.5, 4.5, 5.5]], v=[1.5, 1.5])
        with pytest.raises(ValueError, match="already registered"):

            @methods.register("_test_shift", P, paper="x")
            def other(inp, params, ctx):  # pragma: no cover
                return inp.base
    finally:
        from mergeflow.methods import registry

        registry._REGISTRY.pop("_test_shift", None)


def test_register_rejects_non_forbid_model():
    class Loose(BaseModel):
        x: int = 0

    with pytest.raises(TypeError):
        methods.register("_loose", Loose, paper="x")


def test_merge_checks_kernel_output_size():
    class P(BaseModel):
        model_config = ConfigDict(frozen=True, extra="forbid")

    @methods.register("_test_bad_size", P, paper="x")
    def bad(inp, params, ctx):
        return torch.zeros(inp.base.numel() + 1)

    try:
        with pytest.raises(MergeError, match=r"'_test_bad_size' returned 5 values for tensor 'w'"):
            methods.merge("_test_bad_size", _base(), _experts())
    finally:
        from mergeflow.methods import registry

        registry._REGISTRY.pop("_test_bad_size", None)


def test_describe_params_reads_the_schema():
    d = methods.describe_params("ties")
    assert d["density"] == (
        "density: float, 0 < density <= 1, fraction k of |τ| kept by the trim, default 0.2"
    )
    assert d["scope"].startswith("scope: one of 'tensor', 'global', ")
    assert methods.describe_params("tsv")["fraction"].startswith(
        "fraction: float | None, 0 < fraction <= 1, "
    )
    assert methods.describe_params("consensus")["tall_lambda"].startswith(
        "tall_lambda: float | dict[str, float], 0 <= tall_lambda, "
    )


# ----------------------------------------------------------------------------- closed forms


def test_task_arithmetic_closed_form():
    # Σ τ: w = [4, -2, 1.5, 2.25], v = [9.85, 4.3]; θ = θ_0 + 0.5 Σ τ
    out = methods.merge("task_arithmetic", _base(), _experts(), scaling=0.5)
    _close(out, w=[[3.0, 1.0, 3.75, 5.125]], v=[4.925, 2.15])


def test_task_arithmetic_weights_closed_form():
    # w: 1·τ_A − 1·τ_B + 0·τ_C = [4, 1, -1, 2];  v = [10.2, 7.7]
    out = methods.merge(
        "task_arithmetic", _base(), _experts(), scaling=1.0, weights={"A": 1, "B": -1, "C": 0}
    )
    _close(out, w=[[5.0, 3.0, 2.0, 6.0]], v=[10.2, 7.7])


def test_task_arithmetic_weights_must_match_tasks():
    with pytest.raises(MergeError, match="task 'C'"):
        methods.merge("task_arithmetic", _base(), _experts(), weights={"A": 1, "B": 1})
    with pytest.raises(MergeError, match="unknown task 'Z'"):
        methods.merge(
            "task_arithmetic", _base(), _experts(), weights={"A": 1, "B": 1, "C": 1, "Z": 1}
        )


def test_ties_tensor_scope_closed_form():
    # density 0.5, per tensor. w (k=2): A -> [3,0,0,2]; B -> [0,-2,1.5,0]; C -> [2,1,0,0]
    #   γ = sgn([5,-1,1.5,2]) = [+,-,+,+]; disjoint mean = [(3+2)/2, -2, 1.5, 2]
    # v (k=1): A -> [10,0]; B -> [0,0.3]; C -> [0,-4]; γ = sgn([10,-3.7]) -> [10, -4]
    out = methods.merge("ties", _base(), _experts(), density=0.5, scope="tensor", scaling=1.0)
    _close(out, w=[[3.5, 0.0, 4.5, 6.0]], v=[10.0, -4.0])


def test_ties_global_scope_closed_form():
    # density 0.5 over the whole flattened τ_t (6 params, k=3 per task):
    #   A keeps {10, 8, 3}: w [3,0,0,0] v [10,8]   (A's w entry 2 is trimmed: v dominates)
    #   B keeps {2, 1.5, 1}: w [-1,-2,1.5,0] v [0,0]
    #   C keeps {4, 2, 1}: w [2,1,0,0] v [0,-4]
    # w: Σ = [4,-1,1.5,0] -> γ = [+,-,+,0]; τ_m = [(3+2)/2, -2, 1.5, 0]
    # v: Σ = [10,4] -> γ = [+,+]; τ_m = [10, 8]
    out = methods.merge("ties", _base(), _experts(), density=0.5, scope="global", scaling=1.0)
    _close(out, w=[[3.5, 0.0, 4.5, 4.0]], v=[10.0, 8.0])
    half = methods.merge("ties", _base(), _experts(), density=0.5, scope="global", scaling=0.5)
    _close(half, w=[[2.25, 1.0, 3.75, 4.0]], v=[5.0, 4.0])


def test_ties_global_default_is_global():
    a = methods.merge("ties", _base(), _experts(), density=0.5)
    b = methods.merge("ties", _base(), _experts(), density=0.5, scope="global")
    assert torch.equal(a["w"], b["w"]) and torch.equal(a["v"], b["v"])


FIXED_KEEP = {  # hand-picked DARE keep masks for tensor "w" (v keeps everything)
    "A": [[True, False, True, True]],
    "B": [[True, True, False, True]],
    "C": [[False, True, True, True]],
}


@pytest.fixture
def fixed_dare_masks(monkeypatch):
    def fake_keep_mask(shape, drop_rate, seed, task, name):
        if name == "w":
            return torch.tensor(FIXED_KEEP[task])
        return torch.ones(tuple(shape), dtype=torch.bool)

    monkeypatch.setattr(dare_mod, "keep_mask", fake_keep_mask)


@pytest.mark.parametrize(
    "p,w,v",
    [
        # p = 0.5 -> survivors ×2. w: A [6,0,1,4]; B [-2,-4,0,0]; C [0,2,-1,0.5]; Σ = [4,-2,0,4.5]
        # v: all kept, ×2: Σ τ_v = [9.85, 4.3] -> [19.7, 8.6]
        (0.5, [[5.0, 0.0, 3.0, 8.5]], [19.7, 8.6]),
        # p = 0.75 -> survivors ×4 (= 1/(1-p); 1/p would be ×4/3): Σ kept τ_w = [2,-1,0,2.25]
        # -> [8,-4,0,9]; v: [9.85, 4.3] ×4 = [39.4, 17.2]
        (0.75, [[9.0, -2.0, 3.0, 13.0]], [39.4, 17.2]),
    ],
)
def test_dare_closed_form_fixed_mask(fixed_dare_masks, p, w, v):
    """Catches: rescaling survivors by 1/p instead of 1/(1-p) (equal only at p = 0.5)."""
    out = methods.merge("dare", _base(), _experts(), drop_rate=p, scaling=1.0)
    _close(out, w=w, v=v)


@pytest.mark.parametrize(
    "p,w,v",
    [
        # Same rescaled w; γ = sgn([4,-2,0,4.5]) = [+,-,0,+]; τ_m = [6, -4, 0, (4+0.5)/2]
        # v: A [20,16]; B [-0.4,0.6]; C [0.1,-8] -> γ = [+,+]; τ_m = [(20+0.1)/2, (16+0.6)/2]
        (0.5, [[7.0, -2.0, 3.0, 6.25]], [10.05, 8.3]),
        # p = 0.75, ×4: A [12,0,2,8]; B [-4,-8,0,0]; C [0,4,-2,1]; γ = [+,-,0,+]
        # τ_m = [12, -8, 0, (8+1)/2]; v: A [40,32]; B [-0.8,1.2]; C [0.2,-16] -> [20.1, 16.6]
        (0.75, [[13.0, -6.0, 3.0, 8.5]], [20.1, 16.6]),
    ],
)
def test_dare_ties_closed_form_fixed_mask(fixed_dare_masks, p, w, v):
    """Catches: DARE-TIES rescaling by 1/p instead of 1/(1-p) (equal only at p = 0.5)."""
    out = methods.merge("dare", _base(), _experts(), drop_rate=p, combine="ties", scaling=1.0)
    _close(out, w=w, v=v)


def test_dare_l1_rescale_closed_form(fixed_dare_masks):
    # l1: survivors scaled so ‖τ̃‖₁ = ‖τ‖₁ per task & tensor.
    # A: ‖τ‖₁ = 6.5, kept [3,0,0.5,2] (‖·‖₁ = 5.5) -> ×6.5/5.5
    # B: ‖τ‖₁ = 4.5, kept [-1,-2,0,0] (3)   -> ×1.5 -> [-1.5,-3,0,0]
    # C: ‖τ‖₁ = 3.75, kept [0,1,-0.5,0.25] (1.75) -> ×3.75/1.75
    a = torch.tensor([3.0, 0.0, 0.5, 2.0]) * (6.5 / 5.5)
    b = torch.tensor([-1.5, -3.0, 0.0, 0.0])
    c = torch.tensor([0.0, 1.0, -0.5, 0.25]) * (3.75 / 1.75)
    expected_w = torch.tensor(BASE_W) + (a + b + c).view(1, 4)
    out = methods.merge("dare", _base(), _experts(), drop_rate=0.5, rescale="l1", scaling=1.0)
    torch.testing.assert_close(out["w"], expected_w)
    _close(out, v=[9.85, 4.3])  # v keeps all -> ratio 1


def test_dare_l1_with_nothing_kept_is_zero(monkeypatch):
    # ‖m ⊙ τ‖₁ = 0: the L1 factor is left at 1 and the tensor contributes nothing
    monkeypatch.setattr(
        dare_mod, "keep_mask", lambda shape, *a: torch.zeros(tuple(shape), dtype=torch.bool)
    )
    for combine in ("task_arithmetic", "ties"):
        out = methods.merge(
            "dare", _base(), _experts(), drop_rate=0.5, rescale="l1", combine=combine
        )
        _close(out, w=BASE_W, v=[0.0, 0.0])


def test_dare_keep_mask_rate_and_determinism():
    m1 = dare_mod.keep_mask((100, 100), 0.9, 0, "A", "w")
    m2 = dare_mod.keep_mask((100, 100), 0.9, 0, "A", "w")
    assert torch.equal(m1, m2)
    assert abs(m1.float().mean().item() - 0.1) < 0.01
    assert not torch.equal(m1, dare_mod.keep_mask((100, 100), 0.9, 1, "A", "w"))
    assert not torch.equal(m1, dare_mod.keep_mask((100, 100), 0.9, 0, "B", "w"))
    assert not torch.equal(m1, dare_mod.keep_mask((100, 100), 0.9, 0, "A", "v"))
    assert tensor_seed(0, "A", "w") == tensor_seed(0, "A", "w") < 2**63


def test_consensus_closed_form():
    # τ_MTL(w) = [4,-2,1.5,2.25]; λ = 0.4
    #   A: |τ_A| = [3,1,.5,2]   ≥ .4|MTL-τ_A| = .4[1,1,1,.25]   -> [1,1,1,1]
    #   B: |τ_B| = [1,2,1.5,0]  ≥ .4|MTL-τ_B| = .4[5,0,0,2.25]  -> [0,1,1,0]
    #   C: |τ_C| = [2,1,.5,.25] ≥ .4|MTL-τ_C| = .4[2,3,2,2]     -> [1,0,0,0]
    #   counts [2,2,2,1] -> k=2 mask [1,1,1,0]; θ = θ_0 + 0.5·mask⊙MTL
    # τ_MTL(v) = [9.85, 4.3]
    #   A: [10,8] ≥ .4[0.15,3.7] -> [1,1]; B: [.2,.3] ≥ .4[10.05,4] -> [0,0]
    #   C: [.05,4] ≥ .4[9.8,8.3] -> [0,1]; counts [1,2] -> mask [0,1]
    out = methods.merge("consensus", _base(), _experts(), tall_lambda=0.4, k=2, scaling=0.5)
    _close(out, w=[[3.0, 1.0, 3.75, 4.0]], v=[0.0, 2.15])
    # k = 3: no weight is selected by all three tasks
    out3 = methods.merge("consensus", _base(), _experts(), tall_lambda=0.4, k=3, scaling=0.5)
    _close(out3, w=BASE_W, v=[0.0, 0.0])


def test_consensus_per_task_lambda():
    # λ_C = 0.3: C's entry 1 becomes 1 ≥ 0.9 -> counts(w) = [2,3,2,1]; k=3 keeps entry 1 only
    lam = {"A": 0.4, "B": 0.4, "C": 0.3}
    out = methods.merge("consensus", _base(), _experts(), tall_lambda=lam, k=3, scaling=1.0)
    _close(out, w=[[1.0, 0.0, 3.0, 4.0]], v=[0.0, 0.0])
    with pytest.raises(MergeError, match="task 'C'"):
        methods.merge("consensus", _base(), _experts(), tall_lambda={"A": 0.4, "B": 0.4})


def test_breadcrumbs_closed_form():
    # beta=0.25, gamma=0.75 on 4 entries keeps magnitude ranks 1 and 2 of each τ_t (w):
    #   A |.|=[3,1,.5,2] -> keep 1,2 -> [0,-1,0,2];   B [1,2,1.5,0] -> keep 1,1.5 -> [-1,0,1.5,0]
    #   C [2,1,.5,.25] -> keep .5,1 -> [0,1,-.5,0];   Σ = [-1,0,1,2]
    # v (2 entries): keep ranks [⌊.25·2⌋, ⌊.75·2⌋) = [0, 1), i.e. the smaller magnitude:
    #   A [0,8]; B [-0.2,0]; C [0.05,0]; Σ = [-0.15, 8]
    if "breadcrumbs" not in methods.available():
        pytest.skip("breadcrumbs not registered")
    out = methods.merge("breadcrumbs", _base(), _experts(), beta=0.25, gamma=0.75, scaling=1.0)
    _close(out, w=[[0.0, 2.0, 4.0, 6.0]], v=[-0.15, 8.0])


# ----------------------------------------------------------------------------- properties


def _random_setup(n_experts=3, seed=0, shape=(4, 5)):
    g = torch.Generator().manual_seed(seed)
    base = {
        "w": torch.randn(shape, generator=g),
        "s": torch.randn((), generator=g),
        "ids": torch.arange(4),
    }
    experts = {
        f"t{i}": {
            "w": base["w"] + torch.randn(shape, generator=g),
            "s": base["s"] + torch.randn((), generator=g),
            "ids": torch.arange(4),
        }
        for i in range(n_experts)
    }
    return base, experts


def test_ta_single_expert_scaling_one_is_expert():
    base, experts = _random_setup(1)
    out = methods.merge("task_arithmetic", base, experts, scaling=1.0)
    for k in ("w", "s"):
        torch.testing.assert_close(out[k], experts["t0"][k])


def test_ta_scaling_zero_is_base():
    base, experts = _random_setup(3)
    out = methods.merge("task_arithmetic", base, experts, scaling=0.0)
    for k in base:
        assert torch.equal(out[k], base[k])


@pytest.mark.parametrize("rescale", ["inverse", "l1"])
def test_dare_p0_equals_ta(rescale):
    base, experts = _random_setup(3)
    ta = methods.merge("task_arithmetic", base, experts, scaling=0.7)
    d = methods.merge("dare", base, experts, drop_rate=0.0, rescale=rescale, scaling=0.7)
    for k in base:
        torch.testing.assert_close(d[k], ta[k])


def test_dare_mean_over_seeds_approaches_ta():
    """Catches: rescaling by 1/p instead of 1/(1-p): at p = 0.75 the mean would be TA / 3."""
    base, experts = _random_setup(3, shape=(64,))
    ta = methods.merge("task_arithmetic", base, experts, scaling=1.0)["w"]
    p, n_seeds = 0.75, 400
    acc = torch.zeros_like(ta)
    for s in range(n_seeds):
        acc += methods.merge("dare", base, experts, drop_rate=p, seed=s, scaling=1.0)["w"]
    mean = acc / n_seeds
    # per entry: Var(Σ_t τ̃_t) = Σ_t τ_t² · p/(1-p) = 3 Σ_t τ_t² for p = 0.75
    sq = sum((e["w"] - base["w"]) ** 2 for e in experts.values())
    sigma = (sq * p / (1 - p) / n_seeds).sqrt()
    assert ((mean - ta).abs() <= 5 * sigma + 1e-5).all()
    assert (mean - ta).abs().mean() < 0.25
    # ...while one draw is far from TA
    one = methods.merge("dare", base, experts, drop_rate=p, seed=0, scaling=1.0)["w"]
    assert (one - ta).abs().mean() > 0.5


def test_dare_deterministic_and_order_independent():
    base, experts = _random_setup(3)
    a = methods.merge("dare", base, experts, drop_rate=0.7, seed=3)
    b = methods.merge("dare", base, experts, drop_rate=0.7, seed=3)
    assert all(torch.equal(a[k], b[k]) for k in base)
    c = methods.merge("dare", base, experts, drop_rate=0.7, seed=4)
    assert not torch.equal(a["w"], c["w"])
    rev_experts = dict(reversed(list(experts.items())))
    rev_base = dict(reversed(list(base.items())))
    r = methods.merge("dare", rev_base, rev_experts, drop_rate=0.7, seed=3)
    assert list(r) == list(rev_base)
    for k in base:
        torch.testing.assert_close(r[k], a[k])


def test_consensus_k1_lambda0_is_ta():
    base, experts = _random_setup(4)
    ta = methods.merge("task_arithmetic", base, experts, scaling=0.3)
    c = methods.merge("consensus", base, experts, tall_lambda=0.0, k=1, scaling=0.3)
    for k in base:
        torch.testing.assert_close(c[k], ta[k])


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_ties_density1_agreeing_signs_is_mean(scope):
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(3, 4, generator=g), "ids": torch.arange(2)}
    sign = torch.sign(torch.randn(3, 4, generator=g))
    deltas = [sign * (torch.rand(3, 4, generator=g) + 0.1) for _ in range(4)]
    experts = {f"t{i}": {"w": base["w"] + d, "ids": torch.arange(2)} for i, d in enumerate(deltas)}
    out = methods.merge("ties", base, experts, density=1.0, scaling=0.8, scope=scope)
    expected = base["w"] + 0.8 * torch.stack(deltas).mean(0)
    torch.testing.assert_close(out["w"], expected)


def test_ties_never_full_sorts(monkeypatch):
    """Catches: a trim threshold found by a full sort through any entry point (``Tensor.sort``,
    ``torch.msort``, ``numpy.sort``, ... — see :func:`tests.helpers.forbid_full_sorts`)."""
    forbid_full_sorts(monkeypatch)
    base, experts = _random_setup(3)
    for scope in ("tensor", "global"):
        methods.merge("ties", base, experts, density=0.3, scope=scope)


def test_inputs_not_mutated():
    base, experts = _random_setup(3)
    snap_b = {k: v.clone() for k, v in base.items()}
    snap_e = {t: {k: v.clone() for k, v in sd.items()} for t, sd in experts.items()}
    for name in methods.available():
        methods.merge(name, base, experts)
    assert all(torch.equal(base[k], snap_b[k]) for k in base)
    for t in experts:
        assert all(torch.equal(experts[t][k], snap_e[t][k]) for k in experts[t])


def test_float16_overflow_is_reported():
    base = {"w": torch.tensor([60000.0], dtype=torch.float16)}
    experts = {"a": {"w": torch.tensor([65000.0], dtype=torch.float16)}}
    with pytest.raises(MergeError, match="'w'.*float16"):
        methods.merge("task_arithmetic", base, experts, scaling=2.0)


# ----------------------------------------------------------------------------- contract table

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OUT_OF_RANGE = {
    "task_arithmetic": ("scaling", -0.1),
    "ties": ("density", 0.0),
    "dare": ("drop_rate", 1.0),
    "consensus": ("k", -1),
    "breadcrumbs": ("beta", 1.0),
    "pcb": ("ratio", 0.0),
    "emr": ("scaling", -1.0),
    "tsv": ("fraction", 0.0),
    "prune_suspect": ("top", 1.0),
}


def contract_state(dtype, n_experts, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"scale": (), "bias": (5,), "weight": (3, 4), "conv": (2, 3, 2)}
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    base["position_ids"] = torch.arange(7, dtype=torch.int64)
    experts = {}
    for i in range(n_experts):
        sd = {
            k: (base[k].float() + 0.1 * torch.randn(s, generator=g)).to(dtype)
            for k, s in shapes.items()
        }
        sd["position_ids"] = torch.arange(7, dtype=torch.int64) + 100  # must NOT leak
        experts[f"task{i}"] = sd
    return base, experts


@pytest.mark.parametrize("n_experts", [1, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name", methods.available())
def test_contract_output(name, dtype, n_experts):
    base, experts = contract_state(dtype, n_experts)
    out = methods.merge(name, base, experts)
    assert list(out) == list(base)
    for k, b in base.items():
        assert out[k].dtype == b.dtype, k
        assert out[k].shape == b.shape, k
        if b.is_floating_point():
            assert torch.isfinite(out[k]).all(), k
    assert torch.equal(out["position_ids"], base["position_ids"])


@pytest.mark.parametrize("name", methods.available())
def test_contract_missing_key(name):
    base, experts = contract_state(torch.float32, 2)
    del experts["task1"]["conv"]
    with pytest.raises(MergeError, match=r"task1.*'conv'"):
        methods.merge(name, base, experts)


@pytest.mark.parametrize("name", methods.available())
def test_contract_nan(name):
    base, experts = contract_state(torch.float32, 2)
    experts["task1"]["weight"][1, 2] = float("nan")
    with pytest.raises(MergeError) as ei:
        methods.merge(name, base, experts)
    assert "task1" in str(ei.value) and "'weight'" in str(ei.value)


@pytest.mark.parametrize("name", methods.available())
def test_contract_extra_key(name):
    base, experts = contract_state(torch.float32, 2)
    experts["task0"]["classifier.weight"] = torch.zeros(2, 2)
    with pytest.raises(MergeError, match=r"task0.*'classifier.weight'"):
        methods.merge(name, base, experts)


@pytest.mark.parametrize("name", methods.available())
def test_contract_shape_mismatch(name):
    base, experts = contract_state(torch.float32, 2)
    experts["task0"]["weight"] = torch.zeros(4, 3)
    with pytest.raises(MergeError, match=r"'weight'.*\(4, 3\).*\(3, 4\)"):
        methods.merge(name, base, experts)


@pytest.mark.parametrize("name", methods.available())
def test_contract_unknown_hyperparameter(name):
    base, experts = contract_state(torch.float32, 2)
    with pytest.raises(MergeError, match=r"unknown hyperparameter 'lamda'"):
        methods.merge(name, base, experts, lamda=0.3)


@pytest.mark.parametrize("name", methods.available())
def test_contract_out_of_range(name):
    base, experts = contract_state(torch.float32, 2)
    key, value = OUT_OF_RANGE.get(name, ("scaling", -1.0))
    with pytest.raises(MergeError) as ei:
        methods.merge(name, base, experts, **{key: value})
    msg = str(ei.value)
    assert f"'{key}'" in msg and "allowed" in msg
    assert any(op in msg for op in ("<=", "<", ">=")), msg  # the range is spelled out


@pytest.mark.parametrize("name", methods.available())
def test_contract_non_finite_hyperparameter(name):
    base, experts = contract_state(torch.float32, 2)
    with pytest.raises(MergeError, match="'scaling'"):
        methods.merge(name, base, experts, scaling=float("inf"))


@pytest.mark.parametrize("name", methods.available())
def test_contract_empty_experts(name):
    base, _ = contract_state(torch.float32, 1)
    with pytest.raises(MergeError, match="at least one"):
        methods.merge(name, base, {})


# ----------------------------------------------------------------------------- PCB, EMR, TSV


def test_new_method_defaults_from_papers():
    p = methods.get("pcb").params_model()
    assert (p.ratio, p.clip, p.scaling, p.scope) == (0.1, 1e-4, 0.3, "global")
    assert methods.get("emr").params_model().scaling == 1.0
    t = methods.get("tsv").params_model()
    assert (t.scaling, t.fraction) == (1.0, None)


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_pcb_closed_form(scope):
    """Catches: a sign bug in inter-balancing (``tanh(|τ_t|·|Σ τ|)`` or ``tanh(−τ_t·Σ τ)``): the
    weights below are not just 0/1, so the conflicting entry's β moves them."""
    # ratio 1, clip 0: nothing dropped or clipped; w_t = minmax(β_t), β_t = intra_t · inter_t,
    # intra_t = exp(T·minmax(|τ_t|)²) (T = 2), inter_t = tanh(τ_t · Σ_j τ_j)
    #   τ_A = [1, 2, 3], τ_B = [2, -1, 0.5], Σ = [3, 1, 3.5]
    #   A: minmax|τ| = [0, .5, 1];  β_A = [e^0·tanh 3, e^.5·tanh 2, e^2·tanh 10.5]
    #   B: minmax|τ| = [1, 1/3, 0]; β_B = [e^2·tanh 6, e^(2/9)·tanh(−1), e^0·tanh 1.75]
    #   w_t = (β_t − min β_t) / (max β_t − min β_t): w_A ≈ [0, .093, 1], w_B ≈ [1, 0, .227]
    #   τ_m = Σ_t w_t τ_t / Σ_t w_t ≈ [2, 2, 2.54]
    ta, tb = [1.0, 2.0, 3.0], [2.0, -1.0, 0.5]
    tot = [x + y for x, y in zip(ta, tb, strict=True)]

    def weights(tau):
        mags = [abs(x) for x in tau]
        lo, hi = min(mags), max(mags)
        beta = [
            math.exp(2 * ((m - lo) / (hi - lo)) ** 2) * math.tanh(x * s)
            for m, x, s in zip(mags, tau, tot, strict=True)
        ]
        return [(b - min(beta)) / (max(beta) - min(beta)) for b in beta]

    wa, wb = weights(ta), weights(tb)
    assert 0.05 < wa[1] < 0.95 and 0.05 < wb[2] < 0.95  # not a 0/1 case
    tau_m = [(p * x + q * y) / (p + q) for p, q, x, y in zip(wa, wb, ta, tb, strict=True)]
    base = {"w": torch.tensor([5.0, 5.0, 5.0])}
    experts = {
        "A": {"w": base["w"] + torch.tensor(ta)},
        "B": {"w": base["w"] + torch.tensor(tb)},
    }
    out = methods.merge("pcb", base, experts, ratio=1.0, clip=0.0, scaling=1.0, scope=scope)
    torch.testing.assert_close(out["w"], base["w"] + torch.tensor(tau_m))
    # ratio 0.5: the drop threshold is the value at rank ⌊3·0.5⌋ = 1, the middle β; entries at
    # or below it get weight 0, so each task keeps only its largest-β entry: A entry 2, B entry 0
    out = methods.merge("pcb", base, experts, ratio=0.5, clip=0.0, scaling=1.0, scope=scope)
    torch.testing.assert_close(out["w"], base["w"] + torch.tensor([2.0, 0.0, 3.0]))


def _pcb_reference(flat, ratio, clip):
    """The authors' algorithm written with sorts, for comparison (pcb-merging repo)."""

    def normalize(x):
        lo, hi = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
        return (x - lo) / (hi - lo)

    def clamp(x, min_ratio, max_ratio):
        d = x.size(1)
        s, _ = torch.sort(x, dim=1)
        lo = s[:, int(d * min_ratio)].unsqueeze(1)
        hi = s[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1)
        return torch.clamp(x, lo, hi)

    n = flat.shape[0]
    mag = clamp(flat.abs(), clip, clip)
    clipped = torch.sign(flat) * mag
    pcb = torch.exp(n * normalize(mag) ** 2) * torch.tanh(flat * flat.sum(dim=0))
    scale = normalize(clamp(pcb, 1 - ratio, 0))
    return (clipped * scale).sum(0) / scale.sum(0).clamp(min=1e-12)


def test_pcb_global_matches_authors_algorithm():
    base, experts = _random_setup(4, shape=(40, 25))
    out = methods.merge("pcb", base, experts, ratio=0.2, clip=0.01, scaling=0.5)
    keys = ["w", "s"]
    flat = torch.stack(
        [torch.cat([(e[k] - base[k]).reshape(-1) for k in keys]) for e in experts.values()]
    )
    ref = _pcb_reference(flat, 0.2, 0.01)
    exp_w = base["w"] + 0.5 * ref[: base["w"].numel()].view_as(base["w"])
    torch.testing.assert_close(out["w"], exp_w, rtol=1e-5, atol=1e-5)


def test_pcb_tensor_scope_matches_authors_algorithm_per_tensor():
    """Catches: tensor scope computing its statistics wrongly (e.g. ignoring ``clip``, or using
    whole-model statistics): each tensor must equal the authors' algorithm on that tensor alone."""
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(40, 25, generator=g), "u": torch.randn(30, generator=g)}
    experts = {
        f"t{i}": {
            "w": base["w"] + torch.randn(40, 25, generator=g),
            "u": base["u"] + 5 * torch.randn(30, generator=g),
        }
        for i in range(4)
    }
    out = methods.merge("pcb", base, experts, ratio=0.2, clip=0.05, scaling=0.5, scope="tensor")
    for k in ("w", "u"):
        flat = torch.stack([(e[k] - base[k]).reshape(-1) for e in experts.values()])
        ref = _pcb_reference(flat, 0.2, 0.05)
        torch.testing.assert_close(
            out[k], base[k] + 0.5 * ref.view_as(base[k]), rtol=1e-5, atol=1e-5
        )
    glob = methods.merge("pcb", base, experts, ratio=0.2, clip=0.05, scaling=0.5, scope="global")
    assert (glob["w"] - out["w"]).abs().max() > 1e-2  # the two scopes are told apart


def test_emr_closed_form_unified_masks_rescalers():
    from mergeflow.methods.emr import emr_decompose, emr_task_model, emr_task_models

    # w: Σ = [4, -2, 1.5, 2.25] -> γ = [+, -, +, +]; max agreeing |τ| = [3, 2, 1.5, 2]
    # v: Σ = [9.85, 4.3] -> γ = [+, +]; max agreeing |τ| = [10, 8]
    out = methods.merge("emr", _base(), _experts())
    _close(out, w=[[4.0, 0.0, 4.5, 6.0]], v=[10.0, 8.0])
    res = emr_decompose(_base(), _experts())
    assert res.masks["B"]["w"].tolist() == [[False, True, True, False]]
    assert res.masks["B"]["v"].tolist() == [False, True]
    assert res.masks["A"]["w"].all() and res.masks["A"]["v"].all()
    # λ_A = Σ|τ_A| / Σ|M_A ⊙ τ_uni| = 24.5 / 26.5 ; λ_B = 5.0 / 11.5
    assert res.rescalers["A"] == pytest.approx(24.5 / 26.5)
    assert res.rescalers["B"] == pytest.approx(5.0 / 11.5)
    lb = 5.0 / 11.5
    mb = emr_task_model(_base(), res, "B")
    _close(mb, w=[[1.0, 2.0 - 2.0 * lb, 3.0 + 1.5 * lb, 4.0]], v=[0.0, 8.0 * lb])
    all_models = emr_task_models(_base(), _experts())
    assert set(all_models) == {"A", "B", "C"}
    torch.testing.assert_close(all_models["B"]["w"], mb["w"])
    with pytest.raises(MergeError, match="unknown task 'Z'"):
        emr_task_model(_base(), res, "Z")


def test_emr_single_expert_reproduces_it():
    base, experts = _random_setup(1)
    out = methods.merge("emr", base, experts)
    for k in ("w", "s"):
        torch.testing.assert_close(out[k], experts["t0"][k])


def test_tsv_orthogonal_rank1_closed_form():
    # Δ_A = 3·e1e1ᵀ, Δ_B = 2·e2e2ᵀ (3×3, T = 2, k = ⌊3/2⌋ = 1): U = [e1 e2] is already
    # orthonormal, so TSV-M returns the sum; the 1-D bias gets the mean.
    e = torch.eye(3)
    base = {"w": torch.ones(3, 3), "b": torch.zeros(3)}
    experts = {
        "A": {"w": base["w"] + 3 * torch.outer(e[0], e[0]), "b": torch.tensor([1.0, 2.0, 3.0])},
        "B": {"w": base["w"] + 2 * torch.outer(e[1], e[1]), "b": torch.tensor([3.0, 0.0, -1.0])},
    }
    out = methods.merge("tsv", base, experts)
    exp_w = base["w"] + 3 * torch.outer(e[0], e[0]) + 2 * torch.outer(e[1], e[1])
    torch.testing.assert_close(out["w"], exp_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["b"], torch.tensor([2.0, 1.0, 1.0]))


def test_tsv_orthogonalises_overlapping_directions():
    # Δ_A = 1·u vᵀ and Δ_B = 1·u' v'ᵀ with u ⟂̸ u': the merged factors must be orthonormal,
    # i.e. Δ = U_⊥ diag(1, 1) V_⊥ᵀ has singular values exactly (1, 1).
    u, u2 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.6, 0.8, 0.0])
    v, v2 = torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])
    base = {"w": torch.zeros(3, 3)}
    experts = {"A": {"w": torch.outer(u, v)}, "B": {"w": torch.outer(u2, v2)}}
    out = methods.merge("tsv", base, experts)["w"]
    s = torch.linalg.svdvals(out)
    torch.testing.assert_close(s, torch.tensor([1.0, 1.0, 0.0]), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, torch.outer(u, v) + torch.outer(u2, v2))


def test_tsv_single_expert_full_rank_is_expert():
    base, experts = _random_setup(1, shape=(6, 4))
    out = methods.merge("tsv", base, experts)
    for k in ("w", "s"):
        torch.testing.assert_close(out[k], experts["t0"][k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name", methods.available())
def test_contract_merge_grid_equals_separate_merges(name, dtype, monkeypatch):
    """θ(λ) = θ_0 + λ·τ_merged with τ_merged independent of λ: the λ grid runs a method once."""
    from mergeflow.methods import registry

    base, experts = contract_state(dtype, 3)
    grid = [0.3, 1.0, 0.0, 0.7]
    spec, calls = registry.get(name), []

    def counted(inp, params, ctx):
        calls.append(inp.name)
        return spec.kernel(inp, params, ctx)

    monkeypatch.setitem(registry._REGISTRY, name, dataclasses.replace(spec, kernel=counted))
    got = list(methods.merge_grid(name, base, experts, grid))
    assert sorted(calls) == sorted(k for k, v in base.items() if v.is_floating_point()), (
        "the grid re-ran the kernels instead of reusing τ_merged"
    )
    monkeypatch.setitem(registry._REGISTRY, name, spec)
    assert [lam for lam, _ in got] == grid
    for lam, sd in got:
        want = methods.merge(name, base, experts, scaling=lam)
        assert list(sd) == list(want)
        for k in want:
            assert sd[k].dtype == want[k].dtype and torch.equal(sd[k], want[k]), (lam, k)


def test_merge_grid_rejects_a_scaling_hyperparameter():
    base, experts = contract_state(torch.float32, 2)
    with pytest.raises(MergeError, match="scalings as a list"):
        list(methods.merge_grid("ties", base, experts, [0.3], scaling=0.5))


def test_merge_grid_validates_every_scaling_before_merging():
    base, experts = contract_state(torch.float32, 2)
    with pytest.raises(MergeError, match=r"'scaling'=-0.5 .*allowed: scaling: float, 0 <= scaling"):
        next(methods.merge_grid("ties", base, experts, [0.3, -0.5]))


@pytest.mark.parametrize("p", [0.0, 0.5, 0.9, 1 - 1e-12])
def test_dare_keep_mask_rate_and_extremes(p):
    m = dare_mod.keep_mask((301, 333), p, 0, "A", "w")
    assert m.dtype == torch.bool and m.shape == (301, 333)
    assert abs(float(m.float().mean()) - (1 - p)) < 0.005
