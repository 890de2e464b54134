"""The fused CPU kernels (mergeplug.native) against the torch code they replace.

Every pruning merger is run both ways on tensors large enough for the sampled cut (over 2**19 entries), on
float32 and on bfloat16 inputs (whose task vectors are few distinct values, so the cut falls inside a run of
equal magnitudes): the results agree to float32 rounding, which a single entry kept by one path and dropped by
the other would break by the size of that entry.
"""
from __future__ import annotations

import shutil
import subprocess
import warnings

import pytest
import torch
from torch.testing import assert_close

from mergeplug import native
from mergeplug.merging import (
    TopMagnitudes,
    TopVariance,
    _native_inputs,
    _NativeScan,
    _scan_bands,
    task_vector_chunks,
    uniform,
)

ROWS, COLS = 640, 1024  # 655,360 entries: above the sampled cut's 2**19


@pytest.fixture(scope="module")
def lib():
    if not native.enabled():
        pytest.skip(f"{native.SWITCH_ENV}=0: the kernels are switched off for this run")
    found = native.library()
    if found is None:
        if shutil.which("cc") or shutil.which("gcc"):
            pytest.fail("a C compiler is on PATH but the fused kernels did not build")
        pytest.skip("no C compiler: the kernels cannot be built here")
    return found


def _weights(dtype: torch.dtype, discrete: bool, n: int = 3):
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(ROWS, COLS, generator=gen) * 0.02
    models = [base + 0.002 * torch.randn(ROWS, COLS, generator=gen) * (1 + i) for i in range(n)]
    if discrete:  # few distinct task-vector values: the cut lands inside a run of ties
        base = torch.zeros(ROWS, COLS)
        models = [torch.randint(-3, 4, (ROWS, COLS), generator=gen).float() * 0.125 for _ in range(n)]
    return base.to(dtype), [m.to(dtype) for m in models]


def _both_ways(monkeypatch, run):
    native_result = run()
    monkeypatch.setenv(native.SWITCH_ENV, "0")
    torch_result = run()
    monkeypatch.delenv(native.SWITCH_ENV)
    return native_result, torch_result


CASES = [
    ("ties", {}, {"density": 0.2}),
    ("ties", {"sign_method": "count", "normalize": False}, {"density": 0.35}),
    ("dare_ties", {}, {"density": 0.3}),
    ("dare_linear", {"normalize": True}, {"density": 0.6}),
    ("breadcrumbs", {}, {"density": 0.4, "gamma": 0.05}),
    ("breadcrumbs_ties", {}, {"density": 0.3, "gamma": 0.1}),
    ("della", {}, {"density": 0.5, "epsilon": 0.2}),
    ("della_linear", {"rescale": False}, {"density": 0.7, "epsilon": 0.1}),
    ("sce", {"variant": "paper"}, {}),
    ("sce", {"variant": "mergekit", "select_topk": 0.3}, {}),
    ("sce", {"variant": "fusechat"}, {}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("discrete", [False, True], ids=["continuous", "ties"])
@pytest.mark.parametrize("method,parameters,model_parameters", CASES, ids=[
    f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_kernels_merge_as_the_torch_code_does(lib, monkeypatch, make_merger, make_inputs, method, parameters,
                                              model_parameters, dtype, discrete):
    base, models = _weights(dtype, discrete)
    weights = [{"weight": w, **model_parameters} for w in (1.0, 0.5, 2.0)]
    if method == "sce":
        weights = [{} for _ in models]

    def run():
        inputs = make_inputs(method, base, models, parameters, weights, seed=5)
        inputs.compute_dtype = torch.float32
        return make_merger(method, **parameters).merge(inputs)

    fused, eager = _both_ways(monkeypatch, run)
    assert fused.dtype == eager.dtype == torch.float32
    assert_close(fused, eager, rtol=2e-6, atol=1e-7)
    assert not torch.equal(fused, base.float())  # the merge did something


def test_whole_model_trim_threshold_is_the_same_rule_both_ways(lib, monkeypatch, make_merger, make_inputs):
    base, models = _weights(torch.bfloat16, discrete=True)

    def run():
        merger = make_merger("ties", trim_scope="model")
        inputs = make_inputs("ties", base, models, {"trim_scope": "model"}, {"density": 0.3})
        inputs.compute_dtype = torch.float32
        merger.observe(inputs, 0)
        merger.finish_observing(0)
        return merger.merge(inputs)

    fused, eager = _both_ways(monkeypatch, run)
    assert_close(fused, eager, rtol=2e-6, atol=1e-7)


def _rule_mask(keys: torch.Tensor, kth: int, last: int) -> torch.Tensor:
    positions = torch.arange(keys.numel())
    return (keys > kth) | ((keys == kth) & (positions <= last))


@pytest.mark.parametrize("discrete", [False, True], ids=["continuous", "ties"])
@pytest.mark.parametrize("density", [0.001, 0.2, 0.5, 0.93])
def test_the_scanned_cut_keeps_exactly_the_entries_of_the_torch_cut(lib, make_inputs, discrete, density):
    base, models = _weights(torch.bfloat16, discrete)
    inputs = make_inputs("ties", base, models)
    inputs.compute_dtype = torch.float32
    n, k = base.numel(), int(round(density * base.numel()))
    chunks = task_vector_chunks(inputs, 1)
    scanned = TopMagnitudes(chunks, k, n, scan=_NativeScan(_native_inputs(inputs), native.SCORE_MAGNITUDE, 1))
    plain = TopMagnitudes(chunks, k, n)
    if density in (0.2, 0.5):  # inside the sample's reach: the kernels found this cut, not the torch fallback
        assert scanned._last_tie is not None and plain._last_tie is None
    keys = (models[1].float() - base.float()).view(torch.int32).reshape(-1) & 0x7FFF_FFFF
    kept = _rule_mask(keys, *scanned.native_cut())
    assert int(kept.sum()) == k
    assert torch.equal(kept, _rule_mask(keys, *plain.native_cut()))
    assert torch.equal(kept, torch.cat([plain.mask(c) for c in chunks()]))
    # The torch pruner driven by the scanned cut keeps the same entries too (ties patched by position).
    pruned = torch.cat([scanned.prune(c) for c in chunks()])
    assert torch.equal(pruned != 0, kept & (keys != 0))


@pytest.mark.parametrize("discrete", [False, True], ids=["continuous", "ties"])
def test_cuts_found_together_in_one_pass_equal_cuts_found_alone(lib, make_inputs, discrete):
    base, models = _weights(torch.bfloat16, discrete)
    inputs = make_inputs("breadcrumbs", base, models)
    inputs.compute_dtype = torch.float32
    n = base.numel()
    held = _native_inputs(inputs)
    requests = []
    for model in range(3):  # every model's two cuts in one pass
        chunks = task_vector_chunks(inputs, model)
        scan = _NativeScan(held, native.SCORE_MAGNITUDE, model)
        requests += [(chunks, int(0.45 * n) - model, scan), (chunks, int(0.03 * n) + model, scan)]
    together = TopMagnitudes.together(requests, n)
    for top, (chunks, k, scan) in zip(together, requests):
        assert top._last_tie is not None  # found by the shared scan
        keys = (models[scan.model].float() - base.float()).view(torch.int32).reshape(-1) & 0x7FFF_FFFF
        alone = TopMagnitudes(chunks, k, n)
        kept = _rule_mask(keys, *top.native_cut())
        assert int(kept.sum()) == k and torch.equal(kept, _rule_mask(keys, *alone.native_cut()))


def test_band_scan_collects_or_counts_every_key_in_the_band_in_order(lib, make_inputs, monkeypatch):
    base, models = _weights(torch.float32, discrete=False)
    inputs = make_inputs("ties", base, models)
    scan = _NativeScan(_native_inputs(inputs), native.SCORE_MAGNITUDE, 0)
    keys = (models[0] - base).view(torch.int32).reshape(-1) & 0x7FFF_FFFF
    lo, hi = int(keys.kthvalue(100_000).values), int(keys.kthvalue(400_000).values)
    above, collected, histogram = _scan_bands([(scan, (lo, hi))])[0][0]
    assert histogram is None and above == int((keys > hi).sum())
    in_band = keys[(keys >= lo) & (keys <= hi)]
    assert torch.equal(collected, in_band)  # in order of position, none lost
    monkeypatch.setattr(_NativeScan, "HISTOGRAM_KEYS", hi - lo + 1)  # the same band, counted instead
    above_h, none, counts = _scan_bands([(scan, (lo, hi))])[0][0]
    assert none is None and above_h == above
    assert torch.equal(counts, torch.bincount(in_band.long() - lo, minlength=hi - lo + 1))


def test_position_of_finds_the_nth_entry_with_a_key(lib, make_inputs):
    base, models = _weights(torch.float32, discrete=True)
    inputs = make_inputs("ties", base, models)
    scan = _NativeScan(_native_inputs(inputs), native.SCORE_MAGNITUDE, 2)
    keys = (models[2] - base).view(torch.int32).reshape(-1) & 0x7FFF_FFFF
    key = int(keys[12345])
    where = torch.nonzero(keys == key).flatten()
    for nth in (1, 2, where.numel() // 2, where.numel() - 1, where.numel()):
        assert scan.position_of(key, nth) == int(where[nth - 1])


def test_variance_selection_and_its_energy_match_torch(lib, make_inputs, monkeypatch):
    base, models = _weights(torch.bfloat16, discrete=False)
    inputs = make_inputs("sce", base, models)
    inputs.compute_dtype = torch.float32
    fused = TopVariance(inputs, 0.1)
    monkeypatch.setenv(native.SWITCH_ENV, "0")
    plain = TopVariance(inputs, 0.1)
    mask = plain.mask()
    assert int(mask.sum()) == int(round(0.1 * base.numel()))
    tvs = [m.float() - base.float() for m in models]
    mean = sum(tvs) / 3
    keys = (sum((t - mean).square() for t in tvs) / 3).view(torch.int32).reshape(-1)
    assert torch.equal(_rule_mask(keys, *fused.native_cut()), mask)
    monkeypatch.delenv(native.SWITCH_ENV)
    expected = torch.stack([(t.reshape(-1)[mask].double() ** 2).sum() for t in tvs])
    assert_close(fused.energy(), expected, rtol=1e-5, atol=0)
    assert_close(plain.energy(), expected, rtol=1e-5, atol=0)


def _rank_rows(kind: str, rows: int, cols: int, gen: torch.Generator):
    """(base, two models) whose task-vector rows make the kernels' ranking take each of its ways."""
    if kind == "few values":  # every key fits one counting pass
        base = torch.zeros(rows, cols, dtype=torch.bfloat16)
        return base, [(torch.randint(-4, 5, (rows, cols), generator=gen) * 0.125).to(torch.bfloat16) for _ in range(2)]
    if kind == "bfloat16 finetune":  # few significant bits, many exponents: counting pass on the top bits + insertion
        base = (torch.randn(rows, cols, generator=gen) * 0.02).to(torch.bfloat16)
        return base, [(base.float() + 0.002 * torch.randn(rows, cols, generator=gen)).to(torch.bfloat16)
                      for _ in range(2)]
    if kind == "float32":  # every low bit in use, 27-bit keys: three radix passes
        base = torch.randn(rows, cols, generator=gen) * 0.02
        return base, [base + 0.002 * torch.randn(rows, cols, generator=gen) for _ in range(2)]
    if kind == "12-bit values":  # low bits differ, 15-bit keys: two radix passes
        base = torch.zeros(rows, cols)
        return base, [torch.randint(1, 1 << 12, (rows, cols), generator=gen) * 2.0 ** -20 for _ in range(2)]
    # rows of zeros, rows of one value, rows of mostly one value with a few continuous ones
    base = torch.zeros(rows, cols)
    models = []
    for _ in range(2):
        m = torch.full((rows, cols), 0.25)
        m[0::3] = 0.0
        odd = torch.rand(rows, cols, generator=gen) < 0.05
        m[2::3] = torch.where(odd[2::3], torch.randn(rows, cols, generator=gen)[2::3], m[2::3])
        models.append(m)
    return base, models


@pytest.mark.parametrize("kind", ["few values", "bfloat16 finetune", "float32", "12-bit values", "ties and zeros"])
@pytest.mark.parametrize("cols", [1024, 2817, 3, 100_003])  # 100,003: more than the 2**16 buckets at most
def test_magprune_with_ranks_from_the_kernels_keeps_what_argsort_ranks_keep(lib, monkeypatch, make_inputs, cols,
                                                                            kind):
    """DELLA's kernels rank each row by counting sorts; torch by a stable argsort. With rescale, a kept entry is
    divided by its rank's probability, so one rank off shows in the merged value."""
    gen = torch.Generator().manual_seed(cols)
    base, models = _rank_rows(kind, (1 << 17) // cols + 1, cols, gen)
    from mergeplug.merging import magprune_prune, summed_task_vectors

    def run():
        inputs = make_inputs("della_linear", base, models)
        inputs.compute_dtype = torch.float32
        return summed_task_vectors(inputs, magprune_prune(inputs, [0.45, 0.6], [0.3, 0.5]), scale=1.0)

    fused, eager = _both_ways(monkeypatch, run)
    assert torch.equal(fused, eager)


def test_uniform_numbers_are_the_same_in_torch_and_c_and_chunked_or_whole(lib):
    for key, start in [(0, 0), (0x0123_4567_89AB_CDEF, 0), ((1 << 64) - 1, (1 << 33) - 1000)]:
        ours = torch.empty(5000)
        lib.mergeplug_uniform(key, start, 5000, ours.data_ptr())
        assert torch.equal(ours, uniform(key, start, 5000))
    whole = uniform(99, 0, 10_000)
    assert torch.equal(torch.cat([uniform(99, 0, 3_000), uniform(99, 3_000, 7_000)]), whole)


def test_uniform_numbers_look_uniform_and_independent_across_keys():
    u, v = uniform(1, 0, 1 << 20), uniform(2, 0, 1 << 20)
    assert u.min() >= 0 and u.max() < 1
    assert abs(float(u.mean()) - 0.5) < 0.002  # σ of the mean: 0.0003
    for q in (0.1, 0.5, 0.9):
        assert abs(float((u < q).float().mean()) - q) < 0.003
    assert abs(float(torch.corrcoef(torch.stack([u, v]))[0, 1])) < 0.005  # two models' draws: uncorrelated
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.005  # neighbours too


def test_results_do_not_depend_on_the_thread_count(lib, make_merger, make_inputs):
    base, models = _weights(torch.bfloat16, discrete=False)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            for method, params in (("ties", {"density": 0.2}), ("della", {"density": 0.5, "epsilon": 0.2})):
                inputs = make_inputs(method, base, models, None, params)
                inputs.compute_dtype = torch.float32
                results.append(make_merger(method).merge(inputs))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[2]) and torch.equal(results[1], results[3])


def test_kernels_compile_once_into_the_cache_and_load_from_it(lib, tmp_path, monkeypatch):
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(native, "_state", {})
    assert native.library() is not None
    built = list((tmp_path / "native").glob("kernels-*.so"))
    assert len(built) == 1 and not list((tmp_path / "native").glob("*.so.*"))
    monkeypatch.setattr(native, "_state", {})

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again although the cache holds the library")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert native.library() is not None


def test_without_a_compiler_merging_falls_back_to_torch_with_one_warning(tmp_path, monkeypatch, make_merger,
                                                                         make_inputs):
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.delenv(native.SWITCH_ENV, raising=False)
    monkeypatch.setattr(native, "_state", {})
    base, models = _weights(torch.float32, discrete=False)
    inputs = make_inputs("dare_ties", base, models, None, {"density": 0.5})
    with pytest.warns(UserWarning, match="fused CPU merge kernels are not available .*no C compiler"):
        merged = make_merger("dare_ties").merge(inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not per tensor
        again = make_merger("dare_ties").merge(inputs)
    assert torch.equal(merged, again)
    kept = [uniform(inputs.random_key(i), 0, base.numel()).view_as(base) < 0.5 for i in range(3)]
    dropped_everywhere = ~torch.stack(kept).any(0)
    assert dropped_everywhere.any() and torch.equal(merged[dropped_everywhere], base[dropped_everywhere])
    assert (merged[~dropped_everywhere] != base[~dropped_everywhere]).float().mean() > 0.99


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no fork on this platform")
def test_a_forked_process_merges_with_threads_of_its_own(lib, make_merger, make_inputs):
    import multiprocessing

    base, models = _weights(torch.float32, discrete=False)
    inputs = make_inputs("ties", base, models, None, {"density": 0.2})
    here = make_merger("ties").merge(inputs)  # the parent's pool now exists
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        there = pool.apply_async(_merge_in_child, (base, models)).get(timeout=60)
    assert torch.equal(here, there)


def _merge_in_child(base, models):
    from mergeplug.merging import TensorInputs, ties_task_vectors, top_magnitudes_prune

    inputs = TensorInputs("model.layers.0.mlp.up_proj.weight", base, models, {},
                          [{"weight": 1.0, "density": 0.2} for _ in models])
    return ties_task_vectors(inputs, top_magnitudes_prune(inputs, [0.2] * 3), sign_method="sum", normalize=True,
                             scale=1.0)


def test_a_build_without_avx512_merges_the_same_bytes(lib, tmp_path, monkeypatch, make_merger, make_inputs):
    """kernels.c has AVX-512 paths (compress-store of band keys, bucket prefix sums) and portable ones: both give
    the same."""
    base, models = _weights(torch.bfloat16, discrete=False)
    cases = [("ties", {"density": 0.2}), ("breadcrumbs", {"density": 0.3, "gamma": 0.02}), ("sce", {}), ("della", {})]

    def merged():
        out = []
        for method, params in cases:
            inputs = make_inputs(method, base, models, None, params)
            inputs.compute_dtype = torch.float32
            out.append(make_merger(method).merge(inputs))
        return out

    default = merged()
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(native, "FLAGS", (*native.FLAGS, "-mno-avx512f"))
    monkeypatch.setattr(native, "_state", {})
    assert native.library() is not None
    for a, b in zip(default, merged()):
        assert torch.equal(a, b)


@pytest.fixture
def two_torch_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_a_merge_lends_torch_threads_to_the_kernels_and_gives_them_back(lib, make_merger, make_inputs,
                                                                        two_torch_threads):
    """Inside lending_threads the first kernel call sets torch to one thread (its idle OpenMP threads would
    spin beside the kernels' own) and the kernels keep torch's count; a merger that never calls the kernels
    leaves torch's threads alone; the count is restored at the end."""
    base, models = _weights(torch.float32, discrete=False)
    with native.lending_threads():
        make_merger("linear").merge(make_inputs("linear", base, models))
        assert torch.get_num_threads() == 2
        alone = make_merger("ties").merge(make_inputs("ties", base, models, None, {"density": 0.2}))
        assert torch.get_num_threads() == 1
        assert native.threads() == 2
        with native.lending_threads():  # nested: the outer count stands, and the outer exit restores
            assert native.threads() == 2
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    assert native.threads() == 2
    # overlapping, as merges in two threads of one process: the first to begin records, the last to end restores
    first, second = native.lending_threads(), native.lending_threads()
    first.__enter__()
    make_merger("ties").merge(make_inputs("ties", base, models, None, {"density": 0.2}))
    second.__enter__()
    first.__exit__(None, None, None)
    assert torch.get_num_threads() == 1 and native.threads() == 2
    second.__exit__(None, None, None)
    assert torch.get_num_threads() == 2
    assert torch.equal(alone, make_merger("ties").merge(make_inputs("ties", base, models, None, {"density": 0.2})))
