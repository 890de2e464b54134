"""The transformers backend: one model in-process, answering every request of a benchmark in batches.

Generation: requests with the same settings are batched together, longest prompts first
(:func:`mergeplug.runner.length_sorted_batches`), left-padded so that every row's last prompt token sits in
the last column, and decoded with the KV cache. Greedy at temperature 0; otherwise nucleus sampling
(Holtzman et al., arXiv:1904.09751) seeded per batch from the requests' seed, so a rerun with the same
requests, batch size and device gives the same texts. A stop sequence ends its row as soon as the row's new
text contains it, and the batch ends once every row has ended.

Scoring: log p(continuation | context) is the sum of the continuation tokens' log-softmax values from one
forward pass over ``context + continuation`` (right padding), as lm-evaluation-harness computes it
(Gao et al., "A framework for few-shot language model evaluation", 2021; used by MergeBench, arXiv:2505.10833).
"""
from __future__ import annotations

import gc
import inspect
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from mergeplug import MergeplugError
from mergeplug.evaluation import Generate, Loglikelihood, LoglikelihoodResult
from mergeplug.runner import Backend, PromptRenderer, length_sorted_batches, resolve_device, truncate_at_stop

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
#: Options beyond :class:`mergeplug.runner.Backend`'s own (parameters.json lists them all).
EXTRA_OPTIONS = ("ignore_eos",)
#: Context length when neither config.json nor the tokenizer gives one (our choice: Llama 2's context).
FALLBACK_CONTEXT = 4096
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class TransformersBackend(Backend):
    """A causal LM loaded with ``AutoModelForCausalLM`` (options: see :class:`mergeplug.runner.Backend`).

    ``ignore_eos`` (default false) keeps every row generating until ``max_new_tokens``: for throughput
    measurements where every row must yield the same number of tokens.
    """

    name = "transformers"

    def __init__(self, model: str, **options: Any):
        super().__init__(model, **options)
        unknown = sorted(set(self.options) - set(EXTRA_OPTIONS))
        if unknown:
            known = ", ".join(["device", "dtype", "batch_size", "chat_template", "max_length", "trust_remote_code",
                               "progress", *EXTRA_OPTIONS])
            raise MergeplugError(f"backend transformers: unknown option {unknown[0]!r}; known: {known}")
        self.ignore_eos = bool(self.options.get("ignore_eos", False))
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise MergeplugError(f"backend transformers: batch_size must be a positive integer, got {self.batch_size!r}")
        if not (isinstance(self.chat_template, bool) or (isinstance(self.chat_template, str) and self.chat_template)):
            raise MergeplugError(f"backend transformers: chat_template must be true, false or a Jinja template string, "
                                 f"got {self.chat_template!r}")
        if self.max_length is not None and (isinstance(self.max_length, bool) or not isinstance(self.max_length, int)
                                            or self.max_length < 2):
            raise MergeplugError(f"backend transformers: max_length must be an integer of at least 2, got "
                                 f"{self.max_length!r}")
        self.device_name = resolve_device(self.device)
        self.torch_dtype = self._resolve_dtype()
        self._tokenizer, self._model = self._load()
        self._eos_ids = self._end_ids()
        self._pad_id = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else self._eos_ids[0]
        bos = self._tokenizer.bos_token_id
        self._start_id = bos if bos is not None else self._eos_ids[0]  # what an empty context or prompt starts from
        self.context_length = self._context_length()
        self._prompts = PromptRenderer(model, self._tokenizer, self.chat_template, self._model.config.to_dict())
        self._keeps_logits = "logits_to_keep" in inspect.signature(self._model.forward).parameters
        self._warned_cut = False

    # --- loading -------------------------------------------------------------------------------------------
    def _resolve_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            if self.device_name.startswith("cuda") and torch.cuda.is_bf16_supported():
                return torch.bfloat16
            return torch.float32
        if self.dtype not in DTYPES:
            raise MergeplugError(f"backend transformers: dtype {self.dtype!r} is not known; use auto or one of "
                                 f"{', '.join(DTYPES)}")
        return DTYPES[self.dtype]

    def _source(self) -> str:
        path = Path(self.model).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise MergeplugError(f"model {self.model}: the folder has no config.json; give a Hugging Face model "
                                     "folder (config.json, weights, tokenizer files)")
            return str(path)
        if path.exists():
            raise MergeplugError(f"model {self.model}: is a file, not a model folder; give the folder holding config.json")
        if not _HUB_ID.match(self.model):
            raise MergeplugError(f"model {self.model}: no such folder; give a local Hugging Face model folder or a "
                                 "hub id (owner/name)")
        return self.model

    def _load(self):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = self._source()
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=self.trust_remote_code)
        except Exception as exc:  # noqa: BLE001 - transformers raises OSError, ValueError, hub errors...
            raise MergeplugError(
                f"model {self.model}: cannot load its tokenizer ({type(exc).__name__}: {exc}); the model needs "
                "tokenizer files (tokenizer.json or tokenizer.model with tokenizer_config.json), or check the hub id "
                "and your network"
            ) from exc
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=self.torch_dtype, device_map=self.device_name,
                                                         trust_remote_code=self.trust_remote_code)
        except Exception as exc:  # noqa: BLE001
            raise MergeplugError(
                f"model {self.model}: cannot load it as a causal language model ({type(exc).__name__}: {exc}); "
                "check config.json and the weight files, or set trust_remote_code for a model with its own code"
            ) from exc
        model.eval()
        return tokenizer, model

    def _end_ids(self) -> list[int]:
        """Every token that ends a generation: the generation config's eos ids (Llama 3 instruct has several)
        and the tokenizer's."""
        ids: list[int] = []
        configured = getattr(self._model.generation_config, "eos_token_id", None)
        for value in (configured if isinstance(configured, (list, tuple)) else [configured]):
            if value is not None and value not in ids:
                ids.append(int(value))
        if self._tokenizer.eos_token_id is not None and self._tokenizer.eos_token_id not in ids:
            ids.append(int(self._tokenizer.eos_token_id))
        if not ids:
            raise MergeplugError(f"model {self.model}: neither its tokenizer nor its generation_config.json names an "
                                 "end-of-sequence token; set eos_token in tokenizer_config.json")
        return ids

    def _context_length(self) -> int:
        if self.max_length is not None:
            return self.max_length
        config = self._model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        positions = getattr(text_config, "max_position_embeddings", None)
        if isinstance(positions, int) and positions > 0:
            return positions
        tokenizer_max = getattr(self._tokenizer, "model_max_length", None)
        if isinstance(tokenizer_max, int) and 0 < tokenizer_max < 10_000_000:  # tokenizers without one say 1e30
            return tokenizer_max
        return FALLBACK_CONTEXT

    # --- prompts -------------------------------------------------------------------------------------------
    def render(self, prompt: str) -> str:
        """``prompt`` as the model sees it: raw, or as the user turn of a chat, ready for the assistant's answer."""
        return self._prompts.render(prompt)

    def _encode(self, text: str) -> list[int]:
        return self._prompts.encode(text)

    def _warn_cut(self, what: str) -> None:
        if not self._warned_cut:
            self._warned_cut = True
            warnings.warn(f"model {self.model}: {what} longer than max_length {self.context_length} tokens; cut from "
                          "the left, keeping the end (warned once)", stacklevel=3)

    def _prompt_ids(self, prompt: str, max_new_tokens: int) -> list[int]:
        room = self.context_length - max_new_tokens
        if room < 1:
            raise MergeplugError(f"backend transformers: max_new_tokens {max_new_tokens} leaves no room for a prompt "
                                 f"within max_length {self.context_length}; lower max_new_tokens or raise max_length")
        ids = self._encode(self.render(prompt)) or [self._start_id]
        if len(ids) > room:
            self._warn_cut("a prompt plus max_new_tokens is")
            ids = ids[-room:]
        return ids

    # --- generation ----------------------------------------------------------------------------------------
    def generate(self, requests: Sequence[Generate]) -> list[list[str]]:
        self._check_open()
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            _check_generate(request, i)
            key = (request.max_new_tokens, float(request.temperature), float(request.top_p), tuple(request.stop),
                   request.samples, request.seed)
            groups.setdefault(key, []).append(i)
        answers: list[list[str]] = [[] for _ in requests]
        with tqdm(total=len(requests), desc=f"{self.model}: generate", disable=not self.progress) as bar, \
                torch.inference_mode():
            for (max_new_tokens, temperature, top_p, stop, samples, seed), index in groups.items():
                prompts = [self._prompt_ids(requests[i].prompt, max_new_tokens) for i in index]
                # Greedy samples are all the same text: decode once, copy.
                prompts_per_batch = max(1, self.batch_size // (samples if temperature > 0 else 1))
                batches = length_sorted_batches([len(p) for p in prompts], prompts_per_batch)
                for number, batch in enumerate(batches):
                    texts = self._generate_batch([prompts[j] for j in batch], max_new_tokens, temperature, top_p,
                                                 stop, samples, _batch_seed(seed, number))
                    for j, row in zip(batch, texts):
                        answers[index[j]] = row
                    bar.update(len(batch))
        return answers

    def _generate_batch(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                        stop: tuple[str, ...], samples: int, seed: int) -> list[list[str]]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):  # left padding: every row's next token is predicted in the last column
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids):] = 1
        sampling = temperature > 0
        # Every knob set explicitly: transformers fills unset ones from the checkpoint's generation_config.json
        # (an instruct model's temperature, top_k, repetition_penalty), which would change what a request asks for.
        # top_k 0 turns off transformers' default top-k 50, so sampling is pure nucleus sampling as in vLLM.
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens if self.ignore_eos else 0,
            do_sample=sampling, temperature=temperature if sampling else 1.0, top_p=top_p if sampling else 1.0,
            top_k=0 if sampling else None, typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0, num_beams=1,
            num_return_sequences=samples if sampling else 1, use_cache=True, pad_token_id=self._pad_id,
            eos_token_id=self._eos_ids,
        )
        criteria = StoppingCriteriaList([StopOnText(self._tokenizer, stop, width)]) if stop else None
        inputs = dict(input_ids=input_ids.to(self._model.device), attention_mask=attention_mask.to(self._model.device))
        if sampling:
            with self._seeded(seed):
                output = self._model.generate(**inputs, generation_config=config, stopping_criteria=criteria)
        else:
            output = self._model.generate(**inputs, generation_config=config, stopping_criteria=criteria)
        new_tokens = output[:, width:].tolist()
        texts = [truncate_at_stop(self._tokenizer.decode(tokens, skip_special_tokens=True), stop)
                 for tokens in new_tokens]
        if not sampling:
            return [[text] * samples for text in texts]
        # num_return_sequences puts a prompt's samples on consecutive rows.
        return [texts[row * samples:(row + 1) * samples] for row in range(len(prompts))]

    def _seeded(self, seed: int):
        """A scope with torch's RNG seeded to ``seed`` on the model's device, restored afterwards."""
        device = torch.device(self.device_name)
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            scope = torch.random.fork_rng(devices=[index], device_type="cuda")
        elif device.type == "cpu":
            scope = torch.random.fork_rng(devices=[])
        else:
            scope = torch.random.fork_rng(device_type=device.type)
        return _SeededScope(scope, seed)

    # --- scoring -------------------------------------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[Loglikelihood]) -> list[LoglikelihoodResult]:
        self._check_open()
        sequences: list[list[int]] = []  # context + continuation tokens, cut from the left
        scored: list[int] = []  # how many of the last tokens of each sequence are continuation tokens
        for i, request in enumerate(requests):
            if not isinstance(request, Loglikelihood):
                raise MergeplugError(f"backend transformers: request {i} is a {type(request).__name__}, "
                                     "not a Loglikelihood")
            rendered = self.render(request.context)
            context = (self._encode(rendered) if rendered else []) or [self._start_id]
            continuation = list(self._tokenizer(request.continuation, add_special_tokens=False)["input_ids"])
            tokens = context + continuation
            if len(tokens) > self.context_length + 1:  # the last token is only a target, never an input
                self._warn_cut("a context plus continuation is")
                tokens = tokens[-(self.context_length + 1):]
            sequences.append(tokens)
            scored.append(min(len(continuation), len(tokens) - 1))
        # An empty continuation has log p = log 1 = 0 and needs no forward pass.
        results: list[LoglikelihoodResult | None] = [LoglikelihoodResult(0.0, 0, True) if n == 0 else None
                                                     for n in scored]
        index = [i for i, n in enumerate(scored) if n > 0]
        with tqdm(total=len(requests), desc=f"{self.model}: loglikelihood", disable=not self.progress) as bar, \
                torch.inference_mode():
            bar.update(len(requests) - len(index))
            for batch in length_sorted_batches([len(sequences[i]) - 1 for i in index], self.batch_size):
                rows = [index[j] for j in batch]
                for i, result in zip(rows, self._score_batch([sequences[i] for i in rows], [scored[i] for i in rows])):
                    results[i] = result
                bar.update(len(rows))
        return results  # type: ignore[return-value]

    def _score_batch(self, sequences: list[list[int]], scored: list[int]) -> list[LoglikelihoodResult]:
        lengths = [len(s) - 1 for s in sequences]
        width = max(lengths)
        input_ids = torch.full((len(sequences), width), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, tokens in enumerate(sequences):  # right padding: positions need no shifting
            input_ids[row, :lengths[row]] = torch.tensor(tokens[:-1], dtype=torch.long)
            attention_mask[row, :lengths[row]] = 1
        # Logits only from the first scored position on (the vocabulary axis makes full logits the largest tensor).
        first = min(length - n for length, n in zip(lengths, scored))
        kwargs = {"logits_to_keep": width - first} if self._keeps_logits and width - first > 0 else {}
        logits = self._model(input_ids=input_ids.to(self._model.device),
                             attention_mask=attention_mask.to(self._model.device), use_cache=False, **kwargs).logits
        offset = width - logits.shape[1]  # the column of logits[:, 0]
        results = []
        for row, (tokens, length, n) in enumerate(zip(sequences, lengths, scored)):
            start = length - n - offset
            logprobs = torch.log_softmax(logits[row, start:start + n].float(), dim=-1)
            targets = torch.tensor(tokens[-n:], dtype=torch.long, device=logprobs.device)
            total = logprobs.gather(-1, targets[:, None]).sum().item()
            greedy = bool((logprobs.argmax(dim=-1) == targets).all().item())
            results.append(LoglikelihoodResult(float(total), n, greedy))
        return results

    # --- lifetime ------------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._model is None:
            raise MergeplugError(f"backend transformers: model {self.model} was closed; open a new backend")

    def close(self) -> None:
        if self._model is None:
            return
        self._model = None
        gc.collect()
        if self.device_name.startswith("cuda"):
            torch.cuda.empty_cache()


class _SeededScope:
    def __init__(self, scope, seed: int):
        self.scope, self.seed = scope, seed

    def __enter__(self):
        self.scope.__enter__()
        torch.manual_seed(self.seed)  # seeds the CPU and every CUDA device

    def __exit__(self, *exc):
        return self.scope.__exit__(*exc)


def _batch_seed(seed: int, number: int) -> int:
    """A distinct seed per batch of a group, so batches do not repeat each other's random draws."""
    return (seed * 1_000_003 + number) % (2**63)


def _check_generate(request: Any, i: int) -> None:
    if not isinstance(request, Generate):
        raise MergeplugError(f"backend transformers: request {i} is a {type(request).__name__}, not a Generate")
    if not isinstance(request.max_new_tokens, int) or request.max_new_tokens < 1:
        raise MergeplugError(f"request {i}: max_new_tokens must be a positive integer, got {request.max_new_tokens!r}")
    if not isinstance(request.samples, int) or request.samples < 1:
        raise MergeplugError(f"request {i}: samples must be a positive integer, got {request.samples!r}")
    if request.temperature < 0:
        raise MergeplugError(f"request {i}: temperature must be 0 (greedy) or positive, got {request.temperature!r}")
    if not 0 < request.top_p <= 1:
        raise MergeplugError(f"request {i}: top_p must be in (0, 1], got {request.top_p!r}")


class StopOnText(StoppingCriteria):
    """Marks a row done once its new text contains a stop sequence, so that a batch ends when all rows are done.

    Only the last few tokens of each row are decoded at each step: a stop sequence that has just appeared lies
    within them (4 tokens per character covers byte-level pieces of one UTF-8 character).
    """

    def __init__(self, tokenizer, stop: Sequence[str], prompt_width: int):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.prompt_width = prompt_width
        self.window = 4 * max((len(s) for s in self.stop), default=1) + 4
        self.done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if self.done is None or self.done.shape[0] != input_ids.shape[0]:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        rows = (~self.done).nonzero().flatten().tolist()
        tails = input_ids[rows, self.prompt_width:][:, -self.window:].tolist() if rows else []
        for row, tail in zip(rows, tails):
            text = self.tokenizer.decode(tail, skip_special_tokens=True)
            if any(s in text for s in self.stop):
                self.done[row] = True
        return self.done.clone()
