"""The model runner: batched generation and log-likelihood scoring, with backends as plugins.

A backend plugin registers a subclass of :class:`Backend` (kind ``backend``): ``transformers`` is built in,
``vllm`` is used when vllm is installed and asked for. Evaluators never see a backend; the evaluate command
collects the requests of a round of samples (64 by default, so an interruption loses little), hands them to
:meth:`Backend.run` in one go (so the backend can sort them by length and batch them), and gives the answers
back to the evaluator.

Prompt rendering: MergeBench runs its benchmarks without a chat template (arXiv:2505.10833; a template makes
its specialists collapse), so ``chat_template=False`` is the default. ``True`` applies the tokenizer's own
template, falling back to the model family's (:attr:`mergeplug.families.ModelFamily.chat_template`); a string
is a Jinja template used as it is.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

from .errors import MergeplugError
from .evaluation import Answer, Generate, Loglikelihood, LoglikelihoodResult, Request


class Backend:
    """Base class of runner backends.

    Constructed once per model with the options below; ``generate`` and ``loglikelihood`` take every request
    of a benchmark at once and return answers in the requests' order.

    model              a local Hugging Face folder or a hub id
    device             ``auto`` (cuda when present, else cpu), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``
    dtype              ``auto`` (bf16 on a GPU that supports it, else float32) or a torch dtype name
    batch_size         the most sequences in one forward pass
    chat_template      False (raw prompts), True (tokenizer's or family's template), or a Jinja string
    max_length         the longest prompt + continuation in tokens (default: the model's context length);
                       longer prompts are cut from the left, keeping their end
    trust_remote_code  never on unless asked
    progress           show a progress bar over requests
    """

    name = "base"

    def __init__(self, model: str, *, device: str = "auto", dtype: str = "auto", batch_size: int = 16,
                 chat_template: bool | str = False, max_length: int | None = None,
                 trust_remote_code: bool = False, progress: bool = True, **options: Any):
        self.model = model
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self.chat_template = chat_template
        self.max_length = max_length
        self.trust_remote_code = trust_remote_code
        self.progress = progress
        self.options = options

    def generate(self, requests: Sequence[Generate]) -> list[list[str]]:
        """For each request, its ``samples`` generated texts, each cut before the first stop sequence."""
        raise NotImplementedError

    def loglikelihood(self, requests: Sequence[Loglikelihood]) -> list[LoglikelihoodResult]:
        raise NotImplementedError

    def run(self, requests: Sequence[Request]) -> list[Answer]:
        """Answer a mixed list of requests in order (generation and scoring are batched separately)."""
        answers: list[Answer | None] = [None] * len(requests)
        for kind, method in ((Generate, self.generate), (Loglikelihood, self.loglikelihood)):
            index = [i for i, r in enumerate(requests) if isinstance(r, kind)]
            if index:
                for i, answer in zip(index, method([requests[i] for i in index])):
                    answers[i] = answer
        unknown = [type(r).__name__ for r in requests if not isinstance(r, (Generate, Loglikelihood))]
        if unknown:
            raise MergeplugError(f"backend {self.name}: cannot answer requests of type {unknown[0]}")
        return answers  # type: ignore[return-value]

    def close(self) -> None:
        """Free the model (GPU memory); the backend cannot be used afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_backend(name: str, model: str, **options: Any) -> Backend:
    """The backend plugin ``name`` (``mergeplug list --kind backend``) opened on ``model``."""
    from .plugins import get_registry

    from .schema import problems

    component = get_registry().get("backend", name)
    if component.parameters_source is not None:  # a backend without a schema takes the base options only
        checked = {k: v for k, v in options.items() if k != "progress" and v is not None}
        lines = problems(checked, component.parameters, source=f"backend {name!r}", prefix=["options"])
        if lines:
            raise MergeplugError(*lines)
    return component.load()(model, **options)


# --- helpers for backend authors --------------------------------------------------------------------------
def truncate_at_stop(text: str, stop: Iterable[str]) -> str:
    """``text`` cut before the earliest occurrence of any stop sequence."""
    cut = len(text)
    for s in stop:
        if s:
            at = text.find(s)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of at most ``batch_size``, longest first, so that padding is small and the
    first batch shows at once whether the longest inputs fit in memory."""
    if batch_size < 1:
        raise MergeplugError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def resolve_device(device: str) -> str:
    """``auto`` to ``cuda`` when a GPU is present (else ``mps``, else ``cpu``); an unavailable device is an error."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MergeplugError(f"device {device!r} asked for, but torch sees no CUDA GPU; use --device cpu or auto")
    return device


class PromptRenderer:
    """How a backend turns a prompt into token ids: raw, or as the user turn of a chat template.

    ``chat_template`` False renders nothing; a string is that Jinja template; True takes the tokenizer's own
    template, else the model family's (:attr:`mergeplug.families.ModelFamily.chat_template`, found from
    ``config``), else it is an error. Shared by the built-in backends so that both render prompts identically.
    """

    def __init__(self, model: str, tokenizer: Any, chat_template: bool | str, config: dict):
        self.model = model
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.template = self._resolve(config)

    def _resolve(self, config: dict) -> str | None:
        """The Jinja template to render with (None: the tokenizer's own, or no template at all)."""
        if self.chat_template is False:
            return None
        if isinstance(self.chat_template, str):
            return self.chat_template
        if getattr(self.tokenizer, "chat_template", None):
            return None
        from .families import family_for

        family = family_for(config, source=f"model {self.model}")
        template = getattr(family, "chat_template", None)
        if not template:
            raise MergeplugError(
                f"model {self.model}: chat_template is true, but its tokenizer has no chat template and the "
                f"{family.name} model family gives none; pass a Jinja template string as chat_template, or run "
                "without a chat template (chat_template: false)"
            )
        return template

    def render(self, prompt: str) -> str:
        """``prompt`` as the model sees it: raw, or as the user turn of a chat, ready for the assistant's answer."""
        if self.chat_template is False:
            return prompt
        try:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                      chat_template=self.template, add_generation_prompt=True,
                                                      tokenize=False)
        except Exception as exc:  # noqa: BLE001 - Jinja errors come in many types
            raise MergeplugError(f"model {self.model}: the chat template fails to render a prompt "
                                 f"({type(exc).__name__}: {exc}); fix the template or set chat_template: false") from exc

    def encode(self, text: str) -> list[int]:
        """Token ids of rendered text; a rendered chat template already writes the BOS token as text, so no
        second one is added."""
        bos = self.tokenizer.bos_token
        special = not (self.chat_template is not False and bos and text.startswith(bos))
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def start_id(self) -> int:
        """The token an empty context starts from: BOS, else EOS."""
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        if bos is None and eos is None:
            raise MergeplugError(f"model {self.model}: its tokenizer has neither a BOS nor an EOS token to start an "
                                 "empty prompt from")
        return bos if bos is not None else eos
