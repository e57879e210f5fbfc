"""Twin-Merging: SVD exclusive parts, router, archive round trip."""

from __future__ import annotations

import pytest
import torch

from mergeflow.compression import twin


def sds(seed=0):
    g = torch.Generator().manual_seed(seed)
    shared = {
        "w": torch.randn(12, 8, generator=g),
        "b": torch.randn(8, generator=g),
        "ids": torch.arange(3),
    }
    experts = {
        t: {
            "w": shared["w"] + 0.1 * torch.randn(12, 8, generator=g),
            "b": shared["b"] + 0.1 * torch.randn(8, generator=g),
            "ids": torch.arange(3),
        }
        for t in ("a", "b", "c")
    }
    return shared, experts


def test_full_rank_svd_reproduces_the_exclusive_part():
    d = torch.randn(12, 8)
    parts = twin.svd_compress(d, rank=8)
    torch.testing.assert_close(twin.svd_expand(parts, d.shape), d, atol=1e-5, rtol=1e-5)
    conv = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(
        twin.svd_expand(twin.svd_compress(conv, 12), conv.shape), conv, atol=1e-5, rtol=1e-5
    )
    assert set(twin.svd_compress(torch.randn(5), 2)) == {"dense"}


def test_truncated_svd_error_is_the_tail_singular_values():
    d = torch.randn(20, 10, dtype=torch.float64).float()
    s = torch.linalg.svdvals(d)
    approx = twin.svd_expand(twin.svd_compress(d, 3), d.shape)
    err = torch.linalg.matrix_norm(d - approx)
    assert err == pytest.approx(float(torch.sqrt((s[3:] ** 2).sum())), rel=1e-4)


def test_router_learns_separable_tasks_and_folds_standardisation():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]]) * 100 + 1000
    ids = torch.arange(3).repeat_interleave(20)
    feats = centers[ids] + torch.randn(60, 3, generator=g)
    r = twin.train_router(feats, ids, 3, epochs=200, seed=0)
    assert float((r(feats).argmax(-1) == ids).float().mean()) == 1.0
    assert torch.allclose(r(feats).sum(-1), torch.ones(60))


def test_archive_round_trip(tmp_path):
    shared, experts = sds()
    router = twin.Router(4, 3)
    heads = {t: {"classifier.weight": torch.full((2, 4), float(i))} for i, t in enumerate(experts)}
    twin.write_archive(tmp_path / "tw", shared, experts, heads, router, rank=8, dtype="float32")
    m = twin.TwinModel(tmp_path / "tw")
    assert m.tasks == ["a", "b", "c"]
    for t, e in experts.items():
        rec = m.expert(t)
        for k in ("w", "b"):
            torch.testing.assert_close(rec[k], e[k], atol=1e-5, rtol=1e-5)
        assert rec["ids"].equal(shared["ids"])
        onehot = torch.tensor([float(t == u) for u in m.tasks])
        torch.testing.assert_close(m.mixture(onehot)["w"], rec["w"])
    assert m.heads("b")["classifier.weight"].equal(torch.full((2, 4), 1.0))
    half = torch.tensor([0.5, 0.5, 0.0])
    expect = (
        shared["w"]
        + 0.5 * (experts["a"]["w"] - shared["w"])
        + 0.5 * (experts["b"]["w"] - shared["w"])
    )
    torch.testing.assert_close(m.mixture(half)["w"], expect, atol=1e-5, rtol=1e-5)


def test_low_rank_half_precision_archive_is_smaller(tmp_path):
    shared, experts = sds()
    heads = {t: {"h": torch.ones(1)} for t in experts}
    twin.write_archive(
        tmp_path / "full", shared, experts, heads, twin.Router(4, 3), rank=8, dtype="float32"
    )
    twin.write_archive(
        tmp_path / "small", shared, experts, heads, twin.Router(4, 3), rank=2, dtype="float16"
    )
    size = lambda p: sum(f.stat().st_size for f in (p / "exclusive").iterdir())  # noqa: E731
    assert size(tmp_path / "small") < size(tmp_path / "full") / 2


def test_bad_input(tmp_path):
    shared, experts = sds()
    heads = {t: {"h": torch.ones(1)} for t in experts}
    with pytest.raises(twin.TwinError, match="rank"):
        twin.write_archive(tmp_path / "x", shared, experts, heads, twin.Router(4, 3), rank=0)
    with pytest.raises(twin.TwinError, match="router has 2 outputs for 3 tasks"):
        twin.write_archive(tmp_path / "x", shared, experts, heads, twin.Router(4, 2), rank=2)
    assert not (tmp_path / "x").exists()
    twin.write_archive(tmp_path / "tw", shared, experts, heads, twin.Router(4, 3), rank=2)
    with pytest.raises(twin.TwinError, match="'zz' is not in the archive"):
        twin.TwinModel(tmp_path / "tw").expert("zz")
    with pytest.raises(twin.TwinError, match="no manifest"):
        twin.TwinModel(tmp_path)
