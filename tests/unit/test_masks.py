"""Unit tests for mergeflow.masks: TALL / consensus masks and bit packing."""

import pytest
import torch

from mergeflow import masks
from mergeflow.masks import bitpack
from mergeflow.tensors import MergeError, task_vectors

# Same hand-checkable setup as tests/unit/test_methods.py (tensor "w" only, plus a buffer).
#   τ_A = [3,-1,0.5,2], τ_B = [-1,-2,1.5,0], τ_C = [2,1,-0.5,0.25], τ_MTL = [4,-2,1.5,2.25]
TAUS = {
    "A": [[3.0, -1.0, 0.5, 2.0]],
    "B": [[-1.0, -2.0, 1.5, 0.0]],
    "C": [[2.0, 1.0, -0.5, 0.25]],
}


def setup():
    base = {"w": torch.tensor([[1.0, 2.0, 3.0, 4.0]]), "pos": torch.arange(3)}
    experts = {
        t: {"w": base["w"] + torch.tensor(v), "pos": torch.arange(3)} for t, v in TAUS.items()
    }
    return base, experts


# λ = 0.4:
#   A: |τ_A| = [3,1,.5,2]   ≥ .4·|MTL−τ_A| = .4·[1,1,1,.25]   -> [1,1,1,1]
#   B: |τ_B| = [1,2,1.5,0]  ≥ .4·|MTL−τ_B| = .4·[5,0,0,2.25]  -> [0,1,1,0]
#   C: |τ_C| = [2,1,.5,.25] ≥ .4·|MTL−τ_C| = .4·[2,3,2,2]     -> [1,0,0,0]
EXPECTED_04 = {
    "A": [[True, True, True, True]],
    "B": [[False, True, True, False]],
    "C": [[True, False, False, False]],
}


def test_tall_masks_closed_form():
    base, experts = setup()
    m = masks.tall_masks(base, experts, 0.4)
    assert list(m) == ["A", "B", "C"]
    for t, exp in EXPECTED_04.items():
        assert list(m[t]) == ["w"]  # int buffer gets no mask
        assert m[t]["w"].dtype == torch.bool
        assert torch.equal(m[t]["w"], torch.tensor(exp)), t


def test_tall_masks_per_task_lambda():
    base, experts = setup()
    # λ_C = 0.3 flips C's entry 1: 1 ≥ 0.3·3 = 0.9
    m = masks.tall_masks(base, experts, {"A": 0.4, "B": 0.4, "C": 0.3})
    assert torch.equal(m["C"]["w"], torch.tensor([[True, True, False, False]]))
    assert torch.equal(m["A"]["w"], torch.tensor(EXPECTED_04["A"]))
    with pytest.raises(MergeError, match="task 'C'"):
        masks.tall_masks(base, experts, {"A": 0.4, "B": 0.4})
    with pytest.raises(MergeError, match="'B'"):
        masks.tall_masks(base, experts, {"A": 0.4, "B": -0.1, "C": 0.4})


def test_tall_lambda_zero_all_ones():
    base, experts = setup()
    m = masks.tall_masks(base, experts, 0.0)
    assert all(m[t]["w"].all() for t in m)
    g = torch.Generator().manual_seed(0)
    tvs = {f"t{i}": {"x": torch.randn(3, 5, generator=g)} for i in range(4)}
    tvs["t0"]["x"][0, 0] = 0.0  # |0| ≥ 0 still selected
    m2 = masks.tall_masks_from_vectors(tvs, 0.0)
    assert all(m2[t]["x"].all() for t in m2)


def test_tall_masks_from_vectors_matches_and_mtl_override():
    base, experts = setup()
    tvs = task_vectors(base, experts)
    from_vec = masks.tall_masks_from_vectors(tvs, 0.4)
    for t, exp in EXPECTED_04.items():
        assert torch.equal(from_vec[t]["w"], torch.tensor(exp))
    # explicit mtl = 0: m_t = 1[|τ_t| ≥ λ|τ_t|] -> everything with λ ≤ 1 (incl. zeros)
    zero = {"w": torch.zeros(1, 4)}
    m = masks.tall_masks_from_vectors(tvs, 0.9, mtl=zero)
    assert all(m[t]["w"].all() for t in m)
    # λ = 2 with mtl = 0: only exact zeros survive (0 ≥ 0)
    m = masks.tall_masks_from_vectors(tvs, 2.0, mtl=zero)
    assert torch.equal(m["B"]["w"], torch.tensor([[False, False, False, True]]))
    assert not m["A"]["w"].any()


def test_tall_masks_from_vectors_errors():
    with pytest.raises(MergeError):
        masks.tall_masks_from_vectors({}, 0.4)
    tvs = {"a": {"x": torch.zeros(2)}, "b": {"y": torch.zeros(2)}}
    with pytest.raises(MergeError, match=r"'b'.*'x'"):
        masks.tall_masks_from_vectors(tvs, 0.4)
    tvs = {"a": {"x": torch.zeros(2)}, "b": {"x": torch.zeros(3)}}
    with pytest.raises(MergeError, match=r"'b'.*'x'"):
        masks.tall_masks_from_vectors(tvs, 0.4)
    with pytest.raises(MergeError, match="mtl"):
        masks.tall_masks_from_vectors({"a": {"x": torch.zeros(2)}}, 0.4, mtl={})


def test_tall_masks_checks_compatibility():
    base, experts = setup()
    experts["B"]["w"] = experts["B"]["w"].clone()
    experts["B"]["w"][0, 1] = float("nan")
    with pytest.raises(MergeError, match=r"'B'.*'w'"):
        masks.tall_masks(base, experts, 0.4)


def test_consensus_mask_closed_form():
    m = {t: {"w": torch.tensor(v)} for t, v in EXPECTED_04.items()}  # counts [2,2,2,1]
    assert torch.equal(masks.consensus_mask(m)["w"], torch.tensor([[True, True, True, False]]))
    assert torch.equal(masks.consensus_mask(m, k=1)["w"], torch.ones(1, 4, dtype=torch.bool))
    assert not masks.consensus_mask(m, k=3)["w"].any()
    assert masks.consensus_mask(m, k=0)["w"].all()


def test_consensus_mask_errors():
    m = {t: {"w": torch.tensor(v)} for t, v in EXPECTED_04.items()}
    with pytest.raises(MergeError, match="k"):
        masks.consensus_mask(m, k=-1)
    with pytest.raises(MergeError, match="k"):
        masks.consensus_mask(m, k=1.5)
    with pytest.raises(MergeError):
        masks.consensus_mask({})
    m["C"] = {"z": torch.ones(1, 4, dtype=torch.bool)}
    with pytest.raises(MergeError, match="'C'"):
        masks.consensus_mask(m)
    bad = {"a": {"w": torch.ones(2, dtype=torch.bool)}, "b": {"w": torch.ones(3, dtype=torch.bool)}}
    with pytest.raises(MergeError, match=r"'b'.*'w'"):
        masks.consensus_mask(bad)


# ----------------------------------------------------------------------------- bitpack


def test_pack_bits_layout_lsb_first():
    m = torch.tensor([True, False, False, False, False, False, False, False, True, True])
    packed = masks.pack_bits(m)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [1, 3]
    assert masks.pack_bits(
        torch.tensor([False, True, False, False, False, False, False, True])
    ).tolist() == [0b10000010]


@pytest.mark.parametrize(
    "shape", [(1,), (7,), (8,), (9,), (1000,), (), (3, 5), (2, 3, 7), (4, 1, 1, 9), (0,), (2, 0)]
)
@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_pack_unpack_roundtrip(shape, p):
    g = torch.Generator().manual_seed(hash(shape) % 1000)
    m = torch.rand(shape, generator=g) < p
    packed = masks.pack_bits(m)
    n = m.numel()
    assert packed.shape == ((n + 7) // 8,)
    back = masks.unpack_bits(packed, m.shape)
    assert back.dtype == torch.bool and back.shape == m.shape
    assert torch.equal(back, m)


def test_pack_bits_non_contiguous():
    m = (torch.arange(30).view(5, 6) % 3 == 0).t()
    assert not m.is_contiguous()
    assert torch.equal(masks.unpack_bits(masks.pack_bits(m), m.shape), m)


def test_bitpack_errors():
    with pytest.raises(MergeError, match="bool"):
        masks.pack_bits(torch.ones(3))
    with pytest.raises(MergeError, match="uint8"):
        masks.unpack_bits(torch.ones(3), (3,))
    with pytest.raises(MergeError, match="bytes"):
        masks.unpack_bits(torch.zeros(2, dtype=torch.uint8), (17,))


def _random_masks():
    g = torch.Generator().manual_seed(0)
    return {
        "sst2": {
            "enc.w": torch.rand(3, 5, generator=g) < 0.3,
            "enc.b": torch.rand(9, generator=g) < 0.5,
        },
        "mnli": {
            "enc.w": torch.rand(3, 5, generator=g) < 0.7,
            "enc.b": torch.rand(9, generator=g) < 0.5,
            "scalar": torch.tensor(True),
        },
    }


def test_pack_masks_roundtrip():
    m = _random_masks()
    packed, meta = masks.pack_masks(m)
    assert set(packed) == {"sst2/enc.w", "sst2/enc.b", "mnli/enc.w", "mnli/enc.b", "mnli/scalar"}
    assert all(v.dtype == torch.uint8 for v in packed.values())
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert meta["sst2/enc.w"] == "[3, 5]"
    back = masks.unpack_masks(packed, meta)
    assert set(back) == set(m)
    for t in m:
        assert set(back[t]) == set(m[t])
        for k in m[t]:
            assert torch.equal(back[t][k], m[t][k])


def test_pack_masks_safetensors_roundtrip(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from safetensors import safe_open

    m = _random_masks()
    packed, meta = masks.pack_masks(m)
    path = tmp_path / "masks.safetensors"
    safetensors_torch.save_file(packed, str(path), metadata=meta)
    with safe_open(str(path), framework="pt") as f:
        meta2 = f.metadata()
    back = masks.unpack_masks(safetensors_torch.load_file(str(path)), meta2)
    for t in m:
        for k in m[t]:
            assert torch.equal(back[t][k], m[t][k])


def test_pack_unpack_masks_errors():
    with pytest.raises(MergeError, match="'/'"):
        masks.pack_masks({"a/b": {"w": torch.ones(2, dtype=torch.bool)}})
    with pytest.raises(MergeError, match="'w'.*'a'"):
        masks.pack_masks({"a": {"w": torch.ones(2)}})
    packed, meta = masks.pack_masks({"a": {"w": torch.ones(10, dtype=torch.bool)}})
    with pytest.raises(MergeError, match="'a/w'"):
        masks.unpack_masks(packed, {})
    with pytest.raises(MergeError, match="'a/w'"):
        masks.unpack_masks(packed, {"a/w": "[11, x"})
    with pytest.raises(MergeError, match="'a/w'"):
        masks.unpack_masks(packed, {"a/w": "[100]"})
    with pytest.raises(MergeError, match="format"):
        masks.unpack_masks(packed, {**meta, bitpack.FORMAT_KEY: "v9"})
    with pytest.raises(MergeError, match="'nokey'"):
        masks.unpack_masks({"nokey": packed["a/w"]}, meta)


def test_lambda_choice_by_agreement_then_accuracy_then_smaller_lambda():
    from mergeflow.pipeline.masks import LambdaGrid

    grid = LambdaGrid(
        accuracy={"a": {"0.2": 0.50, "0.4": 0.55, "0.6": 0.55}, "b": {"0.2": 0.7, "0.4": 0.7}},
        agreement={"a": {"0.2": 0.97, "0.4": 0.90, "0.6": 0.92}, "b": {"0.2": 0.9, "0.4": 0.9}},
    )
    # agreement first: a's best agreement (0.97) wins over its best accuracy (0.55)
    assert grid.choose("agreement") == {"a": 0.2, "b": 0.2}
    # accuracy first: a ties at 0.55 between 0.4 and 0.6 -> agreement 0.92 picks 0.6
    assert grid.choose("accuracy") == {"a": 0.6, "b": 0.2}
