"""Token alignment for knowledge fusion: pair two tokenisations of one text, map one vocabulary onto another.

Knowledge fusion (FuseLLM, arXiv:2401.10491; FuseChat, arXiv:2402.16107) trains a pivot model towards the
next-token distributions of source models whose tokenizers differ. Two things must be aligned:

**Sequence alignment** (:func:`align`, :func:`align_many`): which pivot positions correspond to which source
positions of the same text. From the tokenizers' character offsets this is exact and linear: the two token
sequences are cut wherever *both* have a token boundary at the same character; each piece between two common cuts
is a *group* of tokens that together cover the same characters (one-to-one, one-to-many, many-to-one, or
many-to-many when boundaries cross). Rules, each our choice:

- *Whitespace*: tokenizers disagree on where a run of spaces goes (byte-level BPE glues it to the next word,
  ``Ġworld``; SentencePiece may emit a lone ``▁``; WordPiece and ``trim_offsets`` drop it from every span; some
  glue it to the previous word). Where neither side has a cut at the same character inside or at the edges of a
  whitespace run, their first cuts in that run are matched, so ``hello|Ġworld`` pairs with ``hello▁|world``. A
  whitespace-only token keeps its span: paired when the other side has the same cut, else part of the group it
  falls in, or unpaired (-1) when the other side covers none of its characters.
- *Special tokens with an empty span* (BOS/EOS added by a template get offsets ``(0, 0)``) are paired by role
  with the other side's special of the same role at the same place (after the same text), k-th with k-th;
  otherwise unpaired. A special token written in the text (``<|im_start|>``) has a span and is aligned like
  any token. An ordinary token with an empty span joins the group that starts at its position.
- *Bytes of one character*: byte-level tokens that split one character share its span and so its group.

Without offsets (slow tokenizers) the edit-distance dynamic programme of FuseLLM (arXiv:2401.10491) aligns the
token strings; it is quadratic and drifts on repeated whitespace and split punctuation, so it is used only when
a side has no offsets (``benchmarks/alignment_speed.py`` measures how often it agrees with the offsets).

The result, :class:`SequenceAlignment`, is two arrays of group ids (one per pivot and per source position, -1
where unpaired); :meth:`SequenceAlignment.pivot_to_source` turns it into "the source position whose next-token
distribution belongs to this pivot position".

**Vocabulary mapping** is the plugin kind ``aligner`` (:class:`TokenAligner`): fitted once per (source tokenizer,
pivot tokenizer) pair, it holds ``token_map`` (source id -> pivot id, -1 where none) and moves a source
position's top-k distribution onto pivot ids (:meth:`TokenAligner.map_distribution`).

Token *surfaces* (:func:`normalize_token`) are what aligners compare: byte-level BPE characters decoded to their
bytes (``Ġ`` -> space, ``Ċ`` -> newline), SentencePiece ``▁`` -> space, WordPiece ``##`` dropped, byte-fallback
tokens ``<0x0A>`` -> that byte; bytes that are not whole UTF-8 characters become lone surrogates
(``surrogateescape``), so a byte-level piece and a ``<0xE2>`` token of the same byte have the same surface.
Special tokens map to the pivot's special token of the same role (eos/bos/unk/pad/cls/sep/mask, a token with
several roles taking the first: GPT-2's ``<|endoftext|>`` is an EOS; other special tokens to an identical special
string) and are never mined; without a counterpart they stay unmapped (-1).

*Padding* never enters an alignment: a :class:`Tokenization` holds one text's real tokens (cut a padded batch to
each row's length first), and in top-k arrays a negative id is an empty slot, dropped like an unmapped token.
Pivot positions without a paired source position get padding rows (id -1, log-probability -inf).

No torch import here: tensors passed in are converted with numpy and converted back.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import weakref
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Sequence

import numpy as np

from .atomic import replacing
from .errors import MergeplugError

#: Special-token roles, in priority order: a token with several roles takes the first, the role in which a model
#: predicts it (GPT-2's ``<|endoftext|>`` is bos and eos: eos; Llama's pad is often its eos: eos).
ROLES = ("eos", "bos", "unk", "pad", "cls", "sep", "mask")
#: Role name -> the code shared by every tokenizer's special token of that role.
ROLE_CODES = {role: i + 1 for i, role in enumerate(ROLES)}
_OTHER_SPECIAL = 1000  # codes of other special tokens: this plus a checksum of their string
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_WS_LIMIT = 0x3001  # every character with str.isspace() is below U+3001
CACHE_ENV = "MERGEPLUG_CACHE"
_CACHE_FORMAT = 1


# --- token surfaces ------------------------------------------------------------------------------------------
def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: the printable character standing for each byte."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in table.items()}


_BYTE_LEVEL = _byte_level_table()


def normalize_token(token: str, scheme: str) -> str:
    """The text a token stands for, so tokens of different tokenizers compare as text.

    ``scheme`` is one of ``byte_level`` (GPT-2 style: each character is a byte), ``metaspace`` (SentencePiece
    ``▁``), ``wordpiece`` (``##`` continuation prefix; word starts carry no space, WordPiece cannot say whether a
    space preceded them) or ``plain``. Byte-fallback tokens ``<0xNN>`` become byte NN in every scheme but
    byte-level. Bytes that do not form whole UTF-8 characters decode to lone surrogates (``surrogateescape``).
    """
    if scheme == "byte_level":
        try:
            raw = bytes(_BYTE_LEVEL[c] for c in token)
        except KeyError:  # an added token written as plain text
            return token
        return raw.decode("utf-8", "surrogateescape")
    match = _BYTE_TOKEN.match(token)
    if match:
        return bytes([int(match.group(1), 16)]).decode("utf-8", "surrogateescape")
    if scheme == "metaspace":
        return token.replace("\u2581", " ")
    if scheme == "wordpiece" and token.startswith("##") and len(token) > 2:
        return token[2:]
    return token


def detect_scheme(tokenizer) -> str:
    """How ``tokenizer`` writes spaces and bytes in its tokens (see :func:`normalize_token`)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        parts = json.dumps([spec.get(k) for k in ("normalizer", "pre_tokenizer", "decoder")], ensure_ascii=False)
        if '"ByteLevel"' in parts:
            return "byte_level"
        if (spec.get("model") or {}).get("type") == "WordPiece" or '"WordPiece"' in parts:
            return "wordpiece"
        if "\u2581" in parts:
            return "metaspace"
        return "plain"
    counts = {"byte_level": 0, "metaspace": 0, "wordpiece": 0}
    for token in tokenizer.get_vocab():
        counts["byte_level"] += token.startswith("\u0120")
        counts["metaspace"] += token.startswith("\u2581")
        counts["wordpiece"] += token.startswith("##")
    best = max(counts, key=counts.get)
    return best if counts[best] else "plain"


def _role_code(role: str, token: str) -> int:
    return ROLE_CODES.get(role) or _OTHER_SPECIAL + zlib.crc32(token.encode("utf-8")) % 10**9


def _special_surface(code: int) -> str:
    return f"\x00{code}"  # no real token contains NUL: specials only ever match specials of the same role


@dataclass(eq=False)
class Vocabulary:
    """A tokenizer's vocabulary as aligners see it: by id, the token, its surface and its special role.

    ``roles[i]`` is 0 for an ordinary token, else a code shared by every tokenizer's token of that role
    (:data:`ROLES`; other special tokens: a code derived from their string). ``byte_fallback[i]`` marks
    ``<0xNN>`` tokens (demoted in ties: the model rarely predicts them where a text token exists).
    """

    tokens: list[str | None]
    scheme: str
    roles: np.ndarray
    name: str = ""

    def __post_init__(self):
        self.roles = np.asarray(self.roles, dtype=np.int64)
        if self.roles.shape != (len(self.tokens),):
            raise MergeplugError(f"vocabulary {self.name!r}: {len(self.tokens)} tokens but {self.roles.shape} roles")

    @classmethod
    def from_tokens(cls, tokens: Sequence[str | None], scheme: str = "plain",
                    specials: dict[str, str] | None = None, name: str = "") -> "Vocabulary":
        """A vocabulary from a list of tokens (id = index); ``specials`` maps a role (or any label) to a token."""
        roles = np.zeros(len(tokens), dtype=np.int64)
        index = {t: i for i, t in enumerate(tokens) if t is not None}
        for role, token in (specials or {}).items():
            if token not in index:
                raise MergeplugError(f"vocabulary {name!r}: special token {token!r} ({role}) is not in the tokens")
            if not roles[index[token]]:
                roles[index[token]] = _role_code(role, token)
        return cls(list(tokens), scheme, roles, name)

    @classmethod
    def of(cls, tokenizer) -> "Vocabulary":
        """The vocabulary of a Hugging Face tokenizer (cached per tokenizer object); a Vocabulary is returned as is."""
        if isinstance(tokenizer, Vocabulary):
            return tokenizer
        try:
            cached = _VOCABULARIES.get(tokenizer)
        except TypeError:  # not weak-referenceable
            cached = None
        if cached is not None and cached[0] == len(tokenizer):  # tokens added since: build it again
            return cached[1]
        vocab = tokenizer.get_vocab()
        size = max(len(tokenizer), max(vocab.values(), default=-1) + 1)
        tokens: list[str | None] = [None] * size
        for token, i in vocab.items():
            tokens[i] = token
        specials: dict[str, str] = {}
        for role in ROLES:
            token = getattr(tokenizer, f"{role}_token", None)
            if isinstance(token, str) and token in vocab:
                specials.setdefault(role, token)
        for token in getattr(tokenizer, "all_special_tokens", []):
            if token in vocab and token not in specials.values():
                specials[f"special:{token}"] = token
        result = cls.from_tokens(tokens, detect_scheme(tokenizer), specials, getattr(tokenizer, "name_or_path", ""))
        try:
            _VOCABULARIES[tokenizer] = (len(tokenizer), result)
        except TypeError:
            pass
        return result

    @property
    def size(self) -> int:
        return len(self.tokens)

    @cached_property
    def surfaces(self) -> list[str]:
        """Each token's normalised text ('' for ids without a token); specials get a role marker."""
        out = []
        for token, code in zip(self.tokens, self.roles.tolist()):
            out.append(_special_surface(code) if code else "" if token is None else normalize_token(token, self.scheme))
        return out

    @cached_property
    def byte_fallback(self) -> np.ndarray:
        return np.array([t is not None and self.scheme != "byte_level" and bool(_BYTE_TOKEN.match(t))
                         for t in self.tokens], dtype=bool)

    @cached_property
    def ordinary_ids(self) -> np.ndarray:
        """Ids of tokens that may be mined: not special, with a non-empty surface."""
        nonempty = np.array([bool(s) for s in self.surfaces], dtype=bool)
        return np.flatnonzero((self.roles == 0) & nonempty).astype(np.int64)

    @cached_property
    def role_ids(self) -> dict[int, int]:
        """Role code -> the first id with that role."""
        out: dict[int, int] = {}
        for i in np.flatnonzero(self.roles).tolist():
            out.setdefault(int(self.roles[i]), i)
        return out

    @cached_property
    def fingerprint(self) -> str:
        """A hash of everything a token map depends on: tokens, roles and scheme."""
        blob = json.dumps([self.scheme, self.tokens, self.roles.tolist()], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


_VOCABULARIES: "weakref.WeakKeyDictionary[Any, tuple[int, Vocabulary]]" = weakref.WeakKeyDictionary()


# --- tokenisations -------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Tokenization:
    """One text as one tokenizer cut it.

    ``ids`` int64 [n]; ``tokens`` the token strings; ``offsets`` int64 [n, 2], each token's character span
    ``text[start:end]``, or None when the tokenizer gives none (then only the dynamic programme can align it);
    ``roles`` int64 [n], 0 for ordinary tokens, else the special role code (:class:`Vocabulary`). No padding:
    a padded batch is cut to each row's real length before it becomes a Tokenization.
    """

    text: str
    tokens: list[str]
    offsets: np.ndarray | None = None
    ids: np.ndarray | None = None
    roles: np.ndarray | None = None
    scheme: str = "plain"

    def __post_init__(self):
        n = len(self.tokens)
        self.ids = np.full(n, -1, np.int64) if self.ids is None else np.asarray(self.ids, dtype=np.int64)
        self.roles = np.zeros(n, np.int64) if self.roles is None else np.asarray(self.roles, dtype=np.int64)
        if self.offsets is not None:
            self.offsets = np.asarray(self.offsets, dtype=np.int64).reshape(-1, 2)
        for what, array in (("ids", self.ids), ("roles", self.roles), ("offsets", self.offsets)):
            if array is not None and len(array) != n:
                raise MergeplugError(f"tokenization: {n} tokens but {len(array)} {what}; give one per token")

    def __len__(self) -> int:
        return len(self.tokens)

    def surfaces(self) -> list[str]:
        """Normalised token texts (:func:`normalize_token`); special tokens get a role marker."""
        return [_special_surface(code) if code else normalize_token(tok, self.scheme)
                for tok, code in zip(self.tokens, self.roles.tolist())]


def tokenize(tokenizer, text: str, *, add_special_tokens: bool = True) -> Tokenization:
    """``text`` as ``tokenizer`` cuts it; offsets come from fast tokenizers, slow ones give None."""
    return tokenize_many(tokenizer, [text], add_special_tokens=add_special_tokens)[0]


def tokenize_many(tokenizer, texts: Sequence[str], *, add_special_tokens: bool = True) -> list[Tokenization]:
    """:func:`tokenize` for many texts in one call (fast tokenizers encode them in parallel)."""
    vocab = Vocabulary.of(tokenizer)
    texts = list(texts)
    out = []
    if getattr(tokenizer, "is_fast", False):
        batch = tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                          return_attention_mask=False, return_token_type_ids=False)
        for text, encoding in zip(texts, batch.encodings):
            ids = np.asarray(encoding.ids, dtype=np.int64)
            out.append(Tokenization(text, encoding.tokens, np.asarray(encoding.offsets, dtype=np.int64),
                                    ids, _roles_of(vocab, ids), vocab.scheme))
        return out
    for text in texts:
        ids = np.asarray(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"], dtype=np.int64)
        out.append(Tokenization(text, tokenizer.convert_ids_to_tokens(ids.tolist()), None, ids,
                                _roles_of(vocab, ids), vocab.scheme))
    return out


def _roles_of(vocab: Vocabulary, ids: np.ndarray) -> np.ndarray:
    inside = (ids >= 0) & (ids < vocab.size)
    return np.where(inside, vocab.roles[np.where(inside, ids, 0)], 0)


# --- sequence alignment --------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class SequenceAlignment:
    """Groups of pivot and source tokens that cover the same characters.

    ``pivot_group[i]`` / ``source_group[j]``: the group of pivot position i / source position j, or -1 when it
    has no counterpart. Groups are numbered 0.. in the order of their first pivot position; each has at least
    one token on each side; a group's tokens are consecutive positions on each side (one-to-one, one-to-many,
    many-to-one or many-to-many). ``method``: ``offsets`` or ``edit_distance``.
    """

    pivot_group: np.ndarray
    source_group: np.ndarray
    method: str

    @property
    def n_groups(self) -> int:
        return int(self.pivot_group.max()) + 1 if self.pivot_group.size and self.pivot_group.max() >= 0 else 0

    def group_sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """Pivot tokens and source tokens in each group (two int arrays of length ``n_groups``)."""
        g = self.n_groups
        return (np.bincount(self.pivot_group[self.pivot_group >= 0], minlength=g),
                np.bincount(self.source_group[self.source_group >= 0], minlength=g))

    def pivot_to_source(self, anchor: str = "end") -> np.ndarray:
        """For each pivot position the source position paired with it, -1 for none (int64 [n_pivot]).

        ``anchor="end"``: the last token of each group on both sides; both models have then read exactly the
        same text, so the distribution a model outputs at that position (its prediction of the next token) is
        comparable: use it with distributions stored at the position that produced them (logits[t] predicts
        token t+1). ``anchor="start"``: the first tokens, which start at the same character: use it with
        distributions stored at the position of the token they predict. Other positions of a group get -1.
        """
        if anchor not in ("end", "start"):
            raise MergeplugError(f"pivot_to_source: anchor must be 'end' or 'start', not {anchor!r}")
        g = self.n_groups
        pick = _last_per_group if anchor == "end" else _first_per_group
        pivot_at, source_at = pick(self.pivot_group, g), pick(self.source_group, g)
        out = np.full(self.pivot_group.shape[0], -1, np.int64)
        out[pivot_at] = source_at
        return out

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """Every (pivot position, source position) pair in the same group, as two int64 arrays."""
        pivot_pos = np.flatnonzero(self.pivot_group >= 0)
        source_pos = np.flatnonzero(self.source_group >= 0)
        pg = self.pivot_group[pivot_pos]
        order = np.argsort(self.source_group[source_pos], kind="stable")
        source_sorted = source_pos[order]
        counts = np.bincount(self.source_group[source_pos], minlength=self.n_groups)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        repeat = counts[pg]
        left = np.repeat(pivot_pos, repeat)
        within = np.arange(left.size) - np.repeat(np.cumsum(repeat) - repeat, repeat)
        right = source_sorted[np.repeat(first[pg], repeat) + within]
        return left, right

    def partners(self) -> np.ndarray:
        """For each pivot position the (first, last) source position of its group, (-1, -1) if unpaired."""
        g = self.n_groups
        first, last = _first_per_group(self.source_group, g), _last_per_group(self.source_group, g)
        out = np.full((self.pivot_group.shape[0], 2), -1, np.int64)
        paired = self.pivot_group >= 0
        out[paired, 0] = first[self.pivot_group[paired]]
        out[paired, 1] = last[self.pivot_group[paired]]
        return out

    def agreement(self, other: "SequenceAlignment") -> float:
        """The fraction of pivot positions paired with exactly the same source positions in both alignments."""
        if self.pivot_group.shape != other.pivot_group.shape:
            raise MergeplugError("agreement: the two alignments have different pivot lengths")
        if not self.pivot_group.size:
            return 1.0
        return float(np.mean(np.all(self.partners() == other.partners(), axis=1)))


def _last_per_group(groups: np.ndarray, n_groups: int) -> np.ndarray:
    at = np.full(n_groups, -1, np.int64)
    positions = np.flatnonzero(groups >= 0)
    np.maximum.at(at, groups[positions], positions)
    return at


def _first_per_group(groups: np.ndarray, n_groups: int) -> np.ndarray:
    at = np.full(n_groups, np.iinfo(np.int64).max, np.int64)
    positions = np.flatnonzero(groups >= 0)
    np.minimum.at(at, groups[positions], positions)
    return at


def align(pivot: Tokenization, source: Tokenization) -> SequenceAlignment:
    """Align two tokenisations of the same text: by offsets when both have them, else by FuseLLM's DP."""
    return align_many([pivot], [source])[0]


def align_many(pivots: Sequence[Tokenization], sources: Sequence[Tokenization]) -> list[SequenceAlignment]:
    """:func:`align` for many pairs; the pairs with offsets are aligned together in one vectorised pass."""
    if len(pivots) != len(sources):
        raise MergeplugError(f"align_many: {len(pivots)} pivot tokenisations but {len(sources)} source ones")
    out: list[SequenceAlignment | None] = [None] * len(pivots)
    with_offsets = []
    for i, (p, s) in enumerate(zip(pivots, sources)):
        if p.text != s.text:
            raise MergeplugError(f"align: pair {i} tokenises two different texts; align tokenisations of the same text")
        if p.offsets is not None and s.offsets is not None:
            with_offsets.append(i)
        else:
            out[i] = align_by_edit_distance(p, s)
    for i, result in zip(with_offsets, _align_offsets_batch([pivots[i] for i in with_offsets],
                                                            [sources[i] for i in with_offsets])):
        out[i] = result
    return out  # type: ignore[return-value]


def align_by_offsets(pivot: Tokenization, source: Tokenization) -> SequenceAlignment:
    """Exact, linear-time alignment from character offsets (the module docstring gives the rules)."""
    if pivot.offsets is None or source.offsets is None:
        raise MergeplugError("align_by_offsets: both tokenisations need character offsets (use align())")
    if pivot.text != source.text:
        raise MergeplugError("align_by_offsets: the two tokenisations are of different texts")
    return _align_offsets_batch([pivot], [source])[0]


_WS_TABLE: np.ndarray | None = None


def _whitespace_mask(text: str) -> np.ndarray:
    global _WS_TABLE
    if _WS_TABLE is None:
        _WS_TABLE = np.array([chr(c).isspace() for c in range(_WS_LIMIT)], dtype=bool)
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    return _WS_TABLE[np.minimum(codes, _WS_LIMIT - 1)]


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    values = np.sort(values, kind="stable")  # mostly-sorted input: timsort runs in near-linear time
    return values[np.concatenate([[True], values[1:] != values[:-1]])] if values.size else values


def _member(values: np.ndarray, sorted_unique: np.ndarray) -> np.ndarray:
    if not sorted_unique.size:
        return np.zeros(values.shape, dtype=bool)
    at = np.minimum(np.searchsorted(sorted_unique, values), sorted_unique.size - 1)
    return sorted_unique[at] == values


@dataclass
class _Side:
    starts: np.ndarray
    ends: np.ndarray
    roles: np.ndarray
    counts: np.ndarray  # tokens per document
    by_role: np.ndarray  # empty-span special tokens: paired by role, not by span

    @classmethod
    def build(cls, toks: Sequence[Tokenization], doc_start: np.ndarray) -> "_Side":
        counts = np.array([len(t) for t in toks], dtype=np.int64)
        if counts.sum():
            offsets = np.concatenate([t.offsets for t in toks]) + np.repeat(doc_start, counts)[:, None]
            roles = np.concatenate([t.roles for t in toks])
        else:
            offsets, roles = np.zeros((0, 2), np.int64), np.zeros(0, np.int64)
        starts, ends = offsets[:, 0], offsets[:, 1]
        return cls(starts, ends, roles, counts, (roles != 0) & (starts == ends))

    def cuts(self, doc_start: np.ndarray, doc_end: np.ndarray) -> np.ndarray:
        """Positions where this side has a token boundary that no token straddles (sorted, unique)."""
        span = ~self.by_role
        starts, ends = self.starts[span], self.ends[span]
        if starts.size and np.any(starts[1:] < starts[:-1]):
            order = np.argsort(starts, kind="stable")
            starts, ends = starts[order], ends[order]
        candidates = _sorted_unique(np.concatenate([starts, ends, doc_start, doc_end]))
        if not starts.size:
            return candidates
        reach = np.maximum.accumulate(ends)
        before = np.searchsorted(starts, candidates, "left") - 1
        straddled = (before >= 0) & (reach[np.maximum(before, 0)] > candidates)
        return candidates[~straddled]

    def role_anchors(self, doc_start: np.ndarray) -> np.ndarray:
        """For each token, the end of the text read before it (for empty-span specials: where they sit)."""
        own_doc = np.repeat(doc_start, self.counts)
        return np.maximum.accumulate(np.where(self.by_role, own_doc, self.ends)) if self.ends.size else self.ends


def _match_cuts(pivot_cuts: np.ndarray, source_cuts: np.ndarray, ws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Matched cut positions (pivot side, source side): common cuts, plus one per whitespace run without one."""
    both = np.sort(np.concatenate([pivot_cuts, source_cuts]), kind="stable")
    exact = both[1:][both[1:] == both[:-1]]
    matched_p, matched_s = [exact], [exact]
    if ws.size:
        run_id = np.cumsum(ws & ~np.concatenate([[False], ws[:-1]])) * ws

        def run_at(cuts):
            right = np.where(cuts < ws.size, run_id[np.minimum(cuts, ws.size - 1)], 0)
            left = np.where(cuts > 0, run_id[np.maximum(cuts - 1, 0)], 0)
            return np.where(right > 0, right, left)

        settled = _sorted_unique(run_at(exact))
        firsts = []
        for cuts in (pivot_cuts, source_cuts):
            rest = cuts[~_member(cuts, exact)]
            runs = run_at(rest)
            keep = (runs > 0) & ~_member(runs, settled)
            rest, runs = rest[keep], runs[keep]
            unique_runs, first = np.unique(runs, return_index=True)
            firsts.append((unique_runs, rest[first]))
        (runs_p, at_p), (runs_s, at_s) = firsts
        _, ip, is_ = np.intersect1d(runs_p, runs_s, assume_unique=True, return_indices=True)
        matched_p.append(at_p[ip])
        matched_s.append(at_s[is_])
    mp, ms = np.concatenate(matched_p), np.concatenate(matched_s)
    order = np.argsort(mp, kind="stable")
    mp, ms = mp[order], ms[order]
    # A run pairing that crosses another match would break monotonicity: keep only increasing source cuts.
    increasing = ms > np.maximum.accumulate(np.concatenate([[-1], ms[:-1]]))
    return mp[increasing], ms[increasing]


def _align_offsets_batch(pivots: Sequence[Tokenization], sources: Sequence[Tokenization]) -> list[SequenceAlignment]:
    if not pivots:
        return []
    texts = [p.text for p in pivots]
    lengths = np.array([len(t) for t in texts], dtype=np.int64)
    doc_start = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])  # one NUL between documents
    doc_end = doc_start + lengths
    ws = _whitespace_mask("\x00".join(texts))
    piv, src = _Side.build(pivots, doc_start), _Side.build(sources, doc_start)
    mp, ms = _match_cuts(piv.cuts(doc_start, doc_end), src.cuts(doc_start, doc_end), ws)
    n_span_groups = mp.size

    def span_groups(side: _Side, matched: np.ndarray) -> np.ndarray:
        groups = np.searchsorted(matched, side.starts, "right") - 1
        return np.where(side.by_role, -1, groups)

    gp, gs = span_groups(piv, mp), span_groups(src, ms)
    present = (np.bincount(gp[gp >= 0], minlength=n_span_groups) > 0) & \
              (np.bincount(gs[gs >= 0], minlength=n_span_groups) > 0)
    gp = np.where(gp >= 0, np.where(present[np.maximum(gp, 0)], gp, -1), -1)
    gs = np.where(gs >= 0, np.where(present[np.maximum(gs, 0)], gs, -1), -1)

    # Empty-span special tokens: k-th of a role after the same text pairs with the other side's k-th.
    if piv.by_role.any() and src.by_role.any():
        waiting: dict[tuple[int, int], list[int]] = {}
        anchors_p = piv.role_anchors(doc_start)
        for i in np.flatnonzero(piv.by_role).tolist():
            waiting.setdefault((int(anchors_p[i]), int(piv.roles[i])), []).append(i)
        for queue in waiting.values():
            queue.reverse()
        anchors_s = src.role_anchors(doc_start)
        next_group = n_span_groups
        for j in np.flatnonzero(src.by_role).tolist():
            queue = waiting.get((int(anchors_s[j]), int(src.roles[j])))
            if queue:
                gp[queue.pop()] = gs[j] = next_group
                next_group += 1

    # Renumber densely in order of first pivot position.
    paired = np.flatnonzero(gp >= 0)
    if paired.size:
        labels, first = np.unique(gp[paired], return_index=True)
        relabel = np.full(int(max(gp.max(), gs.max())) + 1, -1, np.int64)
        relabel[labels[np.argsort(first)]] = np.arange(labels.size)
        gp = np.where(gp >= 0, relabel[np.maximum(gp, 0)], -1)
        gs = np.where(gs >= 0, relabel[np.maximum(gs, 0)], -1)

    out = []
    p_bounds = np.concatenate([[0], np.cumsum(piv.counts)]).tolist()
    s_bounds = np.concatenate([[0], np.cumsum(src.counts)]).tolist()
    for d in range(len(pivots)):
        p, s = gp[p_bounds[d]:p_bounds[d + 1]], gs[s_bounds[d]:s_bounds[d + 1]]
        paired_p = p[p >= 0]
        base = int(paired_p.min()) if paired_p.size else 0
        out.append(SequenceAlignment(np.where(p >= 0, p - base, -1), np.where(s >= 0, s - base, -1), "offsets"))
    return out


# --- edit distances ------------------------------------------------------------------------------------------
def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (unit insertions, deletions, substitutions); plain Python, for small inputs."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _codes(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings as a code-point matrix [n, longest] (padded with -1) and their lengths."""
    lengths = np.fromiter((len(s) for s in strings), dtype=np.int64, count=len(strings))
    width = int(lengths.max()) if lengths.size else 0
    out = np.full((len(strings), max(width, 1)), -1, dtype=np.int32)
    if lengths.sum():
        flat = np.frombuffer("".join(strings).encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.int32)
        rows = np.repeat(np.arange(len(strings)), lengths)
        cols = np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        out[rows, cols] = flat
    return out, lengths


def _levenshtein_rows(a_codes: np.ndarray, b_codes: np.ndarray, a_len: np.ndarray, b_len: np.ndarray,
                      limits: np.ndarray | None = None) -> np.ndarray:
    """Levenshtein distances of the pairs (a_codes[p], b_codes[p]), vectorised over pairs.

    Row recurrence with the insertion chain solved by a running minimum:
    D[i, j] = j + min_{k <= j} (T[k] - k), T[k] = min(D[i-1, k] + 1, D[i-1, k-1] + [a_i != b_k]), T[0] = i.
    With ``limits``, a pair whose whole row exceeds its limit is dropped (a row's minimum never decreases
    further down: Ukkonen's cut-off) and reported as ``limit + 1``. Finished pairs are dropped as they finish.
    """
    pairs, width = b_codes.shape
    out = b_len.astype(np.int64).copy()  # distance to an empty string
    if limits is not None:
        out = np.where(out <= limits, out, limits + 1)
    alive = np.flatnonzero(a_len > 0)
    a_codes, b_codes, a_len, b_len = a_codes[alive], b_codes[alive], a_len[alive], b_len[alive]
    limits = None if limits is None else limits[alive]
    col = np.arange(width + 1, dtype=np.int32)
    row = np.broadcast_to(col, (alive.size, width + 1)).copy()
    nxt = np.empty_like(row)
    i = 0
    while alive.size:
        i += 1
        nxt[:, 0] = i
        np.minimum(row[:, 1:] + 1, row[:, :-1] + (a_codes[:, i - 1:i] != b_codes), out=nxt[:, 1:])
        np.subtract(nxt, col, out=nxt)
        np.minimum.accumulate(nxt, axis=1, out=nxt)
        np.add(nxt, col, out=nxt)
        row, nxt = nxt, row
        done = np.flatnonzero(a_len == i)
        if done.size:
            value = row[done, b_len[done]]
            out[alive[done]] = value if limits is None else np.where(value <= limits[done], value, limits[done] + 1)
        if done.size or (limits is not None and i % 4 == 0):
            keep = a_len > i
            if limits is not None:
                keep &= row.min(axis=1) <= limits
            if not keep.all():
                if limits is not None:
                    cut = ~keep & (a_len > i)
                    out[alive[cut]] = limits[cut] + 1
                    limits = limits[keep]
                alive, a_codes, b_codes, a_len, b_len, row = (
                    alive[keep], a_codes[keep], b_codes[keep], a_len[keep], b_len[keep], row[keep])
                nxt = np.empty_like(row)
    return out


def edit_distance_matrix(left: Sequence[str], right: Sequence[str], chunk: int = 1 << 16) -> np.ndarray:
    """All Levenshtein distances between ``left`` and ``right`` (int32 [len(left), len(right)]), in numpy."""
    a_codes, a_len = _codes(left)
    b_codes, b_len = _codes(right)
    out = np.zeros((len(left), len(right)), dtype=np.int32)
    if not len(left) or not len(right):
        return out
    rows_per_chunk = max(1, chunk // len(right))
    for lo in range(0, len(left), rows_per_chunk):
        hi = min(len(left), lo + rows_per_chunk)
        ia = np.repeat(np.arange(lo, hi), len(right))
        ib = np.tile(np.arange(len(right)), hi - lo)
        out[lo:hi] = _levenshtein_rows(a_codes[ia], b_codes[ib], a_len[ia], b_len[ib]).reshape(hi - lo, len(right))
    return out


def edit_distance_pairs(left: Sequence[str], right: Sequence[str], chunk: int = 1 << 16) -> np.ndarray:
    """Levenshtein distances of ``left[p]`` and ``right[p]`` (int32 [n]), in numpy."""
    if len(left) != len(right):
        raise MergeplugError(f"edit_distance_pairs: {len(left)} left strings but {len(right)} right ones")
    out = np.zeros(len(left), dtype=np.int32)
    order = np.argsort([len(s) for s in right], kind="stable")  # similar widths per chunk: less padding
    for lo in range(0, len(order), chunk):
        part = order[lo:lo + chunk]
        a_codes, a_len = _codes([left[i] for i in part])
        b_codes, b_len = _codes([right[i] for i in part])
        out[part] = _levenshtein_rows(a_codes, b_codes, a_len, b_len)
    return out


# --- FuseLLM's dynamic programme -----------------------------------------------------------------------------
def _fusellm_costs(source: Sequence[str], pivot: Sequence[str]) -> np.ndarray:
    """FuseLLM's token distance (arXiv:2401.10491), in tenths: edit distance of the texts with the space
    markers removed, times 0.1 when one text contains the other."""
    src = [s.replace(" ", "") for s in source]
    piv = [p.replace(" ", "") for p in pivot]
    us, inv_s = np.unique(np.array(src, dtype=object), return_inverse=True)
    up, inv_p = np.unique(np.array(piv, dtype=object), return_inverse=True)
    dist = edit_distance_matrix(list(us), list(up)).astype(np.int64)
    contained = np.array([[a in b or b in a for b in up] for a in us], dtype=bool).reshape(dist.shape)
    unique_cost = np.where(contained, dist, dist * 10)
    return unique_cost[inv_s.reshape(-1)][:, inv_p.reshape(-1)]


def _dtw_path(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FuseLLM's dynamic time warping: the monotone path from (0, 0) to (n-1, m-1) of least summed cost.

    Rows are source tokens, columns pivot tokens. Backtrace ties prefer the diagonal, then a source step,
    then a pivot step, as FuseLLM's ``np.argmin([diag, up, left])`` does.
    """
    n, m = cost.shape
    big = np.int64(1) << 50
    total = np.empty((n + 1, m + 1), dtype=np.int64)
    total[0] = big
    total[0, 0] = 0
    total[1:, 0] = big
    for i in range(n):
        # total[i+1, j+1] = c[i, j] + min(total[i, j], total[i, j+1], total[i+1, j]); the last term chains
        # along the row: S_j + running-min(a_k - S_{k-1}) with S the row's cumulative cost.
        a = np.minimum(total[i, :-1], total[i, 1:])
        cum = np.cumsum(cost[i])
        shifted = np.concatenate([[0], cum[:-1]])
        total[i + 1, 1:] = np.minimum(cum + np.minimum.accumulate(a - shifted), big)
    grid = total[1:, 1:]
    i, j = n - 1, m - 1
    path = [(i, j)]
    while i > 0 or j > 0:
        diag = grid[i - 1, j - 1] if i > 0 and j > 0 else big
        up = grid[i - 1, j] if i > 0 else big
        left = grid[i, j - 1] if j > 0 else big
        if diag <= up and diag <= left:
            i, j = i - 1, j - 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
        path.append((i, j))
    path.reverse()
    steps = np.array(path, dtype=np.int64)
    return steps[:, 0], steps[:, 1]


def align_by_edit_distance(pivot: Tokenization, source: Tokenization) -> SequenceAlignment:
    """FuseLLM's alignment (arXiv:2401.10491): dynamic time warping over token strings, O(n·m).

    Each diagonal step of the path starts a new group; steps along one side extend the current group, so the
    path's pairs become groups like the offsets' (every token paired). Used only where a side has no offsets.
    """
    n, m = len(source), len(pivot)
    if not n or not m:
        return SequenceAlignment(np.full(m, -1, np.int64), np.full(n, -1, np.int64), "edit_distance")
    src_steps, piv_steps = _dtw_path(_fusellm_costs(source.surfaces(), pivot.surfaces()))
    diagonal = np.concatenate([[True], (np.diff(src_steps) == 1) & (np.diff(piv_steps) == 1)])
    group = np.cumsum(diagonal) - 1
    pivot_group, source_group = np.empty(m, np.int64), np.empty(n, np.int64)
    pivot_group[piv_steps] = group
    source_group[src_steps] = group
    return SequenceAlignment(pivot_group, source_group, "edit_distance")


# --- nearest-token search ------------------------------------------------------------------------------------
_HIST_BUCKETS = 64  # ASCII letters and digits fall in distinct buckets


class NearestTokenIndex:
    """Minimum-edit-distance search over a vocabulary's surfaces, without one distance per entry per query.

    Distance 0 is a dictionary lookup. Distance 1 is a deletion-neighbourhood lookup: every surface with one
    character deleted is indexed, so a query finds all entries one edit away through itself and its own
    deletions. Farther queries are searched together, in rounds: each query walks the entries in increasing
    order of a lower bound on their distance (length difference, and the bag distance of hashed character
    counts: an edit changes at most one count up and one down), nearby lengths first, measuring exact distances
    in vectorised batches across all queries, and stops at the first entry whose bound cannot beat its best so
    far. So only entries that could be nearest are measured, never one distance per entry per query.

    Ties: the lowest ``demoted`` flag first (byte-fallback tokens), then the lowest id. Empty surfaces are never
    returned.
    """

    def __init__(self, surfaces: Sequence[str], ids: Sequence[int] | None = None,
                 demoted: Sequence[bool] | None = None):
        self.surfaces = list(surfaces)
        n = len(self.surfaces)
        self.ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        demoted = np.zeros(n, bool) if demoted is None else np.asarray(demoted, dtype=bool)
        self.rank = np.empty(n, np.int64)  # position in the tie-break order, lower wins
        self.rank[np.lexsort((self.ids, demoted))] = np.arange(n)
        self._exact: dict[str, int] = {}
        for k in np.argsort(self.rank).tolist():
            if self.surfaces[k]:
                self._exact.setdefault(self.surfaces[k], k)
        self._deletions: dict[str, list[int]] | None = None
        self._sorted: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        self._sorted_rank: np.ndarray | None = None

    def nearest(self, queries: Iterable[str], max_distance: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """For each query the id of the nearest entry and the distance (-1, -1 beyond ``max_distance``/none)."""
        queries = list(queries)
        found = np.full(len(queries), -1, np.int64)
        dist = np.full(len(queries), -1, np.int64)
        farther = []
        for i, query in enumerate(queries):
            if not self._exact:
                break
            k = self._exact.get(query)
            if k is not None:
                found[i], dist[i] = k, 0
            elif max_distance is None or max_distance >= 1:
                k = self._within_one(query)
                if k >= 0:
                    found[i], dist[i] = k, 1
                elif max_distance is None or max_distance >= 2:
                    farther.append(i)
        if farther:
            for i, (k, d) in zip(farther, self._search([queries[i] for i in farther], max_distance)):
                found[i], dist[i] = k, d
        return np.where(found >= 0, self.ids[np.maximum(found, 0)], -1), dist

    def _within_one(self, query: str) -> int:
        if self._deletions is None:
            self._deletions = {}
            for k, s in enumerate(self.surfaces):
                for variant in {s[:i] + s[i + 1:] for i in range(len(s))}:
                    self._deletions.setdefault(variant, []).append(k)
        candidates = set(self._deletions.get(query, ()))
        for variant in {query[:i] + query[i + 1:] for i in range(len(query))}:
            if variant in self._exact:
                candidates.add(self._exact[variant])
            candidates.update(self._deletions.get(variant, ()))
        best = -1
        for k in candidates:
            if (best < 0 or self.rank[k] < self.rank[best]) and _one_edit_apart(query, self.surfaces[k]):
                best = k
        return best

    def _search(self, queries: list[str], max_distance: int | None) -> list[tuple[int, int]]:
        if self._sorted is None:  # every entry, sorted by length: a length window is a slice
            lengths = np.array([len(s) for s in self.surfaces], dtype=np.int64)
            order = np.flatnonzero(lengths > 0)
            order = order[np.argsort(lengths[order], kind="stable")]
            codes, _ = _codes([self.surfaces[k] for k in order.tolist()])
            # bucket-major: a query reads only the columns of its own characters
            self._sorted = (order, lengths[order], codes, np.ascontiguousarray(_histograms(codes).T))
            self._sorted_rank = self.rank[order]
        order, lengths, codes, _ = self._sorted
        walks = [_Walk(self, q, max_distance) for q in queries]
        q_codes, q_len = _codes(queries)
        active = list(range(len(walks)))
        while active:
            jobs = [(w, chunk) for w in active if (chunk := walks[w].next_chunk()) is not None]
            active = [w for w, _ in jobs]
            if not jobs:
                break
            owner = np.concatenate([np.full(chunk.size, w) for w, chunk in jobs])
            entry = np.concatenate([chunk for _, chunk in jobs])
            # Only distances up to each query's best so far matter (ties included): prune beyond it.
            limit = np.array([min(walks[w].best_d, walks[w].limit) for w in active], np.int64)
            limit = np.repeat(limit, [chunk.size for _, chunk in jobs])
            measured = np.empty(entry.size, np.int64)
            # similar query and entry lengths per batch: less padding
            by_size = np.lexsort((lengths[entry], q_len[owner]))
            for lo in range(0, by_size.size, _BATCH):
                part = by_size[lo:lo + _BATCH]
                b_len = lengths[entry[part]]
                a_len = q_len[owner[part]]
                measured[part] = _levenshtein_rows(q_codes[owner[part], :max(int(a_len.max()), 1)],
                                                   codes[entry[part], :int(b_len.max())], a_len, b_len, limit[part])
            at = 0
            for w, chunk in jobs:
                walks[w].update(chunk, measured[at:at + chunk.size])
                at += chunk.size
        return [(int(order[w.best]), w.best_d) if w.best >= 0 else (-1, -1) for w in walks]


_FIRST = 64  # entries with the smallest bounds measured first: they bound the rest of the search
_STEP = 4096  # most entries one query measures per round
_BATCH = 1 << 16  # pairs per vectorised distance batch


class _Walk:
    """One query's search state in :meth:`NearestTokenIndex._search` (positions index the length-sorted entries)."""

    def __init__(self, index: NearestTokenIndex, query: str, max_distance: int | None):
        order, lengths, _, hists = index._sorted
        self.lengths, self.hists, self.q_len = lengths, hists, len(query)
        self.ranks = index._sorted_rank
        q_hist = _histograms(_codes([query])[0][:, :self.q_len])[0] if query else np.zeros(_HIST_BUCKETS, np.int16)
        self.q_buckets = np.flatnonzero(q_hist)
        self.q_counts = q_hist[self.q_buckets]
        self.limit = max(self.q_len, int(lengths[-1])) if max_distance is None else max_distance
        self.best, self.best_d, self.best_rank = -1, self.limit + 1, np.iinfo(np.int64).max
        radius = 2  # nearby lengths first; widen until some entry is in the window
        while True:
            self.lo = int(np.searchsorted(lengths, self.q_len - radius))
            self.hi = int(np.searchsorted(lengths, self.q_len + radius, "right"))
            if self.hi > self.lo or (self.lo == 0 and self.hi == lengths.size):
                break
            radius *= 2
        self.near_bound = self._bounds(self.lo, self.hi)
        counts = np.cumsum(np.bincount(self.near_bound)) if self.near_bound.size else np.zeros(1, np.int64)
        self.first = self.near_bound <= int(np.searchsorted(counts, min(_FIRST, int(counts[-1]))))
        self._queue(np.flatnonzero(self.first) + self.lo, self.near_bound[self.first])
        self.phase = 0

    def _bounds(self, lo: int, hi: int) -> np.ndarray:
        # With L1 the summed count differences and dL the length difference, at least (L1 + dL) / 2 characters
        # must be inserted, deleted or replaced; L1 = len + q_len - 2 * shared, and only the query's own
        # buckets can be shared.
        shared = np.zeros(hi - lo, np.int64)
        for bucket, count in zip(self.q_buckets.tolist(), self.q_counts.tolist()):
            shared += np.minimum(self.hists[bucket, lo:hi], count)
        length = self.lengths[lo:hi]
        gap = np.abs(length - self.q_len)
        return np.maximum((length + self.q_len - 2 * shared + gap + 1) // 2, gap)

    def _queue(self, at: np.ndarray, bound: np.ndarray) -> None:
        sequence = np.lexsort((self.ranks[at], bound))
        self.at, self.bound, self.pos, self.step = at[sequence], bound[sequence], 0, _FIRST

    def _widen(self) -> None:
        """Second phase: every entry of the length window that could still beat the best found."""
        reach = min(self.limit, self.best_d)
        lo = int(np.searchsorted(self.lengths, self.q_len - reach))
        hi = int(np.searchsorted(self.lengths, self.q_len + reach, "right"))
        near = ~self.first & (self.near_bound <= reach)
        at = [np.flatnonzero(near) + self.lo]
        bound = [self.near_bound[near]]
        for a, b in ((lo, min(self.lo, hi)), (max(self.hi, lo), hi)):
            if b > a:
                extra = self._bounds(a, b)
                keep = extra <= reach
                at.append(np.flatnonzero(keep) + a)
                bound.append(extra[keep])
        self._queue(np.concatenate(at), np.concatenate(bound))

    def next_chunk(self) -> np.ndarray | None:
        """The next entries worth measuring, or None when the search is over."""
        while True:
            if self.pos >= self.at.size:
                if self.phase == 1:
                    return None
                self.phase = 1
                self._widen()
                continue
            window = slice(self.pos, self.pos + self.step)
            bound, ranks = self.bound[window], self.ranks[self.at[window]]
            useful = (bound < self.best_d) | ((bound == self.best_d) & (ranks < self.best_rank))
            cut = useful.size if useful.all() else int(np.argmin(useful))
            chunk = self.at[self.pos:self.pos + cut]
            # sorted by (bound, rank): past the first useless entry, none can help
            self.pos = self.pos + cut if cut == useful.size else self.at.size
            self.step = min(self.step * 2, _STEP)
            if chunk.size:
                return chunk

    def update(self, chunk: np.ndarray, dist: np.ndarray) -> None:
        for k in np.flatnonzero(dist == dist.min()).tolist():
            d, rank = int(dist[k]), int(self.ranks[chunk[k]])
            if d <= self.limit and (d, rank) < (self.best_d, self.best_rank):
                self.best, self.best_d, self.best_rank = int(chunk[k]), d, rank


def _histograms(codes: np.ndarray) -> np.ndarray:
    """Hashed character counts per row (padding -1 ignored), int16 [rows, buckets]."""
    rows = np.repeat(np.arange(codes.shape[0]), codes.shape[1])
    flat = codes.reshape(-1)
    keep = flat >= 0
    slots = rows[keep] * _HIST_BUCKETS + (flat[keep] % _HIST_BUCKETS)
    return np.bincount(slots, minlength=codes.shape[0] * _HIST_BUCKETS).reshape(-1, _HIST_BUCKETS).astype(np.int16)


def _one_edit_apart(a: str, b: str) -> bool:
    """Levenshtein distance exactly 1."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) > len(b):
        a, b = b, a
    i = 0
    while i < len(a) and a[i] == b[i]:
        i += 1
    return a[i + (len(a) == len(b)):] == b[i + 1:]


# --- the vocabulary-mapping contract -------------------------------------------------------------------------
class TokenAligner:
    """Maps a source tokenizer's vocabulary (and top-k distributions) onto a pivot tokenizer's.

    Plugin kind ``aligner``; a plugin registers a subclass. Build once per (source, pivot) pair::

        aligner = AlignerClass(parameters).fit(source_tokenizer, pivot_tokenizer, corpus_pairs)
        aligner.token_map                       # int64 [source vocabulary]: pivot id, -1 where none
        ids, logprobs = aligner.map_distribution(topk_ids, topk_logprobs)

    A subclass implements :meth:`build_map`; ``parameters_file`` (its ``parameters.json``) makes the
    constructor fill defaults and reject bad parameters. Special tokens are mapped by role before
    :meth:`build_map` sees the map (:func:`special_token_map`); a subclass fills only ordinary tokens.
    """

    parameters_file: ClassVar[Path | None] = None
    name: ClassVar[str] = "aligner"

    def __init__(self, parameters: dict[str, Any] | None = None):
        parameters = dict(parameters or {})
        if self.parameters_file is not None:
            from .schema import problems, with_defaults

            schema = json.loads(Path(self.parameters_file).read_text(encoding="utf-8"))
            found = problems(parameters, schema, source=f"aligner {self.name!r} parameters")
            if found:
                raise MergeplugError(*found)
            parameters = with_defaults(parameters, schema)
        self.parameters = parameters
        self.token_map: np.ndarray | None = None
        self.source_vocabulary: Vocabulary | None = None
        self.pivot_vocabulary: Vocabulary | None = None
        self.source_tokenizer: Any = None
        self.pivot_tokenizer: Any = None

    def fit(self, source_tokenizer, pivot_tokenizer, corpus_pairs: Iterable | None = None) -> "TokenAligner":
        """Build ``token_map`` from two tokenizers (or :class:`Vocabulary` objects) and, for aligners that learn
        from data, ``corpus_pairs``: texts, or ``(source, pivot)`` :class:`Tokenization` pairs of one text."""
        self.source_tokenizer, self.pivot_tokenizer = source_tokenizer, pivot_tokenizer
        self.source_vocabulary = Vocabulary.of(source_tokenizer)
        self.pivot_vocabulary = Vocabulary.of(pivot_tokenizer)
        token_map = np.asarray(self.build_map(self.source_vocabulary, self.pivot_vocabulary, corpus_pairs),
                               dtype=np.int64)
        if token_map.shape != (self.source_vocabulary.size,) or token_map.max(initial=-1) >= self.pivot_vocabulary.size:
            raise MergeplugError(f"aligner {self.name!r} built a token map of shape {token_map.shape} "
                                 f"for {self.source_vocabulary.size} source tokens (values must be < "
                                 f"{self.pivot_vocabulary.size} or -1)")
        self.token_map = token_map
        return self

    def build_map(self, source: Vocabulary, pivot: Vocabulary, corpus_pairs: Iterable | None) -> np.ndarray:
        """The token map: source id -> pivot id, -1 where none."""
        raise NotImplementedError

    def _fitted(self) -> np.ndarray:
        if self.token_map is None:
            raise MergeplugError(f"aligner {self.name!r}: call fit(source_tokenizer, pivot_tokenizer) first")
        return self.token_map

    def map_ids(self, ids) -> np.ndarray:
        """Source ids -> pivot ids (-1 where unmapped, for negative ids and ids beyond the source vocabulary)."""
        token_map = self._fitted()
        ids = np.asarray(ids, dtype=np.int64)
        inside = (ids >= 0) & (ids < token_map.size)
        return np.where(inside, token_map[np.where(inside, ids, 0)], -1)

    def map_distribution(self, topk_ids, topk_logprobs):
        """Move top-k distributions [positions, k] of source ids onto pivot ids.

        Each source id goes through ``token_map``; several source ids landing on one pivot id are combined
        (log-sum-exp of their log-probabilities); source ids without a pivot token (-1 in the map, negative
        padding ids, ids outside the vocabulary) are dropped. Each row is then renormalised so its
        probabilities sum to one (the top-k mass that was dropped is spread proportionally). Returns
        ``(pivot_ids, logprobs)`` of the same shape, each row sorted by pivot id: the merged entry sits at the
        first of its duplicates, and merged or dropped entries become padding (-1, -inf), dropped ones last; a
        row with nothing mapped is all padding. Numpy arrays or torch tensors (returned as the same type, on
        the same device).
        """
        ids, logprobs, restore = _as_numpy(topk_ids), _as_numpy(topk_logprobs), _restorer(topk_logprobs)
        if ids.shape != logprobs.shape or ids.ndim != 2:
            raise MergeplugError(f"map_distribution: topk_ids {ids.shape} and topk_logprobs {logprobs.shape} must "
                                 f"both be [positions, k]")
        out_ids, out_lp = _combine(self.map_ids(ids), logprobs)
        return restore(out_ids, ids_like=topk_ids), restore(out_lp)

    def align_distributions(self, alignment: SequenceAlignment, topk_ids, topk_logprobs, anchor: str = "end"):
        """The source's top-k distributions placed at the pivot positions they belong to, on pivot ids.

        ``topk_ids``/``topk_logprobs``: [source positions, k]. Returns [pivot positions, k] arrays; pivot
        positions without a paired source position (:meth:`SequenceAlignment.pivot_to_source`) are padding
        (-1, -inf): a fusion loss skips them (FuseLLM falls back to the gold token there).
        """
        ids, logprobs, restore = _as_numpy(topk_ids), _as_numpy(topk_logprobs), _restorer(topk_logprobs)
        if ids.shape[0] != alignment.source_group.shape[0]:
            raise MergeplugError(f"align_distributions: {ids.shape[0]} source distributions for "
                                 f"{alignment.source_group.shape[0]} source positions")
        at = alignment.pivot_to_source(anchor)
        rows = np.flatnonzero(at >= 0)
        out_ids = np.full((at.size, ids.shape[1]), -1, np.int64)
        out_lp = np.full((at.size, ids.shape[1]), -np.inf, logprobs.dtype if logprobs.dtype.kind == "f" else np.float64)
        out_ids[rows], out_lp[rows] = _combine(self.map_ids(ids[at[rows]]), logprobs[at[rows]])
        return restore(out_ids, ids_like=topk_ids), restore(out_lp)


def _combine(mapped: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: entries sorted by pivot id, duplicates merged by log-sum-exp, unmapped dropped, renormalised."""
    rows, k = mapped.shape
    dtype = logprobs.dtype if logprobs.dtype.kind == "f" else np.float64
    if not rows or not k:
        return mapped.astype(np.int64), logprobs.astype(dtype)
    sentinel = np.int64(1) << 40  # above any vocabulary: unmapped entries sort last
    col = np.arange(k, dtype=np.int64)
    key = np.sort(np.where(mapped >= 0, mapped, sentinel) * k + col, axis=1)
    ids = key // k
    valid = ids != sentinel
    lp = np.where(valid, np.take_along_axis(logprobs.astype(dtype, copy=False), key % k, axis=1), -np.inf)
    peak = lp.max(axis=1, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    prob = np.exp(lp - peak)
    with np.errstate(divide="ignore", invalid="ignore"):  # a row with nothing mapped: all padding below
        log_total = np.log(prob.sum(axis=1, keepdims=True)) + peak
        out_lp = np.where(valid, lp - log_total, -np.inf)  # log domain: small probabilities keep their precision
    out_ids = np.where(valid, ids, -1)
    repeat = (ids[:, 1:] == ids[:, :-1]) & valid[:, 1:]  # entry j repeats entry j-1's pivot id
    if repeat.any():  # two source tokens of one row on the same pivot token: fold each run into its first entry
        mass = prob.astype(np.float64)
        for j in range(k - 1, 0, -1):  # right to left, so a run of several folds all the way down
            mass[:, j - 1] += np.where(repeat[:, j - 1], mass[:, j], 0.0)
        head = np.zeros_like(repeat[:, :1])
        dropped = np.concatenate([head, repeat], axis=1)  # entry j repeats entry j-1
        merged_head = np.concatenate([repeat, head], axis=1) & ~dropped  # entry j starts a run of repeats
        with np.errstate(divide="ignore", invalid="ignore"):
            out_lp = np.where(merged_head, np.log(mass) + peak - log_total, out_lp)
        out_ids[dropped] = -1
        out_lp[dropped] = -np.inf
    return out_ids, out_lp.astype(dtype, copy=False)


def _as_numpy(x) -> np.ndarray:
    if type(x).__module__.startswith("torch"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _restorer(like) -> Callable:
    if not type(like).__module__.startswith("torch"):
        return lambda array, ids_like=None: array

    def restore(array, ids_like=None):
        import torch

        tensor = torch.from_numpy(np.ascontiguousarray(array))
        return tensor.to(device=like.device, dtype=torch.int64 if ids_like is not None else like.dtype)

    return restore


def special_token_map(source: Vocabulary, pivot: Vocabulary) -> np.ndarray:
    """A token map (-1 everywhere) with each source special token set to the pivot's of the same role.

    Roles bos/eos/unk/pad/cls/sep/mask match by role; other special tokens match a pivot special token with the
    identical string; specials without a counterpart stay -1 (never mined).
    """
    token_map = np.full(source.size, -1, np.int64)
    for i in np.flatnonzero(source.roles).tolist():
        token_map[i] = pivot.role_ids.get(int(source.roles[i]), -1)
    return token_map


# --- corpus helpers and cache --------------------------------------------------------------------------------
def corpus_alignments(source_tokenizer, pivot_tokenizer, corpus_pairs: Iterable,
                      batch: int = 256) -> Iterable[tuple[Tokenization, Tokenization, SequenceAlignment]]:
    """(source, pivot, alignment) for each corpus item: a text, or a (source, pivot) Tokenization pair."""
    pending: list = []

    def flush():
        texts = [x for x in pending if isinstance(x, str)]
        src = iter(tokenize_many(source_tokenizer, texts)) if texts else iter(())
        piv = iter(tokenize_many(pivot_tokenizer, texts)) if texts else iter(())
        pairs = [(next(src), next(piv)) if isinstance(x, str) else _as_pair(x) for x in pending]
        alignments = align_many([p for _, p in pairs], [s for s, _ in pairs])
        pending.clear()
        return [(s, p, a) for (s, p), a in zip(pairs, alignments)]

    for item in corpus_pairs:
        pending.append(item)
        if len(pending) >= batch:
            yield from flush()
    if pending:
        yield from flush()


def _as_pair(item) -> tuple[Tokenization, Tokenization]:
    if isinstance(item, tuple) and len(item) == 2 and all(isinstance(t, Tokenization) for t in item):
        return item
    raise MergeplugError(f"corpus item of type {type(item).__name__}: give texts or (source, pivot) Tokenization pairs")


def aligner_cache_dir() -> Path:
    """Where fitted token maps are cached: ``$MERGEPLUG_CACHE/aligners``, else ``~/.cache/mergeplug/aligners``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "aligners"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mergeplug" / "aligners"


def cached_arrays(name: str, key: Any, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``build()``'s arrays, cached in :func:`aligner_cache_dir` under a hash of ``name`` and ``key``.

    A cache file that cannot be read is rebuilt; writes go through a temporary file and an atomic rename.
    """
    digest = hashlib.sha256(json.dumps([_CACHE_FORMAT, name, key], sort_keys=True, default=str)
                            .encode("utf-8")).hexdigest()[:32]
    path = aligner_cache_dir() / f"{name}-{digest}.npz"
    if path.is_file():
        try:
            with np.load(path) as stored:
                return {k: stored[k] for k in stored.files}
        except (OSError, ValueError, EOFError):
            pass  # corrupt or partial: rebuild below
    arrays = build()
    try:
        with replacing(path, "wb") as handle:
            np.savez(handle, **arrays)
    except OSError:
        pass  # a read-only cache only costs the next run the fit time
    return arrays
