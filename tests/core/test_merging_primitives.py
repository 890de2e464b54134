"""Shared tensor primitives of mergeplug.merging against direct computations."""
from __future__ import annotations

import pytest
import torch

from mergeplug.merging import topk_mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,density", [(1, 0.5), (7, 0.3), (1000, 0.2), (1000, 0.999), (5000, 0.01), (4096, 0.5)])
def test_topk_mask_keeps_exactly_the_largest_magnitudes(dtype, n, density):
    gen = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=gen) * 0.01).to(dtype)
    x[::7] = 0
    if n > 5:
        x[1::5] = -x[1]  # many equal magnitudes, of both signs
    mask = topk_mask(x.view(-1, 1) if n % 2 else x, density).flatten()
    k = int(round(density * n))
    assert int(mask.sum()) == k
    if 0 < k < n:
        magnitude = x.abs().double()
        assert magnitude[mask].min() >= magnitude[~mask].max()


def test_topk_mask_breaks_ties_by_position_and_handles_edges():
    x = torch.tensor([1.0, -1.0, 1.0, 0.5, -2.0, 1.0])
    assert topk_mask(x, 0.5).tolist() == [True, True, False, False, True, False]
    assert topk_mask(x, 0.0).tolist() == [False] * 6
    assert topk_mask(x, 1.0).tolist() == [True] * 6
    assert topk_mask(torch.zeros(4), 0.5).tolist() == [True, True, False, False]
    assert topk_mask(torch.tensor([3, -5, 1]), 1 / 3).tolist() == [False, True, False]  # integers: torch.topk path


@pytest.mark.parametrize("density", [0.2, 0.01, 0.9])
def test_global_threshold_over_several_tensors(density):
    from mergeplug.merging import GlobalMagnitudeThreshold

    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(1000, 100, generator=gen) * 0.01, torch.randn(5000, generator=gen) * 0.1, torch.zeros(300)]
    magnitudes = torch.cat([p.flatten() for p in parts]).abs()
    k = int(round(density * magnitudes.numel()))
    exact_kth = float(torch.topk(magnitudes, k).values.min())

    approximate = GlobalMagnitudeThreshold(density)
    for p in parts:
        approximate.add(p)
    kept = int((magnitudes >= approximate.threshold()).sum())
    assert abs(kept - k) <= 0.001 * magnitudes.numel()  # off by at most the entries of one bin
    assert approximate.threshold() == pytest.approx(exact_kth, rel=5e-4)

    exact = GlobalMagnitudeThreshold(density)
    for p in parts:
        exact.add(p)
    for p in parts:
        exact.add_exact(p)
    assert exact.threshold() == exact_kth
    assert int((magnitudes >= exact.threshold()).sum()) == k


def test_global_threshold_edges():
    from mergeplug.merging import GlobalMagnitudeThreshold

    none, everything = GlobalMagnitudeThreshold(0.0), GlobalMagnitudeThreshold(1.0)
    for t in (none, everything):
        t.add(torch.tensor([1.0, -2.0, 3.0]))
    assert none.threshold() == float("inf") and everything.threshold() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("k", [0, 1, 9, 250, 333, 999, 1000])
def test_prune_keeps_what_the_mask_keeps_with_ties_spread_over_chunks(monkeypatch, dtype, k):
    import mergeplug.merging as merging

    monkeypatch.setattr(merging, "ELEMENTWISE_CHUNK", 64)  # ties fall in many chunks
    gen = torch.Generator().manual_seed(k)
    x = (torch.randn(1000, generator=gen) * 0.01).to(dtype)
    x[::3] = 0.5  # a third of the entries tie at the cut for k = 250 and 333
    x[1::3] = -x[1::3].abs() - 1.0  # larger than the ties, negative: sign must survive
    chunks = merging._chunks_of(x)
    masked = torch.cat([c * m for c, m in zip(chunks(), map(merging.TopMagnitudes(chunks, k, 1000).mask, chunks()))])
    top = merging.TopMagnitudes(chunks, k, 1000)
    pruned = torch.cat([top.prune(c) for c in chunks()])
    assert torch.equal(pruned, masked)
    assert int(torch.count_nonzero(masked)) == k  # no kept entry is zero here
    expected = x * topk_mask(x, k / 1000)
    assert torch.equal(pruned, expected)


def _kept(x, k):
    import mergeplug.merging as merging

    chunks = merging._chunks_of(x)
    top = merging.TopMagnitudes(chunks, k, x.numel())
    return torch.cat([top.prune(c) for c in chunks()])


@pytest.mark.parametrize("density", [0.001, 0.2, 0.5, 0.9])
def test_the_sampled_cut_equals_the_histogram_cut_on_large_tensors(monkeypatch, density):
    import mergeplug.merging as merging

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(700_001, generator=gen) * 0.01
    x[::11] = 0.003  # ties near the cut for several densities
    x[::13] = 0.0
    k = int(round(density * x.numel()))
    used = []
    real = merging.TopMagnitudes._cut_from_sample
    monkeypatch.setattr(merging.TopMagnitudes, "_cut_from_sample", lambda *a: used.append(real(*a)) or used[-1])
    sampled = _kept(x, k)
    assert used == [True], "a large random tensor takes the one-pass path"
    monkeypatch.setattr(merging.TopMagnitudes, "_cut_from_sample", lambda *a: False)
    assert torch.equal(sampled, _kept(x, k))
    assert torch.equal(sampled, x * topk_mask(x, k / x.numel()))


def test_an_unrepresentative_sample_falls_back_to_the_histogram(monkeypatch):
    import mergeplug.merging as merging

    x = torch.full((600_000,), 1e-4)
    stride = x.numel() // (1 << 16)
    x[::stride] = 5.0  # the strided sample sees only the large entries
    x[1::7] = -2.0
    real = merging.TopMagnitudes._cut_from_sample
    used = []
    monkeypatch.setattr(merging.TopMagnitudes, "_cut_from_sample", lambda *a: used.append(real(*a)) or used[-1])
    k = 100_000
    kept = _kept(x, k)
    assert used == [False]
    assert torch.equal(kept, x * topk_mask(x, k / x.numel()))
    assert int(torch.count_nonzero(kept)) == k
