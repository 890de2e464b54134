"""Answer extraction and answer equivalence for exact-match scoring: pure functions shared by the evaluator and
by the ``evaluate`` metric module ``exact_match_metric.py``.

Extractors (each returns the answer string, or None when the output holds none):

- ``gsm8k``: strict. The first "The answer is N" (the chain-of-thought format of GSM8K's 8-shot prompt, as
  lm-evaluation-harness's ``gsm8k_cot`` strict-match filter reads it) or "#### N" (GSM8K's own answer format,
  arXiv:2110.14168). Case-sensitive and without a currency sign, like lm-eval's regex; unlike it, the number may
  end the output (lm-eval's pattern wants one more character after it).
- ``last_number``: flexible. The last number in the output (lm-eval's ``flexible-extract``: the last match,
  ``group_select: -1``), with a pattern tightened so that a lone ``..`` or ``,,`` is not taken for a number.
- ``boxed``: the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed N``), braces balanced,
  as MATH's ``last_boxed_only_string`` reads it (arXiv:2103.03874).
- ``none``: the whole output, stripped.

Equivalence (:func:`answers_match`), after stripping, dropping ``$`` / ``\\$``, thousands separators and one
trailing ``.``:

1. two numbers compare as numbers, exactly (``1.0 == 1``, ``0.5 == 1/2``);
2. an answer with mathematical notation (a backslash, braces, ``^ _ = + * / < >``, a minus before a digit),
   or a gold answer without letters (a tuple "(1,2)", an interval), compares after a simple LaTeX
   normalisation modelled on MATH's ``strip_string`` (``\\dfrac`` and ``\\tfrac`` to ``\\frac``,
   ``\\frac12`` to ``\\frac{1}{2}``, no ``\\left``/``\\right``, no degree signs, no trailing
   ``\\text{units}``, no spaces, ``x^{2}`` to ``x^2``, ``a/b`` to ``\\frac{a}{b}``), then numerically when
   both sides are numbers (``\\frac{1}{2} == 0.5``);
3. other text (the gold has a letter) compares SQuAD-style (arXiv:1606.05250): lower-cased, punctuation and
   the articles a/an/the removed, whitespace collapsed.

Gold answers: a string, a number, or a list of acceptable strings. A GSM8K worked solution ("... #### 18")
is reduced to the part after its last ``####`` (what lm-eval's ``regexes_to_ignore: "(?s).*#### "`` does);
a MATH solution holding a ``\\boxed{}`` is reduced to the last boxed content.
"""
from __future__ import annotations

import re
import string
from fractions import Fraction
from typing import Any, Callable, Optional

from mergeplug.errors import MergeplugError

# --- extractors ------------------------------------------------------------------------------------------
_STRICT = re.compile(r"The answer is (-?[0-9.,]+)|#### (-?[0-9.,]+)")
_NUMBER = re.compile(r"-?\$?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


def extract_gsm8k(output: str) -> Optional[str]:
    """The N of the first "The answer is N" or "#### N" (GSM8K strict; arXiv:2110.14168, lm-eval gsm8k_cot)."""
    match = _STRICT.search(output)
    if match is None:
        return None
    number = (match.group(1) or match.group(2)).rstrip(".,")
    return number if any(ch.isdigit() for ch in number) else None


def extract_last_number(output: str) -> Optional[str]:
    """The last number in the output (GSM8K flexible extraction, lm-eval ``flexible-extract``)."""
    numbers = _NUMBER.findall(output)
    return numbers[-1] if numbers else None


def extract_boxed(output: str) -> Optional[str]:
    """The content of the last ``\\boxed{...}``/``\\fbox{...}`` with balanced braces (MATH, arXiv:2103.03874)."""
    start = max(output.rfind("\\boxed"), output.rfind("\\fbox"))
    if start < 0:
        return None
    rest = output[start + (len("\\boxed") if output.startswith("\\boxed", start) else len("\\fbox")):]
    if rest.startswith(" "):  # "\boxed 5": MATH's solutions use this form for one-token answers
        content = rest[1:].split("$")[0].strip()
        return content or None
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, ch in enumerate(rest):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i].strip()
    return None  # unbalanced: the generation was cut inside the box


def extract_none(output: str) -> Optional[str]:
    """The whole output, stripped."""
    return output.strip()


EXTRACTORS: dict[str, Callable[[str], Optional[str]]] = {
    "gsm8k": extract_gsm8k,
    "last_number": extract_last_number,
    "boxed": extract_boxed,
    "none": extract_none,
}


def extract(output: str, extractor: str) -> Optional[str]:
    """The answer ``extractor`` finds in ``output`` (None when there is none)."""
    try:
        return EXTRACTORS[extractor](output)
    except KeyError:
        raise MergeplugError(
            f"exact_match: unknown extractor {extractor!r} in parameter `extract`; known: {', '.join(EXTRACTORS)}"
        ) from None


# --- normalisation -----------------------------------------------------------------------------------------
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_RATIO = re.compile(r"([-+]?\d+)/(\d+)")
_FRAC = re.compile(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}")
_MATH_MARKERS = re.compile(r"[\\{}^_=+*/<>]|-\s*\d")


def clean(text: str) -> str:
    """Strip, drop ``$`` and ``\\$``, thousands separators and one trailing full stop."""
    text = text.strip().replace("\\$", "").replace("$", "")
    text = _THOUSANDS.sub("", text).strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


def as_number(text: str) -> Optional[Fraction]:
    """The exact value of a plain number, ``a/b`` or ``\\frac{a}{b}`` (None for anything else)."""
    text = text.strip()
    if _PLAIN_NUMBER.fullmatch(text):
        return Fraction(text)
    for pattern, sign_group in ((_RATIO, None), (_FRAC, 1)):
        match = pattern.fullmatch(text)
        if match:
            if sign_group is None:
                numerator, denominator = match.group(1), match.group(2)
                sign = 1
            else:
                numerator, denominator = match.group(2), match.group(3)
                sign = -1 if match.group(1) else 1
            if int(denominator) == 0:
                return None
            return sign * Fraction(int(numerator), int(denominator))
    return None


def _fix_fracs(text: str) -> str:
    # \frac12 -> \frac{1}{2}, \frac1{2} -> \frac{1}{2}, \frac{1}2 -> \frac{1}{2} (MATH's _fix_fracs)
    text = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", text)
    text = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", text)
    return re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", text)


def math_normalise(text: str) -> str:
    """A simple LaTeX normalisation, modelled on MATH's ``strip_string`` (arXiv:2103.03874)."""
    text = text.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    text = text.replace("tfrac", "frac").replace("dfrac", "frac")
    text = text.replace("\\left", "").replace("\\right", "")
    text = text.replace("^{\\circ}", "").replace("^\\circ", "")
    text = text.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    # units: "5 \text{ cm}" -> "5"; a lone \text{...} (e.g. "\text{(A)}") keeps its content
    text = re.sub(r"(?<=\S)\s*\\(?:text|mbox|mathrm)\{\s*[A-Za-z][A-Za-z ]*\}\s*$", "", text)
    text = re.sub(r"\\(?:text|mbox|mathrm)\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"(^|[\s{])\.(\d)", r"\g<1>0.\2", text)  # ".5" -> "0.5"
    if text.count("=") == 1 and len(text.split("=")[0].strip()) <= 2:  # "x = 5" -> "5"
        text = text.split("=")[1]
    text = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", text)
    text = text.replace(" ", "")
    text = re.sub(r"([\^_])\{(\w)\}", r"\1\2", text)  # x^{2} -> x^2
    text = _fix_fracs(text)
    ratio = _RATIO.fullmatch(text)
    if ratio:
        text = f"\\frac{{{ratio.group(1)}}}{{{ratio.group(2)}}}"
    return text


def squad_normalise(text: str) -> str:
    """Lower-case, no punctuation, no articles, single spaces (SQuAD's normalize_answer, arXiv:1606.05250)."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def answers_match(prediction: Optional[str], gold: str) -> bool:
    """Whether an extracted answer equals one gold answer (rules in the module docstring)."""
    if prediction is None:
        return False
    predicted, expected = clean(prediction), clean(gold)
    if not predicted or not expected:
        return False
    predicted_number, expected_number = as_number(predicted), as_number(expected)
    if predicted_number is not None and expected_number is not None:
        return predicted_number == expected_number
    if _MATH_MARKERS.search(predicted) or _MATH_MARKERS.search(expected) or not re.search(r"[^\W\d_]", expected):
        predicted_math, expected_math = math_normalise(predicted), math_normalise(expected)
        if predicted_math == expected_math:
            return True
        predicted_number, expected_number = as_number(predicted_math), as_number(expected_math)
        return predicted_number is not None and predicted_number == expected_number
    predicted_text, expected_text = squad_normalise(predicted), squad_normalise(expected)
    return bool(expected_text) and predicted_text == expected_text


# --- gold answers and one sample's scores ------------------------------------------------------------------
def gold_answers(answer: Any) -> list[str]:
    """The acceptable answers of a sample's ``answer`` field (a string, a number or a list of them)."""
    items = list(answer) if isinstance(answer, (list, tuple)) else [answer]
    golds = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise MergeplugError(
                f"exact_match: gold answer {item!r} is a {type(item).__name__}; the sample's `answer` must be a "
                f"string, a number or a list of acceptable strings (check the domain's `columns`)"
            )
        text = str(item)
        if "####" in text:
            text = text.rsplit("####", 1)[1]
        elif "\\boxed" in text or "\\fbox" in text:
            text = extract_boxed(text) or text
        golds.append(text.strip())
    if not any(golds):
        raise MergeplugError(
            f"exact_match: the sample's `answer` {answer!r} is empty; map the domain's `answer` column to the gold"
        )
    return golds


def score_output(output: str, golds: list[str], extractors: list[str]) -> tuple[dict[str, float], dict[str, Any]]:
    """Per extractor: 1.0 when the extracted answer matches any gold answer, else 0.0; and what was extracted."""
    scores, extracted = {}, {}
    for name in extractors:
        answer = extract(output, name)
        extracted[name] = answer
        scores[f"exact_match_{name}"] = 1.0 if any(answers_match(answer, gold) for gold in golds) else 0.0
    return scores, extracted
