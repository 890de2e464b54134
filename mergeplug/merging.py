"""The merger contract and the tensor primitives merge methods share.

A merger plugin subclasses :class:`Merger` and implements :meth:`Merger.merge`, a pure function of one
tensor's aligned inputs (:class:`TensorInputs`). The engine streams the checkpoints tensor by tensor, resolves
per-layer parameter schedules, and calls ``merge`` once per tensor; a merger that needs a statistic over the
whole model (a global magnitude threshold, say) also implements :meth:`Merger.observe` and
:meth:`Merger.finish_observing`, which the engine runs as a streaming pre-pass before merging.

All arithmetic arrives in the compute dtype (float32 by default) on the compute device. This module imports
torch, so import it only from a merger's implementation module, never from a plugin's ``__init__``.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Mapping

import torch

from . import native
from .errors import MergeplugError


@dataclass
class TensorInputs:
    """One tensor of every input model, aligned, with the parameters that apply to it.

    ``parameters`` are the merger's global parameters and ``model_parameters[i]`` model i's parameters, both
    already resolved for this tensor (layer schedules and name filters applied, defaults filled in).
    """

    name: str
    base: torch.Tensor | None
    models: list[torch.Tensor]
    parameters: dict[str, Any]
    model_parameters: list[dict[str, Any]]
    layer: int | None = None  # transformer block index, from the model family; None outside the blocks
    num_layers: int | None = None
    seed: int = 0
    model_names: list[str] = field(default_factory=list)
    #: Per model: its statistic for this tensor (the merger's ``statistic``, e.g. a diagonal Fisher), in the
    #: compute dtype and device, or None where the model has none for it; empty when the merger needs none.
    statistics: list[torch.Tensor | None] = field(default_factory=list)
    #: The dtype to compute in (the recipe's ``compute_dtype``); None: the inputs' own. The inputs already
    #: arrive in it unless the merger sets ``stored_dtype_inputs``.
    compute_dtype: torch.dtype | None = None
    #: The fused kernels' view of these inputs, built on first use (not part of the contract).
    _native_view: Any = field(default=None, init=False, repr=False, compare=False)

    def task_vectors(self) -> list[torch.Tensor]:
        """τ_i = θ_i − θ_base for every model (Ilharco et al., arXiv:2212.04089); see :func:`task_vector`."""
        return [task_vector(self, i) for i in range(len(self.models))]

    def weights(self, key: str = "weight", default: float = 1.0) -> torch.Tensor:
        """The per-model scalar ``key`` as a 1-D tensor on the inputs' device, in the compute dtype."""
        ref = self.models[0]
        return torch.tensor([float(p.get(key, default)) for p in self.model_parameters],
                            dtype=self.compute_dtype or ref.dtype, device=ref.device)

    def generator(self, model_index: int) -> torch.Generator:
        """A generator seeded from (seed, tensor name, model index): results do not depend on merge order."""
        gen = torch.Generator(device=self.models[0].device)
        gen.manual_seed(self.random_key(model_index) & 0x7FFF_FFFF_FFFF_FFFF)
        return gen

    def random_key(self, model_index: int) -> int:
        """A 64-bit key from (seed, tensor name, model index) for :func:`uniform`: the built-in random mergers'
        draws, the same on every device and in any merge order."""
        digest = hashlib.sha256(f"{self.seed}\0{self.name}\0{model_index}".encode()).digest()
        return int.from_bytes(digest[:8], "little")


class Merger:
    """Base class of merge methods.

    Class attributes a subclass may set:
      ``needs_base``: the method takes task vectors against a base model (the recipe must name one);
      ``prepasses``: how many streaming passes over every tensor the engine runs, calling
        :meth:`observe` with the pass index, before merging any (0: none);
      ``statistic``: None, or the name of a per-model statistic the method needs (``"fisher"``); the engine
        then runs each model on its own domain's data before merging, through :meth:`compute_statistic`,
        caches the result on disk (:mod:`mergeplug.statistics`) and hands each model's tensor of it to
        :meth:`merge` in ``TensorInputs.statistics``;
      ``statistic_parameters``: the global parameters that change the statistic (they name its cache entry,
        with the model and the data; the others, e.g. a floor applied when merging, do not). ``samples`` and
        ``max_length`` are read by the engine: how many rows of the domain's data, and the token cut;
      ``statistic_shape``: ``"weight"`` when each statistic tensor has its weight's shape (Fisher: the engine
        checks it and aligns vocabulary rows like the weight's), ``"any"`` when it has its own (RegMean's Gram
        matrices: the merger checks it);
      ``statistic_needs_base``: the statistic also reads the base model's weights (trained Localize-and-Stitch
        masks train on task vectors): the engine then passes ``base=`` to :meth:`compute_statistic` and the
        base model's fingerprint joins the cache key, so a changed base recomputes the statistic. The recipe
        must name a base_model;
      ``stored_dtype_inputs``: the inputs arrive as the checkpoints store them (e.g. bfloat16), not converted
        to the compute dtype, and the merger computes in ``TensorInputs.compute_dtype`` itself: a weighted sum
        then adds each bfloat16 input straight into a float32 accumulator (the same numbers as converting
        first, one pass over each input instead of two; see :func:`weighted_sum`).
    The recipe's global parameters, defaults filled in, are in ``self.parameters``.
    """

    needs_base: ClassVar[bool] = True
    prepasses: int = 0  # an instance may set it from its parameters (e.g. TIES' trim_scope)
    statistic: ClassVar[str | None] = None
    statistic_parameters: ClassVar[tuple[str, ...]] = ("samples", "max_length")
    statistic_shape: ClassVar[str] = "weight"
    statistic_needs_base: ClassVar[bool] = False
    stored_dtype_inputs: ClassVar[bool] = False

    def __init__(self, parameters: dict[str, Any] | None = None):
        self.parameters = dict(parameters or {})

    def observe(self, inputs: TensorInputs, pass_index: int) -> None:
        """Pre-pass ``pass_index`` (0-based): see one tensor's inputs (only when ``prepasses`` > 0)."""

    def finish_observing(self, pass_index: int) -> None:
        """Called once at the end of each pre-pass."""

    def compute_statistic(self, model: Any, batches: Iterable[dict[str, torch.Tensor]],
                          settings: dict[str, Any], base: Mapping[str, torch.Tensor] | None = None,
                          ) -> dict[str, torch.Tensor]:
        """The ``statistic`` of one model (only when ``statistic`` is set), keyed by its parameter names (the
        checkpoint's tensor names); a tensor may be left out, and is then merged without one.

        ``model``: a transformers causal LM in float32 on the merge device, in eval mode, gradients enabled
        (the engine discards it afterwards, so the merger may change its weights);
        ``batches``: ``input_ids``, ``labels`` and ``attention_mask`` of shape [rows, length], right-padded
        (labels -100 on the prompt tokens and on padding, the token ids on the response's; attention_mask 0 on
        padding; each row the domain-rendered text cut at ``max_length``). Pass ``attention_mask`` to the model
        and leave padded positions out of what is accumulated; a statistic that needs one sample per backward
        pass (a per-sample gradient) iterates :func:`samples_of` instead;
        ``settings``: the ``statistic_parameters`` values;
        ``base``: passed only when ``statistic_needs_base`` is set (the keyword is absent otherwise, so
        overrides without it keep working): the base model's weights, parameter name (as in
        ``model.named_parameters()``) to a float32 tensor on the merge device, read from the base checkpoint
        each time a name is looked up (nothing is held: a merger keeps what it needs). It holds the names the
        base checkpoint has; a base tensor may differ from the model's in vocabulary rows.
        """
        raise NotImplementedError

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        """The merged tensor, same shape as the inputs, in their dtype."""
        raise NotImplementedError


def samples_of(batches: Iterable[dict[str, torch.Tensor]]) -> Iterable[dict[str, torch.Tensor]]:
    """The statistics pass's batches one sample at a time, padding removed: ``input_ids`` and ``labels`` of
    shape [1, length] (for statistics that need one backward pass per sample, as a diagonal Fisher does:
    squaring a batch's summed gradient would not give it)."""
    for batch in batches:
        mask = batch.get("attention_mask")
        for row in range(batch["input_ids"].shape[0]):
            length = int(mask[row].sum()) if mask is not None else batch["input_ids"].shape[1]
            yield {"input_ids": batch["input_ids"][row:row + 1, :length],
                   "labels": batch["labels"][row:row + 1, :length]}


# --- shared primitives -------------------------------------------------------------------------------------
#: Entries per chunk for elementwise work done in pieces: a few arrays of 1 MiB (float32) fit a CPU's L2 cache.
ELEMENTWISE_CHUNK = 1 << 18


def elementwise_in_chunks(fn: Callable[[list[torch.Tensor]], torch.Tensor], tensors: list[torch.Tensor],
                          dtype: torch.dtype | None = None) -> torch.Tensor:
    """``fn`` applied to aligned cache-sized chunks of same-shape ``tensors`` (flat, whole rows of the last
    dimension, in order), assembled into one tensor.

    For work that is elementwise per position (sign election, disjoint merge, TALL masks): each of its many
    passes then reads the CPU cache instead of main memory, 2-3x faster on large tensors, same result.
    """
    shape = tensors[0].shape
    row = shape[-1] if len(shape) else 1
    step = max(row, ELEMENTWISE_CHUNK // row * row)  # whole rows, so per-row work (DELLA's ranks) stays exact
    flat = [t.reshape(-1) for t in tensors]
    out = torch.empty_like(flat[0], dtype=dtype)  # dtype: the result's, when fn computes in another
    for start in range(0, out.numel(), step):
        out[start:start + step] = fn([f[start:start + step] for f in flat])
    return out.view_as(tensors[0])

def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two multiply-xorshift rounds, constants from C. Wellons' hash-prospector) on
    int64 tensors holding values below 2**32: both constants are below 2**31, so no product overflows."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & 0xFFFF_FFFF
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & 0xFFFF_FFFF
    return x ^ (x >> 15)


def uniform(key: int, start: int, count: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``count`` float32 numbers in [0, 1) with 24 random bits: u(key, p) for positions p = start, start + 1, …

    Counter-based (each number a hash of the key and its position), so a tensor's draws are the same whether
    it is merged whole or in chunks, on the CPU, a GPU or in the fused kernels (which compute the same
    function), and a chunk can be drawn without the ones before it; ``torch.rand`` on the CPU is a sequential
    generator, about 3 ns a number, slower than the rest of a DARE merge together.
    """
    positions = torch.arange(start, start + count, dtype=torch.int64, device=device)
    hashed = _mix32((positions & 0xFFFF_FFFF) ^ (key & 0xFFFF_FFFF))
    hashed = _mix32(hashed ^ (positions >> 32) ^ ((key >> 32) & 0xFFFF_FFFF))
    return (hashed >> 8).to(torch.float32).mul_(1.0 / (1 << 24))


def weighted_sum(tensors: list[torch.Tensor], weights: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Σ_i w_i t_i without stacking (peak memory of two tensors, not N), in ``dtype`` (default: the first
    tensor's). Inputs of a narrower dtype are added into the accumulator as they are: the add converts each
    element on the way, the same numbers as converting the input first, without a converted copy."""
    factors = weights.tolist()
    first = tensors[0]
    if dtype is None or first.dtype == dtype:
        out = torch.mul(first, factors[0])  # not zeros + add: one pass less over the output
    else:
        out = first.to(dtype).mul_(factors[0])
    for t, w in zip(tensors[1:], factors[1:]):
        out.add_(t, alpha=w)
    return out


#: For each float dtype: the integer dtype of its width, the mask that clears the sign bit, and the shift that
#: keeps the top 15 bits of the magnitude. A non-negative float's bit pattern read as an integer is ordered
#: like the float, so |x| can be ranked, histogrammed and compared as integers.
_MAGNITUDE_BITS = {
    torch.float32: (torch.int32, 0x7FFF_FFFF, 16),
    torch.float64: (torch.int64, 0x7FFF_FFFF_FFFF_FFFF, 48),
    torch.float16: (torch.int16, 0x7FFF, 0),
    torch.bfloat16: (torch.int16, 0x7FFF, 0),
}


def _magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """|x| as flat integers ordered like |x| (x of a dtype in ``_MAGNITUDE_BITS``)."""
    int_dtype, sign_off, _ = _MAGNITUDE_BITS[x.dtype]
    return x.contiguous().view(int_dtype).reshape(-1) & sign_off


class TopMagnitudes:
    """Exactly ``k`` entries of largest magnitude of a tensor that arrives as a stream of flat chunks.

    ``chunks()`` must yield the same chunks, in the same order, every time it is called: the cut is found in
    one pass over them bracketed by a sample (:meth:`_cut_from_sample`), or in two (a histogram of the top 15
    bits of each magnitude's bit pattern finds the bin that holds the k-th largest, then only that bin's
    entries are ranked), so the tensor never needs to exist whole. :meth:`mask` then takes the chunks once more, in order. Of equal magnitudes at the cut the first
    ones by position are kept, so the sets for growing k are nested.
    """

    def __init__(self, chunks: Callable[[], Iterable[torch.Tensor]], k: int, n: int,
                 scan: "_NativeScan | None" = None, _defer: bool = False):
        self.k, self.n, self.kth, self._offset = k, n, None, 0
        self._tie_positions = torch.empty(0, dtype=torch.int64)  # kept entries equal to the cut
        self._cut = 0.0  # the cut as a magnitude, for hardshrink
        self._exact: torch.Tensor | None = None  # dtypes without a bit ordering: a plain mask, sliced
        self._key_dtype: torch.dtype | None = None  # the dtype whose bit patterns kth is in
        self._last_tie: int | None = None  # instead of _tie_positions: ties kept up to this position
        if 0 < k < n and not _defer and id(self) not in _cuts_from_scans([(self, scan)]):
            self._find_cut(chunks)

    @classmethod
    def together(cls, requests: list[tuple[Callable[[], Iterable[torch.Tensor]], int, "_NativeScan | None"]],
                 n: int) -> list["TopMagnitudes"]:
        """One :class:`TopMagnitudes` for each (chunks, k, scan) over tensors of n entries, the kernels finding
        all cuts whose scans share one tensor's inputs in one pass (every model's trim; Breadcrumbs' two cuts
        of each model), which reads the base once."""
        tops = [cls(chunks, k, n, _defer=True) for chunks, k, _ in requests]
        settled = _cuts_from_scans([(top, scan) for top, (_, _, scan) in zip(tops, requests)])
        for top, (chunks, _, _) in zip(tops, requests):
            if 0 < top.k < n and id(top) not in settled:
                top._find_cut(chunks)
        return tops

    def native_cut(self) -> tuple[int, int] | None:
        """The cut as the fused kernels take it, (k-th largest key, last kept tie's position; -1: none),
        or None when it is not in float32 keys."""
        if self.k <= 0:
            return native.KEEP_NONE_KTH, -1
        if self.k >= self.n:
            return native.KEEP_EVERY_KTH, -1
        if self._exact is not None or self._key_dtype != torch.float32:
            return None
        if self._last_tie is not None:
            return int(self.kth), self._last_tie
        last = int(self._tie_positions[-1]) if self._tie_positions.numel() else -1
        return int(self.kth), last

    def _scan_bracket(self, scan: "_NativeScan") -> tuple[int, int] | None:
        if self.n // (1 << 16) < 8:
            return None  # small tensors: the histogram costs little
        return _sample_bracket(scan.sample(), self.k / self.n, ordered=True)

    def _settle_band(self, scan: "_NativeScan", bracket: tuple[int, int], result, band: int) -> bool:
        """The cut from one band's scan: ``result`` is (keys above hi, band keys or None, histogram or None)."""
        lo, hi = bracket
        n = self.n
        count_above, keys, histogram = result
        need = self.k - count_above  # band entries to keep: the largest
        in_band = int(histogram.sum()) if histogram is not None else keys.numel()
        if not 0 < need <= in_band:
            return False
        if histogram is not None:  # counts of the keys lo..hi
            from_top = torch.cumsum(histogram.flip(0), 0)
            j = int(torch.searchsorted(from_top, torch.tensor(need, dtype=from_top.dtype)))
            kth, greater = hi - j, int(from_top[j - 1]) if j > 0 else 0
            equal = int(histogram[kth - lo])
        else:
            kth = int(torch.kthvalue(keys, keys.numel() - need + 1).values)
            greater, equal = int(torch.count_nonzero(keys > kth)), int(torch.count_nonzero(keys == kth))
        ties = need - greater  # of the entries equal to the cut, the first `ties` by position are kept
        self._last_tie = n if ties == equal else scan.position_of(kth, ties, band)
        self.kth = torch.tensor(kth, dtype=torch.int32)
        self._tie_positions = None
        self._cut = _key_as_magnitude(kth, torch.float32)
        self._key_dtype = torch.float32
        return True

    def _settle(self, count_above: int, keys: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> bool:
        """The cut from the band's keys (in order of position) and the count of keys above the band."""
        need = self.k - count_above  # band entries to keep: the largest
        if not 0 < need <= keys.numel():
            return False
        self.kth = torch.kthvalue(keys, keys.numel() - need + 1).values
        ties = need - int(torch.count_nonzero(keys > self.kth))
        self._tie_positions = positions[keys == self.kth][:ties]
        self._cut = _key_as_magnitude(int(self.kth), dtype)
        self._key_dtype = dtype
        return True

    def _find_cut(self, chunks) -> None:
        first = next(iter(chunks()))
        self._key_dtype = first.dtype
        if first.dtype not in _MAGNITUDE_BITS:
            magnitude = torch.cat([c.abs().flatten().double() for c in chunks()])
            self._exact = torch.zeros(self.n, dtype=torch.bool, device=first.device)
            self._exact[torch.sort(magnitude, descending=True, stable=True).indices[: self.k]] = True
            return
        if not self._cut_from_sample(chunks, first.dtype):
            self._cut_from_histogram(chunks, first)

    def _cut_from_sample(self, chunks, dtype: torch.dtype) -> bool:
        """Find the cut in one pass over the chunks, bracketed by a strided sample of the magnitudes.

        The sample's order statistics give magnitudes lo <= hi that hold the k-th largest entry with
        overwhelming probability (5 binomial standard deviations); one pass counts the entries above hi and
        collects those in [lo, hi] with their positions (float operations and one nonzero: about half the cost
        of the histogram's two passes). The bracket is checked, never trusted: False (and the histogram) when
        the k-th largest is not inside it, when k is too close to 0 or n for a sample to help, or when the
        bracket reaches zero (many exact zeros, whose positions a nonzero cannot collect).
        """
        n, k = self.n, self.k
        stride = n // (1 << 16)
        if stride < 8:
            return False  # small tensors: the histogram costs little
        sample = torch.cat([_magnitude_keys(c.reshape(-1)[::stride]) for c in chunks()])
        bracket = _sample_bracket(sample, k / n)
        if bracket is None:
            return False
        lo, hi = bracket
        hi_magnitude = _key_as_magnitude(hi, dtype)
        below_lo = _key_as_magnitude(lo - 1, dtype)  # hardshrink keeps |x| > below_lo, i.e. |x| >= lo
        count_above, values, positions, offset = 0, [], [], 0
        for c in chunks():
            c = c.reshape(-1)
            above = torch.nn.functional.hardshrink(c, hi_magnitude)
            count_above += int(torch.sign(above).abs_().sum(dtype=torch.float64))  # exact; faster than count_nonzero
            band = torch.nn.functional.hardshrink(c, below_lo).sub_(above)  # x where lo <= |x| <= hi, else 0
            at = torch.nonzero(band).flatten()
            values.append(band[at])
            positions.append(at + offset)
            offset += c.numel()
        return self._settle(count_above, _magnitude_keys(torch.cat(values)), torch.cat(positions), dtype)

    def _cut_from_histogram(self, chunks, first: torch.Tensor) -> None:
        """Find the cut in two passes: a histogram of the top 15 bits of the magnitudes' bit patterns finds
        the bin that holds the k-th largest, then that bin's entries are ranked."""
        shift = _MAGNITUDE_BITS[first.dtype][2]
        hist = torch.zeros(1 << 15, dtype=torch.int64, device=first.device)
        for c in chunks():
            hist += torch.bincount(_magnitude_keys(c) >> shift, minlength=1 << 15)
        above = torch.cumsum(hist.flip(0), 0)  # above[j]: entries in the top j+1 bins
        j = int(torch.searchsorted(above, torch.tensor(self.k, device=above.device)))
        top_bin = (1 << 15) - 1 - j
        keys_in_bin, where_in_bin, offset = [], [], 0
        for keys in map(_magnitude_keys, chunks()):
            at = torch.nonzero((keys >> shift) == top_bin).flatten()
            keys_in_bin.append(keys[at])
            where_in_bin.append(at + offset)
            offset += keys.numel()
        in_bin, where = torch.cat(keys_in_bin), torch.cat(where_in_bin)
        higher = int(above[j - 1]) if j > 0 else 0  # entries in the bins above
        self.kth = torch.kthvalue(in_bin, in_bin.numel() - (self.k - higher) + 1).values
        ties = self.k - higher - int(torch.count_nonzero(in_bin > self.kth))
        # The entries equal to the cut that are kept: the first ones by position (nonzero keeps order).
        self._tie_positions = where[in_bin == self.kth][:ties]
        self._cut = _key_as_magnitude(int(self.kth), first.dtype)

    def _ties_in(self, start: int, stop: int, chunk: torch.Tensor) -> torch.Tensor:
        """Positions (relative to ``start``) of the kept entries equal to the cut that fall in [start, stop)."""
        if self._last_tie is not None:  # a cut found by the kernels: the ties up to the last kept one
            if self._last_tie < start:
                return torch.empty(0, dtype=torch.int64, device=chunk.device)
            at = torch.nonzero(_magnitude_keys(chunk) == self.kth).flatten()
            return at[at <= self._last_tie - start]
        positions = self._tie_positions
        lo, hi = (int(torch.searchsorted(positions, v)) for v in (start, stop))
        return positions[lo:hi] - start

    def mask(self, chunk: torch.Tensor) -> torch.Tensor:
        """The kept entries of the next chunk (same shape as it)."""
        start, self._offset = self._offset, self._offset + chunk.numel()
        if self.k <= 0 or self.k >= self.n:
            return torch.full_like(chunk, self.k > 0, dtype=torch.bool)
        if self._exact is not None:
            return self._exact[start:self._offset].view(chunk.shape)
        keep = _magnitude_keys(chunk) > self.kth
        ties = self._ties_in(start, self._offset, chunk)
        if ties.numel():
            keep[ties] = True
        return keep.view(chunk.shape)

    def prune(self, chunk: torch.Tensor) -> torch.Tensor:
        """The next chunk with every entry not kept set to zero (a new tensor): what :meth:`mask` keeps, in one
        float operation (hardshrink keeps |x| > cut) instead of a boolean mask, several times faster on CPU."""
        start, self._offset = self._offset, self._offset + chunk.numel()
        if self.k <= 0 or self.k >= self.n:
            return chunk.clone() if self.k > 0 else torch.zeros_like(chunk)
        if self._exact is not None:
            return chunk * self._exact[start:self._offset].view(chunk.shape)
        out = torch.nn.functional.hardshrink(chunk, self._cut)
        ties = self._ties_in(start, self._offset, chunk)
        if ties.numel():
            flat, source = out.view(-1), chunk.reshape(-1)
            flat[ties] = source[ties]
        return out


def _cuts_from_scans(items: list[tuple[TopMagnitudes, "_NativeScan | None"]]) -> set[int]:
    """:meth:`TopMagnitudes._cut_from_sample` done by the fused kernels, for several cuts over one tensor's
    inputs at once: a sample of each score's keys (evenly spaced runs of consecutive positions: one cache line
    each, where single positions cost a cache miss each) brackets each cut, then one pass on all threads counts
    the keys above each bracket and collects (or, for few distinct keys, counts) those inside it; a cut that
    splits a run of equal keys searches one thread's range for its last kept one. Returns the ids of the
    TopMagnitudes settled; the others (no scan, k of 0 or n, or a bracket that misses) are left to torch."""
    pending = [(top, scan, top._scan_bracket(scan)) for top, scan in items if scan is not None and 0 < top.k < top.n]
    pending = [(top, scan, bracket) for top, scan, bracket in pending if bracket is not None]
    settled = set()
    if pending:
        found = _scan_bands([(scan, bracket) for _, scan, bracket in pending])
        for (top, scan, bracket), (result, band) in zip(pending, found):
            if top._settle_band(scan, bracket, result, band):
                settled.add(id(top))
    return settled


def _sample_bracket(sample: torch.Tensor, q: float, ordered: bool = False) -> tuple[int, int] | None:
    """Keys lo <= hi that hold the entry of rank q·n from the top with overwhelming probability (5 binomial
    standard deviations of the sample's order statistics); None when q is too close to 0 or 1 for the sample
    to help, or the bracket reaches zero. ``ordered``: the sample is already in ascending order."""
    m = sample.numel()
    spread = 5.0 * math.sqrt(m * q * (1.0 - q)) + 16.0
    above_hi, above_lo = int(q * m - spread), int(q * m + spread)  # sample entries above hi, above lo
    if above_hi < 1 or above_lo >= m:
        return None
    ordered = sample if ordered else torch.sort(sample).values  # one sort: 3x faster than two kthvalue calls
    hi, lo = int(ordered[m - above_hi - 1]), int(ordered[m - above_lo - 1])
    if lo == 0:
        return None
    return lo, hi


def _key_as_magnitude(key: int, dtype: torch.dtype) -> float:
    """The magnitude whose bit pattern is ``key`` (exact: a Python float holds any float32/16 value)."""
    int_dtype = _MAGNITUDE_BITS[dtype][0]
    return float(torch.tensor([key], dtype=int_dtype).view(dtype)[0])


def _chunks_of(t: torch.Tensor) -> Callable[[], Iterable[torch.Tensor]]:
    flat = t.reshape(-1)
    return lambda: (flat[s:s + ELEMENTWISE_CHUNK] for s in range(0, flat.numel(), ELEMENTWISE_CHUNK))


def _top_magnitudes(t: torch.Tensor, k: int) -> torch.Tensor:
    """Flat boolean mask of exactly ``k`` entries of ``t`` with the largest magnitude (:class:`TopMagnitudes`)."""
    top = TopMagnitudes(_chunks_of(t), k, t.numel())
    return torch.cat([top.mask(chunk) for chunk in _chunks_of(t)()])


def topk_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the ``density`` fraction of entries of ``t`` with the largest magnitude.

    density 1 keeps everything, 0 nothing; exactly round(density·n) entries are kept, and of several equal
    magnitudes at the threshold the first ones (by position) are. The threshold is found by ranking the
    magnitudes' bit patterns (:func:`_top_magnitudes`), several times faster on CPU than torch.topk.
    """
    n = t.numel()
    k = int(round(density * n))
    if k >= n:
        return torch.ones_like(t, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(t, dtype=torch.bool)
    return _top_magnitudes(t, k).view_as(t)


def magnitude_threshold_mask(t: torch.Tensor, threshold: float) -> torch.Tensor:
    """Entries whose magnitude is at least ``threshold`` (for a threshold found over the whole model)."""
    return t.abs() >= threshold


def elect_sign(task_vectors: list[torch.Tensor], method: str = "sum") -> torch.Tensor:
    """TIES sign election (Yadav et al., arXiv:2306.01708) with one equal vote per model: the sign of Σ τ_i
    ("sum", the paper's), or the sign held by more models ("count"). Zero where the vote is tied at zero."""
    ones = torch.ones(len(task_vectors), dtype=task_vectors[0].dtype)
    return weighted_sign_election(task_vectors, ones, method)


def disjoint_merge(task_vectors: list[torch.Tensor], weights: torch.Tensor, sign: torch.Tensor,
                   normalize: bool = True) -> torch.Tensor:
    """Combine the entries that agree with ``sign`` (TIES' disjoint merge, arXiv:2306.01708).

    normalize=True divides each position by the summed weight of the models that agree there (the TIES
    paper's disjoint mean); False returns the weighted disjoint sum (MergeBench's variant, arXiv:2505.10833).
    Positions where no model agrees (or the vote tied) give 0.
    """
    # With p = τ·γ, an agreeing entry is p > 0 and its value is γ·p, so the sum of agreeing entries is
    # γ·Σ w·max(p, 0): multiplying by ±1 is exact, and this takes about half the passes over memory of
    # testing agreement and gathering the entries separately.
    # Only float operations: on CPU a comparison or a boolean mask costs 3-15 times a float operation.
    out = torch.zeros_like(task_vectors[0])
    norm = torch.zeros_like(task_vectors[0]) if normalize else None
    for tv, w in zip(task_vectors, weights.tolist()):
        agreement = torch.mul(tv, sign).clamp_(min=0)
        if norm is not None:
            norm.add_(torch.sign(agreement), alpha=w)  # sign of a clamped value: 1 where it agrees, else 0
        out.add_(agreement, alpha=w)
    out.mul_(sign)
    if norm is not None:
        # Where no model agrees out is already 0: divide by 1 there, i.e. add 1 − |sign(norm)|.
        norm.add_(torch.sign(norm).abs_().neg_().add_(1.0))
        out.div_(norm)
    return out


def bernoulli_keep(t: torch.Tensor, density: float, uniforms: torch.Tensor, rescale: bool = True) -> torch.Tensor:
    """DARE (Yu et al., arXiv:2311.03099): keep each entry with probability ``density`` (= 1 − p), i.e. where
    its uniform number (:func:`uniform`, as many as ``t`` has entries) is below ``density``, and rescale the
    kept ones by 1/density so the expectation is unchanged."""
    if density >= 1.0:
        return t.clone()
    if density <= 0.0:
        return torch.zeros_like(t)
    # keep = u < density, as a float 1/0: sign(density − u) clamped at 0 (float operations only: faster on CPU
    # than a boolean mask; the same kept entries).
    keep = uniforms.reshape(t.shape).neg().add_(density).sign_().clamp_(min=0)
    out = t * (keep if keep.dtype == t.dtype else keep.to(t.dtype))
    return out.div_(density) if rescale else out


class GlobalMagnitudeThreshold:
    """The magnitude above which the top ``density`` fraction of a whole model's entries lie, found while
    streaming: memory of one histogram, not of the model.

    Pass 1 (``add``) counts magnitudes by the top 19 bits of their bit pattern (for float32: the exponent and
    11 mantissa bits, so a bin spans a factor of at most 1.0005), a few million entries at a time.
    ``threshold()`` then interpolates inside the bin that holds the k-th largest entry, which is exact up to
    the entries of that one bin. For an exact threshold, call ``locate()`` and run a second pass of
    ``add_exact`` over the same tensors: the entries of that bin are then ranked.
    """

    BIN_BITS = 19
    CHUNK = 1 << 22

    def __init__(self, density: float):
        self.density = float(density)
        self.count = 0
        self.hist: torch.Tensor | None = None
        self._dtype: torch.dtype | None = None
        self._bin: int | None = None
        self._above = 0
        self._values: list[torch.Tensor] | None = None

    def _keys(self, x: torch.Tensor):
        """|x| as integers ordered like |x|, a chunk at a time."""
        if self._dtype is None:
            self._dtype = x.dtype if x.dtype in _MAGNITUDE_BITS else torch.float32
            self._int_dtype = _MAGNITUDE_BITS[self._dtype][0]
            magnitude_bits = torch.iinfo(self._int_dtype).bits - 1
            self._shift = max(magnitude_bits - self.BIN_BITS, 0)
            self.hist = torch.zeros(1 << (magnitude_bits - self._shift), dtype=torch.int64)
        flat = x.detach().reshape(-1)
        for start in range(0, flat.numel(), self.CHUNK):
            yield _magnitude_keys(flat[start:start + self.CHUNK].to(self._dtype))

    def add(self, x: torch.Tensor) -> None:
        for keys in self._keys(x):
            counts = torch.bincount(keys >> self._shift).cpu()
            self.hist[: counts.numel()] += counts
        self.count += x.numel()

    @property
    def k(self) -> int:
        return int(round(self.density * self.count))

    def locate(self) -> None:
        """Find the bin holding the k-th largest magnitude (called by ``threshold`` when needed)."""
        k = self.k
        if k <= 0 or k >= self.count:
            self._bin = -1
            return
        above = torch.cumsum(self.hist.flip(0), 0)  # above[j]: entries in the top j+1 bins
        j = int(torch.searchsorted(above, torch.tensor(k, dtype=above.dtype)))
        self._bin = self.hist.numel() - 1 - j
        self._above = int(above[j - 1]) if j > 0 else 0

    def add_exact(self, x: torch.Tensor) -> None:
        """Optional second pass: keep the entries of the located bin, so ``threshold`` is exact."""
        if self._bin is None:
            self.locate()
        if self._values is None:
            self._values = []
        for keys in self._keys(x):
            selected = keys[(keys >> self._shift) == self._bin]
            if selected.numel():
                self._values.append(selected.cpu())

    def _magnitude(self, key: int) -> float:
        return float(torch.tensor([key], dtype=self._int_dtype).view(self._dtype).item())

    def threshold(self) -> float:
        """Entries with |x| >= threshold are the top ``density`` fraction (ties at the threshold all kept)."""
        k = self.k
        if k <= 0:
            return float("inf")
        if k >= self.count:
            return 0.0
        if self._bin is None:
            self.locate()
        need = k - self._above  # how many of this bin's entries belong to the top k
        if self._values is not None:
            values = torch.cat(self._values) if self._values else torch.zeros(0, dtype=torch.int64)
            if values.numel() == 0:
                return float("inf")
            return self._magnitude(int(torch.topk(values, min(need, values.numel())).values.min()))
        in_bin = float(self.hist[self._bin])
        # Linear inside the bin: within one exponent, the bit pattern grows linearly with the magnitude.
        frac = 1.0 - need / in_bin
        return self._magnitude(int((self._bin + frac) * (1 << self._shift)))


# --- shared by the TIES / DARE / Breadcrumbs / DELLA family --------------------------------------------------
def task_vector(inputs: TensorInputs, model_index: int) -> torch.Tensor:
    """τ_i = θ_i − θ_base for one model (Ilharco et al., arXiv:2212.04089), so a merger can hold one task
    vector at a time instead of the N that :meth:`TensorInputs.task_vectors` builds."""
    if inputs.base is None:
        raise MergeplugError(f"{inputs.name}: this merger needs a base_model to take task vectors against")
    dtype = inputs.compute_dtype or inputs.models[model_index].dtype
    return inputs.models[model_index].to(dtype) - inputs.base.to(dtype)


def weighted_sign_election(task_vectors: list[torch.Tensor], weights: torch.Tensor, method: str = "sum") -> torch.Tensor:
    """TIES sign election (arXiv:2306.01708) on the weighted task vectors w_i·τ_i.

    "sum" (the paper's): sign(Σ_i w_i τ_i); "count": sign(Σ_i sign(w_i τ_i)), one vote per model that has a
    non-zero weight. With unit weights this is :func:`elect_sign`; weighting the vote (as mergekit does) keeps a
    model of weight 0 from voting. Zero where the vote is tied. Weights are expected to be >= 0.
    """
    total = torch.zeros_like(task_vectors[0])
    if method == "sum":
        for tv, w in zip(task_vectors, weights.tolist()):
            total.add_(tv, alpha=w)
    elif method == "count":
        for tv, w in zip(task_vectors, weights.tolist()):
            if w != 0:
                total.add_(torch.sign(tv), alpha=1.0 if w > 0 else -1.0)
    else:
        raise MergeplugError(f"unknown sign election method {method!r}; known: sum, count")
    return torch.sign(total)


def ties_merge(task_vectors: list[torch.Tensor], weights: torch.Tensor, *, sign_method: str = "sum",
               normalize: bool = True, vote_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Elect a sign per position, then combine only the entries that agree with it (TIES, arXiv:2306.01708).

    normalize=True: the paper's disjoint mean, Σ_{i agrees} w_i τ_i / Σ_{i agrees} w_i; False: the disjoint sum
    Σ_{i agrees} w_i τ_i (MergeBench, arXiv:2505.10833). Positions where the vote ties give 0. The vote is
    weighted by ``vote_weights`` (default: ``weights``; SCE votes unweighted and merges with its own weights).
    """
    votes = weights if vote_weights is None else vote_weights
    return elementwise_in_chunks(lambda part: _elect_and_merge(part, weights, votes, sign_method, normalize),
                                 task_vectors)


def _elect_and_merge(task_vectors, weights, votes, sign_method: str, normalize: bool) -> torch.Tensor:
    sign = weighted_sign_election(task_vectors, votes, sign_method)
    return disjoint_merge(task_vectors, weights, sign, normalize)


def breadcrumbs_mask(t: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs' mask (Davari & Belilovsky, arXiv:2312.06795) over one tensor.

    Drops the ``gamma`` fraction of entries with the largest magnitude (outliers) and keeps the next ``density``
    fraction; the smallest entries are dropped too. ``density`` is the fraction kept in the end: when
    gamma + density > 1 fewer outliers are dropped, as in mergekit's ``magnitude_outliers``. Counts are rounded
    like :func:`topk_mask`, so exactly round(density·n) entries are kept; equal magnitudes are ranked by
    position.
    """
    n = t.numel()
    n_outer, n_inner = _breadcrumbs_counts(n, density, gamma)
    outer, inner = TopMagnitudes(_chunks_of(t), n_outer, n), TopMagnitudes(_chunks_of(t), n_inner, n)
    flat = t.reshape(-1)
    return (outer.mask(flat) & ~inner.mask(flat)).view_as(t)


def check_magprune(density: float, epsilon: float, where: str) -> None:
    """MAGPRUNE's keep probabilities density ± epsilon/2 must lie in (0, 1] (arXiv:2406.11617)."""
    if 0.0 < density < 1.0 and not (density - epsilon / 2 > 0.0 and density + epsilon / 2 <= 1.0):
        raise MergeplugError(
            f"{where}: density {density} with epsilon {epsilon} gives keep probabilities from "
            f"{density - epsilon / 2:g} to {density + epsilon / 2:g}; choose epsilon < 2·density and "
            f"epsilon <= 2·(1 − density)"
        )


def magprune_keep_probabilities(t: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MAGPRUNE keep probabilities (Deep et al., arXiv:2406.11617), same shape as ``t``.

    Within each row (the last dimension; a 1-D tensor is one row) entries are ranked by magnitude, r = 0 for
    the smallest to n − 1 for the largest, and kept with probability density − ε/2 + ε·r/(n − 1): a window of
    width ε centred on ``density``, so a row keeps ``density`` of its entries on average. This is the paper's ε
    (the official code's ``window_size``); mergekit's ``epsilon`` is half of it. A row of one entry gets
    ``density``. Probabilities are at least float32: ranks past 256 do not fit a bfloat16.
    """
    dtype = torch.promote_types(t.dtype, torch.float32)
    rows = t.reshape(-1, t.shape[-1]) if t.dim() > 0 else t.reshape(1, 1)
    n = rows.shape[-1]
    if n < 2:
        return torch.full(t.shape, density, dtype=dtype, device=t.device)
    probabilities = torch.empty(rows.shape, dtype=dtype, device=t.device)
    block = max(1, ELEMENTWISE_CHUNK // n)  # rows at a time: ranks are per row, so blocks are exact
    positions = torch.arange(n, device=t.device, dtype=dtype).expand(block, n)
    for start in range(0, rows.shape[0], block):
        part = rows[start:start + block]
        if part.dtype in _MAGNITUDE_BITS:  # integer keys sort in the same stable order as |x|, 25% faster
            magnitude = _magnitude_keys(part).view(part.shape)
        else:
            magnitude = part.abs()
        order = torch.argsort(magnitude, dim=-1, stable=True)
        out = probabilities[start:start + block]
        out.scatter_(-1, order, positions[: part.shape[0]])
        out.mul_(epsilon / (n - 1)).add_(density - epsilon / 2)
    return probabilities.view(t.shape)


def magprune(t: torch.Tensor, density: float, epsilon: float, uniforms: torch.Tensor, rescale: bool = True,
             where: str = "magprune") -> torch.Tensor:
    """DELLA's MAGPRUNE (arXiv:2406.11617): keep each entry with its rank-based probability p_i
    (:func:`magprune_keep_probabilities`), i.e. where its uniform number (:func:`uniform`, as many as ``t`` has
    entries) is below p_i, and divide the kept ones by p_i, so the expectation is unchanged.

    density 1 keeps everything and 0 nothing, whatever ε; ε = 0 is DARE (:func:`bernoulli_keep`).
    """
    if density >= 1.0:
        return t.clone()
    if density <= 0.0:
        return torch.zeros_like(t)
    check_magprune(density, epsilon, where)
    probs = magprune_keep_probabilities(t, density, epsilon)
    keep = uniforms.reshape(t.shape) < probs
    out = torch.where(keep, t, torch.zeros_like(t))
    return out.div_(probs) if rescale else out


def model_label(inputs: TensorInputs, model_index: int) -> str:
    """``models[i] (name)`` for error messages."""
    names = inputs.model_names
    return f"models[{model_index}] ({names[model_index]})" if model_index < len(names) else f"models[{model_index}]"


#: ``keep(model_index, chunk of τ_i) -> kept entries``: a per-model mask decided a chunk at a time, the chunks
#: of each model arriving in order (TIES' trim, Breadcrumbs' band, Localize-and-Stitch's mask).
KeepRule = Callable[[int, torch.Tensor], torch.Tensor]

#: ``prune(model_index, chunk of τ_i) -> pruned chunk``: a method's per-model pruning step, given each model's
#: chunks in order, each of whole rows (flat); it may overwrite the chunk. A :class:`Pruner` is one that the
#: fused kernels can run too.
ChunkPruner = Callable[[int, torch.Tensor], torch.Tensor]


def pruned_by(keep: KeepRule) -> ChunkPruner:
    """The pruner that zeroes what ``keep`` does not keep (multiplying by the mask: on CPU several times faster
    than masked_fill)."""
    return lambda i, chunk: chunk.mul_(keep(i, chunk))


class Pruner:
    """A :data:`ChunkPruner` that the fused CPU kernels (:mod:`mergeplug.native`) can also run.

    Calling it prunes one model's chunks, in order, with torch operations (any device); :meth:`rule` describes
    the same pruning to the kernels, which then do the whole merge of a tensor in one pass. Subclasses here:
    :class:`MagnitudeBand`, :class:`MagnitudeThreshold`, :class:`RandomKeep`, :class:`RankedKeep`.
    """

    def __call__(self, i: int, chunk: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rule(self, i: int) -> dict[str, Any] | None:
        """Model i's rule for the kernels (``kind`` and its numbers), or None: only the torch path can run it."""
        return None


_KEEP_EVERY = (native.KEEP_EVERY_KTH, -1)
_KEEP_NONE = (native.KEEP_NONE_KTH, -1)


class MagnitudeBand(Pruner):
    """Keep model i's entries that are in the top set of ``outer[i]`` but not in that of ``inner[i]``
    (:class:`TopMagnitudes`; an outer None keeps every entry, an inner None removes none): TIES' trim is the
    outer set alone, Model Breadcrumbs' band the difference of two."""

    def __init__(self, outer: list[TopMagnitudes | None], inner: list[TopMagnitudes | None] | None = None):
        self.outer, self.inner = outer, inner or [None] * len(outer)

    def __call__(self, i: int, chunk: torch.Tensor) -> torch.Tensor:
        outer, inner = self.outer[i], self.inner[i]
        if inner is None:
            return outer.prune(chunk) if outer is not None else chunk
        removed = inner.prune(chunk)
        # The inner set lies inside the outer one (ties are kept first by position in both): kept − removed.
        return (outer.prune(chunk) if outer is not None else chunk).sub_(removed)

    def rule(self, i: int) -> dict[str, Any] | None:
        outer = self.outer[i].native_cut() if self.outer[i] is not None else _KEEP_EVERY
        inner = self.inner[i].native_cut() if self.inner[i] is not None else _KEEP_NONE
        if outer is None or inner is None:
            return None
        return {"kind": native.KEEP_BAND, "outer": outer, "inner": inner}


class MagnitudeThreshold(Pruner):
    """Keep model i's entries with |τ_i| >= ``thresholds[i]`` (a threshold found over the whole model)."""

    def __init__(self, thresholds: list[float]):
        self.thresholds = thresholds

    def __call__(self, i: int, chunk: torch.Tensor) -> torch.Tensor:
        return chunk.mul_(magnitude_threshold_mask(chunk, self.thresholds[i]))

    def rule(self, i: int) -> dict[str, Any] | None:
        # torch compares |x| with the threshold rounded to float32: |x| >= t is key(|x|) > key(t) − 1.
        key = int(torch.tensor([abs(self.thresholds[i])], dtype=torch.float32).view(torch.int32)[0])
        return {"kind": native.KEEP_BAND, "outer": (key - 1, -1), "inner": _KEEP_NONE}


class RandomKeep(Pruner):
    """DARE's drop (arXiv:2311.03099, :func:`bernoulli_keep`): keep model i's entry at position p where
    ``uniform(keys[i], p) < densities[i]``, rescaled by 1/density if ``rescale``."""

    def __init__(self, densities: list[float], keys: list[int], rescale: bool = True):
        self.densities, self.keys, self.rescale = densities, keys, rescale
        self._offsets = [0] * len(densities)

    def __call__(self, i: int, chunk: torch.Tensor) -> torch.Tensor:
        return bernoulli_keep(chunk, self.densities[i], self._draws(i, chunk), self.rescale)

    def _draws(self, i: int, chunk: torch.Tensor) -> torch.Tensor:
        """Model i's uniform numbers for ``chunk``, the next of its chunks in order."""
        start, self._offsets[i] = self._offsets[i], self._offsets[i] + chunk.numel()
        return uniform(self.keys[i], start, chunk.numel(), chunk.device)

    def rule(self, i: int) -> dict[str, Any] | None:
        density = self.densities[i]
        if density >= 1.0:
            return {"kind": native.KEEP_ALL}
        if density <= 0.0:
            return {"kind": native.KEEP_BAND, "outer": _KEEP_NONE, "inner": _KEEP_NONE}
        return {"kind": native.KEEP_RANDOM, "density": density, "key": self.keys[i]}


class RankedKeep(RandomKeep):
    """DELLA's MAGPRUNE (arXiv:2406.11617, :func:`magprune`) within rows of ``row`` entries: keep model i's
    entry at position p where ``uniform(keys[i], p)`` is below its rank-based probability."""

    def __init__(self, densities: list[float], epsilons: list[float], keys: list[int], row: int,
                 rescale: bool = True, where: list[str] | None = None):
        super().__init__(densities, keys, rescale)
        self.epsilons, self.row = epsilons, row
        self.where = where or [f"magprune: models[{i}]" for i in range(len(densities))]
        for d, e, w in zip(densities, epsilons, self.where):
            check_magprune(d, e, w)

    def __call__(self, i: int, chunk: torch.Tensor) -> torch.Tensor:
        return magprune(chunk.view(-1, self.row), self.densities[i], self.epsilons[i], self._draws(i, chunk),
                        self.rescale, where=self.where[i]).reshape(-1)

    def rule(self, i: int) -> dict[str, Any] | None:
        density = self.densities[i]
        if self.row < 2 or not 0.0 < density < 1.0:  # all, none, or a row of one entry: DARE's rule
            return super().rule(i)
        return {"kind": native.KEEP_RANKED, "density": density, "epsilon": self.epsilons[i], "key": self.keys[i]}


def task_vector_chunks(inputs: TensorInputs, model_index: int) -> Callable[[], Iterable[torch.Tensor]]:
    """τ_i = θ_i − θ_base as a re-iterable stream of flat cache-sized chunks (for :class:`TopMagnitudes`), in
    the compute dtype."""
    if inputs.base is None:
        task_vector(inputs, model_index)  # raises the missing-base error
    base, model = inputs.base.reshape(-1), inputs.models[model_index].reshape(-1)
    dtype = inputs.compute_dtype or model.dtype
    return lambda: (model[s:s + ELEMENTWISE_CHUNK].to(dtype) - base[s:s + ELEMENTWISE_CHUNK].to(dtype)
                    for s in range(0, base.numel(), ELEMENTWISE_CHUNK))


def _top_magnitudes_of(inputs: TensorInputs, densities: list[float]) -> list[TopMagnitudes]:
    n = inputs.models[0].numel()
    held = _native_inputs(inputs)
    return TopMagnitudes.together(
        [(task_vector_chunks(inputs, i), int(round(d * n)),
          _NativeScan(held, native.SCORE_MAGNITUDE, i) if held else None) for i, d in enumerate(densities)], n)


def top_magnitudes_keep(inputs: TensorInputs, densities: list[float]) -> KeepRule:
    """Keep the top ``densities[i]`` fraction of |τ_i| of this tensor (TIES' trim, arXiv:2306.01708), exactly
    round(density·n) entries as :func:`topk_mask` does, without building τ_i."""
    tops = _top_magnitudes_of(inputs, densities)
    return lambda i, chunk: tops[i].mask(chunk)


def top_magnitudes_prune(inputs: TensorInputs, densities: list[float]) -> MagnitudeBand:
    """The pruner of :func:`top_magnitudes_keep`: the same entries kept, without a boolean mask (faster)."""
    return MagnitudeBand(_top_magnitudes_of(inputs, densities))


def magnitude_threshold_prune(thresholds: list[float]) -> MagnitudeThreshold:
    """Keep |τ_i| >= ``thresholds[i]`` (TIES' trim over the whole model, arXiv:2306.01708)."""
    return MagnitudeThreshold(thresholds)


def _breadcrumbs_counts(n: int, density: float, gamma: float) -> tuple[int, int]:
    """Model Breadcrumbs' two top-k sizes over n entries: outliers + kept, and outliers (the band between them
    is kept); the outliers shrink when gamma + density > 1 (see :func:`breadcrumbs_mask`)."""
    n_keep = min(max(int(round(density * n)), 0), n)
    n_top = min(max(int(round(gamma * n)), 0), n - n_keep)
    return n_top + n_keep, n_top


def _breadcrumbs_sets(inputs: TensorInputs, densities: list[float], gammas: list[float]):
    n = inputs.models[0].numel()
    held = _native_inputs(inputs)
    requests = []
    for i, (density, gamma) in enumerate(zip(densities, gammas)):
        n_outer, n_inner = _breadcrumbs_counts(n, density, gamma)
        chunks = task_vector_chunks(inputs, i)
        scan = _NativeScan(held, native.SCORE_MAGNITUDE, i) if held else None
        requests += [(chunks, n_outer, scan), (chunks, n_inner, scan)]
    tops = TopMagnitudes.together(requests, n)
    return tops[0::2], tops[1::2]


def breadcrumbs_keep(inputs: TensorInputs, densities: list[float], gammas: list[float]) -> KeepRule:
    """:func:`breadcrumbs_mask` for each model's τ_i, decided a chunk at a time."""
    outer, inner = _breadcrumbs_sets(inputs, densities, gammas)
    return lambda i, chunk: outer[i].mask(chunk) & ~inner[i].mask(chunk)


def breadcrumbs_prune(inputs: TensorInputs, densities: list[float], gammas: list[float]) -> MagnitudeBand:
    """The pruner of :func:`breadcrumbs_keep`: the same entries kept, without boolean masks (faster)."""
    return MagnitudeBand(*_breadcrumbs_sets(inputs, densities, gammas))


def random_prune(inputs: TensorInputs, densities: list[float], rescale: bool = True) -> RandomKeep:
    """DARE's drop for each model (:class:`RandomKeep`), its draws keyed by :meth:`TensorInputs.random_key`."""
    return RandomKeep(densities, [inputs.random_key(i) for i in range(len(inputs.models))], rescale)


def magprune_prune(inputs: TensorInputs, densities: list[float], epsilons: list[float], rescale: bool = True,
                   method: str = "magprune") -> RankedKeep:
    """DELLA's MAGPRUNE for each model (:class:`RankedKeep`), ranking within the tensor's rows (its last
    dimension), its draws keyed by :meth:`TensorInputs.random_key`; ``method`` names it in errors."""
    row = inputs.models[0].shape[-1] if inputs.models[0].dim() else 1
    where = [f"{method}: {inputs.name}: {model_label(inputs, i)}" for i in range(len(inputs.models))]
    return RankedKeep(densities, epsilons, [inputs.random_key(i) for i in range(len(inputs.models))], row,
                      rescale, where)


class TopVariance:
    """The positions where the task vectors differ most across models (SCE's select step, arXiv:2408.07990):
    the top ``fraction`` of positions by the population variance of τ_i across models, exactly
    round(fraction·n) of them (ties by position, as :class:`TopMagnitudes`)."""

    def __init__(self, inputs: TensorInputs, fraction: float):
        self.inputs = inputs
        size = inputs.base.numel()
        self._held = _native_inputs(inputs)
        scan = _NativeScan(self._held, native.SCORE_VARIANCE, 0) if self._held else None
        self.top = TopMagnitudes(self._variance_chunks, int(round(fraction * size)), size, scan=scan)
        self._mask: torch.Tensor | None = None

    def _task_vector_chunks(self):
        inputs = self.inputs
        dtype = inputs.compute_dtype or inputs.models[0].dtype
        flat = [t.reshape(-1) for t in (inputs.base, *inputs.models)]
        for s in range(0, flat[0].numel(), ELEMENTWISE_CHUNK):
            base = flat[0][s:s + ELEMENTWISE_CHUNK].to(dtype)
            yield [m[s:s + ELEMENTWISE_CHUNK].to(dtype) - base for m in flat[1:]]

    def _variance_chunks(self):
        return (variance_across(tvs) for tvs in self._task_vector_chunks())

    def mask(self) -> torch.Tensor:
        """The selection as a flat boolean tensor (the torch path's)."""
        if self._mask is None:
            self._mask = torch.cat([self.top.mask(v) for v in self._variance_chunks()])
        return self._mask

    def native_cut(self) -> tuple[int, int] | None:
        return self.top.native_cut()

    def energy(self) -> torch.Tensor:
        """Σ τ_i² over the selected positions, per model (float64)."""
        cut = self.native_cut() if self._held is not None else None
        if cut is not None:
            held, n = self._held, len(self.inputs.models)

            def part(lo: int, hi: int) -> torch.Tensor:
                energy = torch.zeros(n, dtype=torch.float64)
                _check(held.lib.mergeplug_selected_energy(ctypes.byref(held.spec), lo, hi, cut[0], cut[1],
                                                          energy.data_ptr()))
                return energy
            return torch.stack(native.parallel(part, 0, held.numel, held.threads)).sum(0)
        energy = torch.zeros(len(self.inputs.models), dtype=torch.float64)
        chosen, offset = self.mask(), 0
        for tvs in self._task_vector_chunks():
            here = chosen[offset:offset + tvs[0].numel()]
            offset += tvs[0].numel()
            for i, tv in enumerate(tvs):
                energy[i] += float(tv.masked_fill_(~here, 0).square().sum())
        return energy


def variance_across(task_vectors: list[torch.Tensor]) -> torch.Tensor:
    """Population variance across models at each position, in two passes of running sums (no N-fold stack)."""
    n = len(task_vectors)
    mean = weighted_sum(task_vectors, torch.full((n,), 1.0 / n))
    variance = torch.zeros_like(mean)
    for tv in task_vectors:
        variance += (tv - mean).square()
    return variance / n


class _Erase(Pruner):
    """Zero every model's entries outside a selection (a flat boolean mask), chunk after chunk."""

    def __init__(self, mask: torch.Tensor, n_models: int):
        self.mask, self._offsets = mask, [0] * n_models

    def __call__(self, i: int, chunk: torch.Tensor) -> torch.Tensor:
        start, self._offsets[i] = self._offsets[i], self._offsets[i] + chunk.numel()
        return chunk.mul_(self.mask[start:self._offsets[i]])


def _pruned_chunks(inputs: TensorInputs, prune: ChunkPruner | None, reduce, scale: float | None):
    """``reduce(τ̂ chunks)`` over aligned chunks of the task vectors (in the compute dtype), each pruned by
    ``prune``; with ``scale``, θ_base + scale · reduce(...), in the same pass."""
    if inputs.base is None:
        task_vector(inputs, 0)  # raises the missing-base error
    dtype = inputs.compute_dtype or inputs.models[0].dtype

    def step(part: list[torch.Tensor]) -> torch.Tensor:
        part = [x.to(dtype) for x in part]
        task_vectors = [model - part[0] for model in part[1:]]
        if prune is not None:
            task_vectors = [prune(i, tv) for i, tv in enumerate(task_vectors)]
        reduced = reduce(task_vectors)
        return reduced if scale is None else torch.add(part[0], reduced, alpha=scale)

    return elementwise_in_chunks(step, [inputs.base, *inputs.models], dtype=dtype)


def summed_task_vectors(inputs: TensorInputs, prune: ChunkPruner | None = None, *, normalize: bool = False,
                        scale: float | None = None) -> torch.Tensor:
    """Σ_i w_i τ̂_i with w_i the per-model ``weight``: task arithmetic (arXiv:2212.04089) over task vectors
    pruned by ``prune``, or unpruned, a cache-sized chunk at a time: no full-size task vector is allocated.

    normalize=True divides by Σ_i w_i, so weights are relative (mergekit's ``normalize`` of these methods).
    With ``scale`` (λ) the result is the merged tensor θ_base + λ·Σ_i w_i τ̂_i, added in the same pass.
    On the CPU, with a :class:`Pruner`, the fused kernels do it all in one pass (:mod:`mergeplug.native`).
    """
    weights = inputs.weights("weight")
    total_weight = float(weights.sum())
    if normalize and total_weight == 0:
        raise MergeplugError(f"{inputs.name}: normalize=true needs per-model weights that do not sum to 0")

    if inputs.base is None:
        task_vector(inputs, 0)  # raises the missing-base error
    if prune is None and scale is not None:
        # θ_base + λΣ w_i(θ_i − θ_base) = (1 − λΣw_i)·θ_base + Σ λw_i·θ_i: one weighted sum of the inputs
        # (as cheap as a linear merge), equal up to float32 rounding, far below a bf16 output's resolution.
        factors = [scale * w / (total_weight if normalize else 1.0) for w in weights.tolist()]
        coefficients = torch.tensor([1.0 - sum(factors), *factors], dtype=weights.dtype, device=weights.device)
        return weighted_sum([inputs.base, *inputs.models], coefficients, inputs.compute_dtype)

    fused = _fused_merge(inputs, prune, reduce=native.REDUCE_SUM, weights=weights, normalize=normalize,
                         weight_total=total_weight, scale=scale)
    if fused is not None:
        return fused

    def summed(tvs: list[torch.Tensor]) -> torch.Tensor:
        total = weighted_sum(tvs, weights)
        return total.div_(total_weight) if normalize else total

    return _pruned_chunks(inputs, prune, summed, scale)


def ties_task_vectors(inputs: TensorInputs, prune: ChunkPruner | None = None, *, sign_method: str = "sum",
                      normalize: bool = True, scale: float | None = None, weights: torch.Tensor | None = None,
                      vote_weights: torch.Tensor | None = None, selection: TopVariance | None = None,
                      ) -> torch.Tensor:
    """:func:`ties_merge` of the task vectors pruned by ``prune`` (see :func:`summed_task_vectors`), a
    cache-sized chunk at a time; with ``scale`` (λ), θ_base + λ·that.

    ``weights`` default to the per-model ``weight`` and the vote to ``weights`` (:func:`ties_merge`); with a
    ``selection``, every τ_i is first zeroed outside it (SCE's erase).
    """
    if sign_method not in ("sum", "count"):
        raise MergeplugError(f"unknown sign election method {sign_method!r}; known: sum, count")
    weights = inputs.weights("weight") if weights is None else weights
    votes = weights if vote_weights is None else vote_weights
    fused = _fused_merge(inputs, prune, reduce=native.REDUCE_TIES, weights=weights, votes=votes,
                         sign_count=sign_method == "count", normalize=normalize, scale=scale, selection=selection)
    if fused is not None:
        return fused
    if selection is not None:
        erase = _Erase(selection.mask(), len(inputs.models))
        if prune is None:
            prune = erase
        else:
            pruner = prune
            prune = lambda i, chunk: pruner(i, erase(i, chunk))  # noqa: E731 - erase first, as the kernels
    return _pruned_chunks(
        inputs, prune, lambda tvs: _elect_and_merge(tvs, weights, votes, sign_method, normalize), scale)


# --- the fused kernels' side ---------------------------------------------------------------------------------
def _check(status: int) -> None:
    if status != 0:
        raise MemoryError("mergeplug's fused merge kernels could not allocate their scratch memory")


class _NativeInputs:
    """One tensor's base and models as the kernels see them: contiguous CPU tensors and their addresses."""

    def __init__(self, inputs: TensorInputs, lib):
        self.lib = lib
        self.tensors = [t.contiguous() for t in (inputs.base, *inputs.models)]  # alive while the spec is
        n = len(inputs.models)
        codes = [native.DTYPE_CODES[str(t.dtype).removeprefix("torch.")] for t in self.tensors]
        self._models = (ctypes.c_void_p * n)(*[t.data_ptr() for t in self.tensors[1:]])
        self._dtypes = (ctypes.c_int32 * n)(*codes[1:])
        self.spec = native.InputsSpec(n, self.tensors[0].data_ptr(), codes[0], self._models, self._dtypes)
        self.numel = self.tensors[0].numel()
        self.shape = self.tensors[0].shape
        self.threads = native.threads()
        for tensor in self.tensors:  # fault inputs still mapped from their files in, in order (see kernels.c)
            address, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
            native.parallel(lambda lo, hi: lib.mergeplug_touch(address + lo, hi - lo), 0, size, self.threads,
                            grain=1 << 22)


def _native_inputs(inputs: TensorInputs) -> _NativeInputs | None:
    """The kernels' view of ``inputs``, or None where they do not apply (not CPU, not float32 arithmetic, a
    dtype other than float32/bfloat16, no base, or no kernels here)."""
    if inputs.base is None or not inputs.models:
        return None
    tensors = [inputs.base, *inputs.models]
    if (inputs.compute_dtype or inputs.models[0].dtype) != torch.float32:
        return None
    if any(t.device.type != "cpu" or t.dtype not in (torch.float32, torch.bfloat16) or t.shape != inputs.base.shape
           for t in tensors) or inputs.base.numel() == 0:
        return None
    lib = native.library()
    if lib is None:
        return None
    if inputs._native_view is None:  # once per tensor: the pruning cuts and the merge share it
        inputs._native_view = _NativeInputs(inputs, lib)
    return inputs._native_view


class _NativeScan:
    """A score at each position of one tensor (|τ_i| of one model, or the variance of τ across models), which
    the kernels compute on the fly for :class:`TopMagnitudes`."""

    def __init__(self, held: _NativeInputs, kind: int, model: int):
        self.held, self.kind, self.model = held, kind, model
        self._sample: torch.Tensor | None = None
        #: The last band scan's bands of this score: (lo, hi, thread ranges, each range's result).
        self._last_bands: list = []

    #: The sample: this many runs of RUN consecutive positions, evenly spaced (65,536 keys in all).
    RUNS, RUN = 4096, 16

    def sample(self) -> torch.Tensor:
        """The sample's keys in ascending order (taken and sorted once: Breadcrumbs' two cuts of one model
        share them)."""
        if self._sample is not None:
            return self._sample
        keys = torch.empty(self.RUNS * self.RUN, dtype=torch.int32)
        _check(self.held.lib.mergeplug_sample_keys(ctypes.byref(self.held.spec), self.kind, self.model,
                                                   self.held.numel // self.RUNS, self.RUNS, self.RUN,
                                                   keys.data_ptr()))
        self._sample = torch.sort(keys).values
        return self._sample

    #: Bands of at most this many distinct keys are counted in a histogram rather than collected.
    HISTOGRAM_KEYS = 1 << 16

    def _counts_per_range(self, key: int, band: int) -> tuple[list[tuple[int, int]], list[int]] | None:
        """From the last scan's band ``band``, if it covered ``key``: each range's count of entries with it."""
        bands = self._last_bands
        if band >= len(bands):
            return None
        lo, hi, ranges, parts = bands[band]
        if not lo <= key <= hi:
            return None
        counts = [int(p[2][key - lo]) if p[2] is not None else int(torch.count_nonzero(p[1] == key)) for p in parts]
        return ranges, counts

    def position_of(self, key: int, nth: int, band: int = 0) -> int:
        """The position of the ``nth`` (1-based) entry whose score has this key: the counts per thread range
        come from the band scan that found the key (else one more pass), then one range is searched."""
        held, lib, spec = self.held, self.held.lib, ctypes.byref(self.held.spec)
        known = self._counts_per_range(key, band)
        if known is not None:
            ranges, counts = known
        else:
            ranges = native.split(0, held.numel, held.threads)
            counts = native.parallel(
                lambda lo, hi: lib.mergeplug_find_key(spec, self.kind, self.model, lo, hi, key, 0),
                0, held.numel, held.threads)
        for (lo, hi), count in zip(ranges, counts):
            if nth <= count:
                return int(lib.mergeplug_find_key(spec, self.kind, self.model, lo, hi, key, nth))
            nth -= count
        raise AssertionError("fewer entries with this key than counted")


def _scan_bands(requests: list[tuple[_NativeScan, tuple[int, int]]]) -> list[tuple[tuple, int]]:
    """One pass of the kernels on every thread for several bands (lo, hi) of scans over the same inputs: for
    each, ((how many keys are above hi, the keys in [lo, hi] in order of position or None, their histogram
    over lo..hi or None), the band's index in its scan, for :meth:`_NativeScan.position_of`)."""
    held, kind = requests[0][0].held, requests[0][0].kind
    order = sorted(range(len(requests)), key=lambda r: requests[r][0].model)  # each model's bands together
    ranges = native.split(0, held.numel, held.threads)

    def part(start: int, stop: int):
        specs = (native.BandSpec * len(order))()
        buffers = []
        for spec, r in zip(specs, order):
            scan, (lo, hi) = requests[r]
            spec.model, spec.lo, spec.hi = scan.model, lo, hi
            if hi - lo + 1 <= _NativeScan.HISTOGRAM_KEYS:
                counts = torch.zeros(hi - lo + 1, dtype=torch.int64)
                spec.histogram, spec.keys = counts.data_ptr(), None
            else:
                # Room for every entry: a band edge on a frequent key (bfloat16 task vectors have many equal
                # magnitudes) can hold far more than the sample suggests, and a second pass would cost more
                # than address space; only the entries found are ever written, so only they take memory.
                counts = torch.empty(stop - start, dtype=torch.int32)
                spec.histogram, spec.keys = None, counts.data_ptr()
            buffers.append(counts)
        _check(held.lib.mergeplug_band_scan(ctypes.byref(held.spec), kind, start, stop, len(order), specs))
        return [(s.count_above, None if s.histogram else buf[:s.found], buf if s.histogram else None)
                for s, buf in zip(specs, buffers)]

    parts = native.parallel(part, 0, held.numel, held.threads)
    for scan, _ in requests:
        scan._last_bands = []
    results: list = [None] * len(requests)
    for slot, r in enumerate(order):
        scan, (lo, hi) = requests[r]
        mine = [p[slot] for p in parts]
        scan._last_bands.append((lo, hi, ranges, mine))  # for position_of: counts per thread range
        above = sum(p[0] for p in mine)
        if mine[0][2] is not None:
            result = (above, None, torch.stack([p[2] for p in mine]).sum(0))
        else:
            result = (above, torch.cat([p[1] for p in mine]), None)
        results[r] = (result, len(scan._last_bands) - 1)
    return results


def _fused_merge(inputs: TensorInputs, prune: ChunkPruner | None, *, reduce: int, weights: torch.Tensor,
                 votes: torch.Tensor | None = None, sign_count: bool = False, normalize: bool = False,
                 weight_total: float = 1.0, scale: float | None = None, selection: TopVariance | None = None,
                 ) -> torch.Tensor | None:
    """The merge done by the fused kernels, or None where they cannot do it (the caller then runs torch)."""
    if prune is not None and not isinstance(prune, Pruner):
        return None
    held = _native_inputs(inputs)
    if held is None:
        return None
    n = len(inputs.models)
    rules = [prune.rule(i) if prune is not None else {"kind": native.KEEP_ALL} for i in range(n)]
    select = selection.native_cut() if selection is not None else None
    if any(rule is None for rule in rules) or (selection is not None and select is None):
        return None

    def array(values, ctype=ctypes.c_int64):  # one value per model, as the kernels' C array
        return (ctype * n)(*values)

    spec = native.MergeSpec()
    spec.inputs = held.spec
    spec.rule = array([r["kind"] for r in rules], ctypes.c_int32)
    spec.outer_kth = array([r.get("outer", _KEEP_EVERY)[0] for r in rules])
    spec.outer_last = array([r.get("outer", _KEEP_EVERY)[1] for r in rules])
    spec.inner_kth = array([r.get("inner", _KEEP_NONE)[0] for r in rules])
    spec.inner_last = array([r.get("inner", _KEEP_NONE)[1] for r in rules])
    spec.density = array([r.get("density", 1.0) for r in rules], ctypes.c_float)
    spec.rng_key = array([r.get("key", 0) for r in rules], ctypes.c_uint64)
    spec.rescale = int(bool(getattr(prune, "rescale", False)))
    spec.select = int(select is not None)
    spec.select_kth, spec.select_last = select if select is not None else _KEEP_EVERY
    spec.reduce = reduce
    spec.weight = array([float(w) for w in weights.tolist()], ctypes.c_float)
    spec.vote = array([float(v) for v in (votes if votes is not None else weights).tolist()], ctypes.c_float)
    spec.sign_count, spec.normalize, spec.weight_total = int(sign_count), int(normalize), weight_total
    spec.add_base, spec.scale = int(scale is not None), 1.0 if scale is None else scale
    out = torch.empty(held.shape, dtype=torch.float32)
    spec.out = out.data_ptr()
    size, threads, lib = held.numel, held.threads, held.lib

    def fused(start: int, stop: int) -> None:
        _check(lib.mergeplug_fused_merge(ctypes.byref(spec), start, stop))

    ranked = [i for i, rule in enumerate(rules) if rule["kind"] == native.KEEP_RANKED]
    if not ranked:
        native.parallel(fused, 0, size, threads)
        return out
    # MAGPRUNE ranks within rows: the kernels take a row at a time, each thread whole rows.
    row = held.shape[-1]
    spec.row_length = row
    spec.slope = array([r["epsilon"] / (row - 1) if r["kind"] == native.KEEP_RANKED else 0.0 for r in rules],
                      ctypes.c_float)  # as magprune_keep_probabilities: ε/(n − 1) · rank + density − ε/2
    spec.offset = array([r["density"] - r["epsilon"] / 2 if r["kind"] == native.KEEP_RANKED else 0.0 for r in rules],
                       ctypes.c_float)
    native.parallel(lambda lo, hi: fused(lo * row, hi * row), 0, size // row, threads, grain=max(1, 4096 // row))
    return out
