"""The vLLM backend (Kwon et al., arXiv:2309.06180): generation and scoring with PagedAttention and
continuous batching, on a CUDA GPU.

vLLM schedules every request of a benchmark itself, so this backend hands them over at once: prompts as token
ids (cut from the left here, as the transformers backend does, so both see the same tokens), one
``SamplingParams`` per request (greedy at temperature 0, nucleus sampling otherwise, seeded per request).
Log-likelihood: ``prompt_logprobs`` over ``context + continuation`` with one generated token, summing the
continuation positions' log-probabilities (lm-evaluation-harness's vLLM model does the same); a continuation
is greedy when each of its tokens has rank 1.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

from mergeplug import MergeplugError
from mergeplug.evaluation import Generate, Loglikelihood, LoglikelihoodResult
from mergeplug.runner import Backend, PromptRenderer, truncate_at_stop

MISSING = "backend vllm: vllm is not installed: pip install vllm (Linux, CUDA GPU), or use --backend transformers"
DTYPES = {"auto": "auto", "float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}
EXTRA_OPTIONS = ("ignore_eos",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class VllmBackend(Backend):
    """A model served in-process by ``vllm.LLM`` (options: see :class:`mergeplug.runner.Backend`).

    ``batch_size`` is accepted and not used (vLLM batches continuously); ``device`` must be auto or cuda
    (vLLM picks its GPUs: choose them with CUDA_VISIBLE_DEVICES); ``ignore_eos`` maps to vLLM's own flag.
    """

    name = "vllm"

    def __init__(self, model: str, **options: Any):
        super().__init__(model, **options)
        try:
            import vllm
        except ImportError as exc:
            raise MergeplugError(MISSING) from exc
        self._vllm = vllm
        unknown = sorted(set(self.options) - set(EXTRA_OPTIONS))
        if unknown:
            known = ", ".join(["device", "dtype", "batch_size", "chat_template", "max_length", "trust_remote_code",
                               "progress", *EXTRA_OPTIONS])
            raise MergeplugError(f"backend vllm: unknown option {unknown[0]!r}; known: {known}")
        self.ignore_eos = bool(self.options.get("ignore_eos", False))
        if self.device not in ("auto", "cuda"):
            raise MergeplugError(f"backend vllm: device {self.device!r}: vLLM runs on CUDA GPUs and picks them itself; "
                                 "use device auto (choose GPUs with CUDA_VISIBLE_DEVICES), or --backend transformers")
        if self.dtype not in DTYPES:
            raise MergeplugError(f"backend vllm: dtype {self.dtype!r} is not known; use one of {', '.join(DTYPES)}")
        if not (isinstance(self.chat_template, bool) or (isinstance(self.chat_template, str) and self.chat_template)):
            raise MergeplugError(f"backend vllm: chat_template must be true, false or a Jinja template string, "
                                 f"got {self.chat_template!r}")
        if self.max_length is not None and (isinstance(self.max_length, bool) or not isinstance(self.max_length, int)
                                            or self.max_length < 2):
            raise MergeplugError(f"backend vllm: max_length must be an integer of at least 2, got {self.max_length!r}")
        _check_source(model)
        arguments: dict[str, Any] = dict(model=model, dtype=DTYPES[self.dtype], trust_remote_code=self.trust_remote_code,
                                         seed=0)
        if self.max_length is not None:
            arguments["max_model_len"] = self.max_length
        try:
            self._llm = vllm.LLM(**arguments)
        except Exception as exc:  # noqa: BLE001 - vLLM raises many kinds (CUDA, config, memory)
            raise MergeplugError(f"model {model}: vLLM cannot load it ({type(exc).__name__}: {exc}); check the model "
                                 "folder and the GPU, or use --backend transformers") from exc
        self._tokenizer = self._llm.get_tokenizer()
        self.context_length = self.max_length or _engine_max_len(self._llm)
        self._prompts = PromptRenderer(model, self._tokenizer, self.chat_template, _model_config(model, self._llm))
        self._warned_cut = False

    # --- prompts (as the transformers backend renders them, so both backends see the same tokens) ----------
    def render(self, prompt: str) -> str:
        return self._prompts.render(prompt)

    def _encode(self, text: str) -> list[int]:
        return self._prompts.encode(text)

    def _start_id(self) -> int:
        return self._prompts.start_id()

    def _cut(self, ids: list[int], room: int, what: str) -> list[int]:
        if len(ids) <= room:
            return ids
        if not self._warned_cut:
            self._warned_cut = True
            warnings.warn(f"model {self.model}: {what} longer than max_length {self.context_length} tokens; cut from "
                          "the left, keeping the end (warned once)", stacklevel=3)
        return ids[-room:]

    # --- requests ------------------------------------------------------------------------------------------
    def generate(self, requests: Sequence[Generate]) -> list[list[str]]:
        prompts, params = [], []
        for i, request in enumerate(requests):
            if not isinstance(request, Generate):
                raise MergeplugError(f"backend vllm: request {i} is a {type(request).__name__}, not a Generate")
            ids = self._encode(self.render(request.prompt)) or [self._start_id()]
            if self.context_length is not None:
                room = self.context_length - request.max_new_tokens
                if room < 1:
                    raise MergeplugError(f"request {i}: max_new_tokens {request.max_new_tokens} leaves no room for a "
                                         f"prompt within max_length {self.context_length}; lower it or raise max_length")
                ids = self._cut(ids, room, "a prompt plus max_new_tokens is")
            prompts.append({"prompt_token_ids": ids})
            params.append(self._vllm.SamplingParams(**sampling_arguments(request, ignore_eos=self.ignore_eos)))
        if not prompts:
            return []
        outputs = self._llm.generate(prompts, sampling_params=params, use_tqdm=self.progress)
        return [parse_generation(output, request) for output, request in zip(outputs, requests)]

    def loglikelihood(self, requests: Sequence[Loglikelihood]) -> list[LoglikelihoodResult]:
        results: list[LoglikelihoodResult | None] = [None] * len(requests)
        prompts, scored, index = [], [], []
        for i, request in enumerate(requests):
            if not isinstance(request, Loglikelihood):
                raise MergeplugError(f"backend vllm: request {i} is a {type(request).__name__}, not a Loglikelihood")
            rendered = self.render(request.context)
            context = (self._encode(rendered) if rendered else []) or [self._start_id()]
            continuation = list(self._tokenizer(request.continuation, add_special_tokens=False)["input_ids"])
            tokens = context + continuation
            if self.context_length is not None:  # one place is left for the token vLLM must generate
                tokens = self._cut(tokens, self.context_length - 1, "a context plus continuation is")
            n = min(len(continuation), len(tokens) - 1)
            if n == 0:
                results[i] = LoglikelihoodResult(0.0, 0, True)  # log p(empty string) = log 1
                continue
            prompts.append({"prompt_token_ids": tokens})
            scored.append(n)
            index.append(i)
        if prompts:
            params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
            outputs = self._llm.generate(prompts, sampling_params=params, use_tqdm=self.progress)
            for i, output, prompt, n in zip(index, outputs, prompts, scored):
                results[i] = parse_prompt_logprobs(output.prompt_logprobs, prompt["prompt_token_ids"], n, self.model)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        if getattr(self, "_llm", None) is None:
            return
        self._llm = None
        import gc

        gc.collect()


# --- request -> vLLM and vLLM -> answer (pure, so tests can check them with a fake vllm module) -------------
def sampling_arguments(request: Generate, *, ignore_eos: bool = False) -> dict:
    """``SamplingParams`` keyword arguments for ``request``: temperature 0 is vLLM's greedy decoding, asked for
    once (some vLLM versions refuse n > 1 when greedy; the samples would be identical anyway)."""
    greedy = request.temperature == 0
    return dict(n=1 if greedy else request.samples, temperature=float(request.temperature),
                top_p=1.0 if greedy else float(request.top_p), max_tokens=request.max_new_tokens,
                stop=list(request.stop) or None, seed=request.seed, ignore_eos=ignore_eos)


def parse_generation(output: Any, request: Generate) -> list[str]:
    """The ``samples`` texts of one ``RequestOutput``, each cut before its first stop sequence (vLLM already
    cuts at the stop it hit; cutting again keeps both backends' answers identical in form)."""
    texts = [truncate_at_stop(completion.text, request.stop) for completion in output.outputs]
    return texts[:1] * request.samples if request.temperature == 0 else texts


def parse_prompt_logprobs(prompt_logprobs: Any, tokens: list[int], n: int, model: str) -> LoglikelihoodResult:
    """Sum of the last ``n`` prompt tokens' log-probabilities; greedy when each has rank 1 (vLLM's ``Logprob.rank``),
    or, where the rank is missing, when it has the highest log-probability among those returned."""
    if prompt_logprobs is None or len(prompt_logprobs) != len(tokens):
        raise MergeplugError(f"model {model}: vLLM returned no prompt log-probabilities for a scoring request "
                             "(prompt_logprobs); upgrade vllm")
    total, greedy = 0.0, True
    for position in range(len(tokens) - n, len(tokens)):
        candidates = prompt_logprobs[position]
        chosen = candidates[tokens[position]]
        total += float(chosen.logprob)
        rank = getattr(chosen, "rank", None)
        if rank is not None:
            greedy = greedy and rank == 1
        else:
            greedy = greedy and all(float(c.logprob) <= float(chosen.logprob) for c in candidates.values())
    return LoglikelihoodResult(total, n, greedy)


# --- small helpers -------------------------------------------------------------------------------------------
def _check_source(model: str) -> None:
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MergeplugError(f"model {model}: the folder has no config.json; give a Hugging Face model folder "
                                 "(config.json, weights, tokenizer files)")
        return
    if path.exists():
        raise MergeplugError(f"model {model}: is a file, not a model folder; give the folder holding config.json")
    if not _HUB_ID.match(model):
        raise MergeplugError(f"model {model}: no such folder; give a local Hugging Face model folder or a hub id "
                             "(owner/name)")


def _engine_max_len(llm: Any) -> int | None:
    """vLLM's context length (its ``max_model_len``), or None when this vLLM version does not expose it."""
    for path in (("llm_engine", "model_config", "max_model_len"), ("model_config", "max_model_len")):
        value: Any = llm
        for attribute in path:
            value = getattr(value, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _model_config(model: str, llm: Any) -> dict:
    """config.json as a dict (for the model family): from the folder, else from vLLM's loaded config."""
    path = Path(model).expanduser() / "config.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    hf_config = getattr(getattr(getattr(llm, "llm_engine", None), "model_config", None), "hf_config", None)
    return hf_config.to_dict() if hf_config is not None else {}
