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

import hashlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

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

    def task_vectors(self) -> list[torch.Tensor]:
        """τ_i = θ_i − θ_base (Ilharco et al., arXiv:2212.04089)."""
        if self.base is None:
            raise MergeplugError(f"{self.name}: this merger needs a base_model to take task vectors against")
        return [m - self.base for m in self.models]

    def weights(self, key: str = "weight", default: float = 1.0) -> torch.Tensor:
        """The per-model scalar ``key`` as a 1-D tensor on the inputs' device and dtype."""
        ref = self.models[0]
        return torch.tensor([float(p.get(key, default)) for p in self.model_parameters], dtype=ref.dtype, device=ref.device)

    def generator(self, model_index: int) -> torch.Generator:
        """A generator seeded from (seed, tensor name, model index): results do not depend on merge order."""
        digest = hashlib.sha256(f"{self.seed}\0{self.name}\0{model_index}".encode()).digest()
        gen = torch.Generator(device=self.models[0].device)
        gen.manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)
        return gen


class Merger:
    """Base class of merge methods.

    Class attributes a subclass may set:
      ``needs_base``: the method takes task vectors against a base model (the recipe must name one);
      ``prepasses``: how many streaming passes over every tensor the engine runs, calling
        :meth:`observe` with the pass index, before merging any (0: none).
    The recipe's global parameters, defaults filled in, are in ``self.parameters``.
    """

    needs_base: ClassVar[bool] = True
    prepasses: ClassVar[int] = 0

    def __init__(self, parameters: dict[str, Any] | None = None):
        self.parameters = dict(parameters or {})

    def observe(self, inputs: TensorInputs, pass_index: int) -> None:
        """Pre-pass ``pass_index`` (0-based): see one tensor's inputs (only when ``prepasses`` > 0)."""

    def finish_observing(self, pass_index: int) -> None:
        """Called once at the end of each pre-pass."""

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        """The merged tensor, same shape as the inputs, in their dtype."""
        raise NotImplementedError


# --- shared primitives -------------------------------------------------------------------------------------
def weighted_sum(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i t_i without stacking (peak memory of two tensors, not N)."""
    out = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weights.tolist()):
        out.add_(t, alpha=w)
    return out


def topk_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the ``density`` fraction of entries of ``t`` with the largest magnitude.

    density 1 keeps everything, 0 nothing; ties at the threshold are broken by position (exactly k kept).
    """
    n = t.numel()
    k = int(round(density * n))
    if k >= n:
        return torch.ones_like(t, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(t, dtype=torch.bool)
    flat = t.abs().flatten()
    idx = torch.topk(flat, k, sorted=False).indices
    mask = torch.zeros(n, dtype=torch.bool, device=t.device)
    mask[idx] = True
    return mask.view_as(t)


def magnitude_threshold_mask(t: torch.Tensor, threshold: float) -> torch.Tensor:
    """Entries whose magnitude is at least ``threshold`` (for a threshold found over the whole model)."""
    return t.abs() >= threshold


def elect_sign(task_vectors: list[torch.Tensor], method: str = "sum") -> torch.Tensor:
    """TIES sign election (Yadav et al., arXiv:2306.01708): the sign of Σ τ_i ("sum", the paper's), or the
    sign held by more models ("count"). Zero where the vote is tied at zero."""
    if method == "sum":
        total = torch.zeros_like(task_vectors[0])
        for tv in task_vectors:
            total.add_(tv)
        return torch.sign(total)
    if method == "count":
        total = torch.zeros_like(task_vectors[0])
        for tv in task_vectors:
            total.add_(torch.sign(tv))
        return torch.sign(total)
    raise MergeplugError(f"unknown sign election method {method!r}; known: sum, count")


def disjoint_merge(task_vectors: list[torch.Tensor], weights: torch.Tensor, sign: torch.Tensor,
                   normalize: bool = True) -> torch.Tensor:
    """Combine the entries that agree with ``sign`` (TIES' disjoint merge).

    normalize=True divides each position by the summed weight of the models that agree there (the TIES
    paper's disjoint mean); False returns the weighted disjoint sum (MergeBench's variant).
    """
    out = torch.zeros_like(task_vectors[0])
    norm = torch.zeros_like(task_vectors[0]) if normalize else None
    for tv, w in zip(task_vectors, weights.tolist()):
        agree = (torch.sign(tv) == sign) & (tv != 0)
        out.add_(torch.where(agree, tv, torch.zeros_like(tv)), alpha=w)
        if norm is not None:
            norm.add_(agree.to(norm.dtype), alpha=w)
    if norm is not None:
        out = torch.where(norm.abs() > 0, out / norm.where(norm.abs() > 0, torch.ones_like(norm)), torch.zeros_like(out))
    return out


def bernoulli_keep(t: torch.Tensor, density: float, generator: torch.Generator, rescale: bool = True) -> torch.Tensor:
    """DARE (Yu et al., arXiv:2311.03099): keep each entry with probability ``density`` (= 1 − p) and
    rescale the kept ones by 1/density so the expectation is unchanged."""
    if density >= 1.0:
        return t.clone()
    if density <= 0.0:
        return torch.zeros_like(t)
    keep = torch.rand(t.shape, generator=generator, device=t.device) < density
    out = torch.where(keep, t, torch.zeros_like(t))
    return out / density if rescale else out


class GlobalMagnitudeThreshold:
    """The magnitude above which the top ``density`` fraction of a whole model's entries lie, found while
    streaming: memory of one histogram, not of the model.

    Pass 1 (``add``) builds a histogram of log2|x| over fine bins (65,536 bins over 2^-40..2^20: each bin
    spans a factor of 1.0006). ``threshold()`` then interpolates inside the bin that holds the k-th largest
    entry, which is exact up to the entries of that one bin. For an exact threshold, call ``locate()`` and
    run a second pass of ``add_exact`` over the same tensors: the entries of that bin are then ranked.
    """

    BINS = 65536
    LOW, HIGH = -40.0, 20.0  # log2 range; smaller magnitudes fall into bin 0, larger into the last

    def __init__(self, density: float):
        self.density = float(density)
        self.hist = torch.zeros(self.BINS, dtype=torch.float64)
        self.count = 0
        self._bin: int | None = None
        self._above = 0
        self._values: list[torch.Tensor] | None = None

    def _bins(self, x: torch.Tensor) -> torch.Tensor:
        logs = torch.log2(x.abs().flatten().double().clamp_min(2.0 ** self.LOW))
        scaled = (logs - self.LOW) / (self.HIGH - self.LOW) * self.BINS
        return scaled.long().clamp_(0, self.BINS - 1)

    def add(self, x: torch.Tensor) -> None:
        self.hist += torch.bincount(self._bins(x), minlength=self.BINS).double().cpu()
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
        j = int(torch.searchsorted(above, torch.tensor(float(k), dtype=torch.float64)))
        self._bin = self.BINS - 1 - j
        self._above = int(above[j - 1]) if j > 0 else 0

    def add_exact(self, x: torch.Tensor) -> None:
        """Optional second pass: keep the entries of the located bin, so ``threshold`` is exact."""
        if self._bin is None:
            self.locate()
        if self._values is None:
            self._values = []
        sel = self._bins(x) == self._bin
        if bool(sel.any()):
            self._values.append(x.abs().flatten()[sel.to(x.device)].float().cpu())

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
            values = torch.cat(self._values) if self._values else torch.zeros(0)
            if values.numel() == 0:
                return float("inf")
            return float(torch.topk(values, min(need, values.numel())).values.min())
        in_bin = float(self.hist[self._bin])
        frac = 1.0 - need / in_bin  # interpolate in log space from the bin's lower edge
        width = (self.HIGH - self.LOW) / self.BINS
        return float(2.0 ** (self.LOW + (self._bin + frac) * width))
