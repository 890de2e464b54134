"""IFEval's verifiable instructions (Zhou et al., arXiv:2311.07911): one checker per instruction id.

A checker is a pure function ``check(response, *, <kwargs>) -> bool`` registered under its id with the
:func:`instruction` decorator; its keyword-only signature is its parameter list (names as in google/IFEval's
``kwargs``), so a sample's kwargs are checked against it before any response is judged. Add one in-process::

    @instruction("detectable_format:haiku")
    def haiku(response: str, *, lines: int = 3) -> bool: ...

or, without importing this plugin, name a ``"module:function"`` in the evaluator's ``extra_instructions``.

These are our own implementations of the paper's definitions (its appendix table); where the paper leaves a
detail open we follow what the reference evaluation counts, so scores stay comparable, and say so below.
The whole response counts; the loose variants of :func:`loose_variants` are the paper's.
"""
import inspect
import json
import re
from typing import Callable, Mapping

from mergeplug.errors import MergeplugError, unknown_name_message

Checker = Callable[..., bool]

#: Instruction id -> checker. Ids use IFEval's "group:name" spelling.
INSTRUCTIONS: dict[str, Checker] = {}


def instruction(instruction_id: str) -> Callable[[Checker], Checker]:
    """Register ``check(response, *, kwargs...) -> bool`` as the checker of ``instruction_id``."""

    def add(check: Checker) -> Checker:
        if INSTRUCTIONS.get(instruction_id, check) is not check:
            raise MergeplugError(f"IFEval instruction {instruction_id!r} already has a checker; pick another id")
        INSTRUCTIONS[instruction_id] = check
        return check

    return add


# --- kwargs -------------------------------------------------------------------------------------------------
def bind_kwargs(instruction_id: str, kwargs: Mapping | None, checkers: Mapping[str, Checker] = INSTRUCTIONS) -> dict:
    """The checker's keyword arguments from a sample's kwargs dict, checked against its signature.

    None values are dropped (the Hugging Face copy of IFEval gives every instruction every kwarg, mostly None).
    """
    if instruction_id not in checkers:
        raise MergeplugError(unknown_name_message("IFEval instruction id", instruction_id, checkers))
    given = {k: v for k, v in (kwargs or {}).items() if v is not None}
    params = {n: p for n, p in inspect.signature(checkers[instruction_id]).parameters.items()
              if p.kind is inspect.Parameter.KEYWORD_ONLY}
    unexpected = sorted(set(given) - set(params))
    missing = sorted(n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in given)
    if unexpected or missing:
        raise MergeplugError(
            f"IFEval instruction {instruction_id!r}: kwargs {sorted(given)} do not fit; it takes {sorted(params)}"
            + (f", unexpected {unexpected}" if unexpected else "") + (f", missing {missing}" if missing else "")
        )
    return {name: _coerce(instruction_id, name, value, params[name].annotation) for name, value in given.items()}


def _coerce(instruction_id: str, name: str, value, annotation):
    if annotation is int and isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON/Arrow round trips may turn 3 into 3.0
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        str: isinstance(value, str),
        list: isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value),
    }.get(annotation, True)
    if not ok:
        raise MergeplugError(
            f"IFEval instruction {instruction_id!r}: kwarg {name}={value!r} should be "
            f"{'a list of strings' if annotation is list else getattr(annotation, '__name__', annotation)}"
        )
    return list(value) if annotation is list else value


# relation strings as IFEval spells them
RELATIONS: dict[str, Callable[[int, int], bool]] = {
    "less than": lambda count, n: count < n,
    "at least": lambda count, n: count >= n,
}


def _compare(count: int, relation: str, n: int) -> bool:
    if relation not in RELATIONS:
        raise MergeplugError(unknown_name_message("IFEval relation", relation, RELATIONS))
    return RELATIONS[relation](count, n)


# --- judging a response -------------------------------------------------------------------------------------
def loose_variants(response: str) -> list[str]:
    """The paper's loose transformations (arXiv:2311.07911 §2.2): the response without its first line, its last
    line, or both, each with and without markdown ``*``: 8 variants, the response itself first."""
    lines = response.split("\n")
    trimmed = [response, "\n".join(lines[1:]), "\n".join(lines[:-1]), "\n".join(lines[1:-1])]
    return trimmed + [text.replace("*", "") for text in trimmed]


def follows(instruction_id: str, response: str, kwargs: Mapping | None, *, loose: bool = False,
            checkers: Mapping[str, Checker] = INSTRUCTIONS) -> bool:
    """Whether ``response`` follows the instruction: as is (strict) or in any loose variant.

    A blank response (or variant) follows nothing, as in the reference evaluation.
    """
    check, bound = checkers.get(instruction_id), bind_kwargs(instruction_id, kwargs, checkers)
    texts = loose_variants(response) if loose else [response]
    return any(text.strip() and check(text, **bound) for text in texts)


# --- shared text helpers ------------------------------------------------------------------------------------
def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text)  # "don't" is two words, as the reference's \w+ tokenizer counts


_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "inc", "ltd", "co", "e.g", "i.e",
                  "fig", "no", "approx", "dept", "est", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep",
                  "sept", "oct", "nov", "dec", "u.s", "a.m", "p.m"}


def split_sentences(text: str) -> list[str]:
    """Sentences end at ``.``, ``!`` or ``?`` (then closing quotes/brackets) before whitespace or the end; a
    period after a known abbreviation (Dr., e.g.) or a single letter (initials) ends none. Our heuristic."""
    sentences, start = [], 0
    for end in re.finditer(r"[.!?]+[\"'”’)\]]*(?=\s|$)", text):
        before = re.search(r"([\w.]*)\.$", text[start:end.start() + 1]) if end.group() == "." else None
        if before and (before.group(1).lower() in _ABBREVIATIONS or re.fullmatch(r"[^\W\d_]", before.group(1))):
            continue
        sentences.append(text[start:end.end()])
        start = end.end()
    sentences.append(text[start:])
    return [s.strip() for s in sentences if re.search(r"\w", s)]


def _blank_line_paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


# --- keywords -----------------------------------------------------------------------------------------------
@instruction("keywords:existence")
def keywords_existence(response: str, *, keywords: list) -> bool:
    """Every keyword occurs (case-insensitive)."""
    return all(re.search(re.escape(k), response, re.IGNORECASE) for k in keywords)


@instruction("keywords:frequency")
def keyword_frequency(response: str, *, keyword: str, frequency: int, relation: str) -> bool:
    """The keyword occurs (case-insensitive) less than / at least ``frequency`` times."""
    return _compare(len(re.findall(re.escape(keyword), response, re.IGNORECASE)), relation, frequency)


@instruction("keywords:forbidden_words")
def forbidden_words(response: str, *, forbidden_words: list) -> bool:
    """None of the words occurs as a whole word (case-insensitive)."""
    return not any(re.search(rf"\b{re.escape(w)}\b", response, re.IGNORECASE) for w in forbidden_words)


@instruction("keywords:letter_frequency")
def letter_frequency(response: str, *, letter: str, let_frequency: int, let_relation: str) -> bool:
    """The letter occurs (case-insensitive) less than / at least ``let_frequency`` times."""
    return _compare(response.lower().count(letter.lower()), let_relation, let_frequency)


# --- language -------------------------------------------------------------------------------------------------
@instruction("language:response_language")
def response_language(response: str, *, language: str) -> bool:
    """The response is in ``language`` (ISO 639-1; "zh-cn" reads as "zh"), by the heuristic
    :func:`detect_language`.

    Text without letters passes, as the reference counts text its detector cannot read; text whose script fits
    ``language`` but that gives no stopword evidence either way (a one-word answer) passes too.
    """
    code = language.lower().split("-")[0]
    if code not in LANGUAGE_SCRIPTS:
        raise MergeplugError(unknown_name_message("IFEval response language", language, LANGUAGE_SCRIPTS))
    script = dominant_script(response)
    if script is None:
        return True
    detected = detect_language(response)
    return detected == code if detected else LANGUAGE_SCRIPTS[code] == script


# --- length constraints -----------------------------------------------------------------------------------------
@instruction("length_constraints:number_sentences")
def number_sentences(response: str, *, num_sentences: int, relation: str) -> bool:
    """Less than / at least ``num_sentences`` sentences (:func:`split_sentences`)."""
    return _compare(len(split_sentences(response)), relation, num_sentences)


@instruction("length_constraints:number_paragraphs")
def number_paragraphs(response: str, *, num_paragraphs: int) -> bool:
    """Exactly ``num_paragraphs`` paragraphs separated by markdown dividers (a line of ``***`` or ``* * *``);
    an empty paragraph between two dividers fails."""
    parts = [p.strip() for p in re.split(r"^[ \t]*\*[ \t]*\*[ \t]*\*[ \t*]*$", response, flags=re.MULTILINE)]
    if any(not p for p in parts[1:-1]):
        return False
    return sum(1 for p in parts if p) == num_paragraphs


@instruction("length_constraints:number_words")
def number_words(response: str, *, num_words: int, relation: str) -> bool:
    """Less than / at least ``num_words`` words (runs of word characters)."""
    return _compare(len(_words(response)), relation, num_words)


@instruction("length_constraints:nth_paragraph_first_word")
def nth_paragraph_first_word(response: str, *, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    """Exactly ``num_paragraphs`` paragraphs separated by blank lines, the ``nth_paragraph``-th (from 1)
    starting with ``first_word`` (case-insensitive, leading quotes and trailing punctuation ignored)."""
    if nth_paragraph < 1:
        raise MergeplugError(f"IFEval length_constraints:nth_paragraph_first_word: nth_paragraph={nth_paragraph} "
                             "counts from 1")
    paragraphs = _blank_line_paragraphs(response)
    if len(paragraphs) != num_paragraphs or nth_paragraph > len(paragraphs):
        return False
    word = re.match(r"[\"'“‘*#\s]*([^\s.,;:!?\"'”’]*)", paragraphs[nth_paragraph - 1]).group(1)
    return word.lower() == first_word.strip().lower()


# --- detectable content -----------------------------------------------------------------------------------------
@instruction("detectable_content:number_placeholders")
def number_placeholders(response: str, *, num_placeholders: int) -> bool:
    """At least ``num_placeholders`` placeholders in square brackets, such as ``[address]``."""
    return len(re.findall(r"\[[^\[\]\n]+\]", response)) >= num_placeholders


@instruction("detectable_content:postscript")
def postscript(response: str, *, postscript_marker: str) -> bool:
    """A postscript starting with the marker ("P.S.", "P.P.S"), case-insensitive, a space allowed after each
    period, after a line start or whitespace."""
    marker = "".join(r"\.\s?" if ch == "." else r"\s*" if ch.isspace() else re.escape(ch)
                     for ch in postscript_marker.strip())
    return re.search(rf"(?:^|\s){marker}", response, re.IGNORECASE) is not None


# --- detectable format ------------------------------------------------------------------------------------------
@instruction("detectable_format:number_bullet_lists")
def number_bullet_lists(response: str, *, num_bullets: int) -> bool:
    """Exactly ``num_bullets`` markdown bullet points (lines starting with ``* `` or ``- ``)."""
    return len(re.findall(r"^[ \t]*[*-][ \t]+\S", response, re.MULTILINE)) == num_bullets


CONSTRAINED_RESPONSES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


@instruction("detectable_format:constrained_response")
def constrained_response(response: str) -> bool:
    """Contains one of the paper's options: "My answer is yes.", "My answer is no.", "My answer is maybe."."""
    return any(option in response for option in CONSTRAINED_RESPONSES)


@instruction("detectable_format:number_highlighted_sections")
def number_highlighted_sections(response: str, *, num_highlights: int) -> bool:
    """At least ``num_highlights`` markdown highlights, ``*text*`` or ``**text**``, within one line."""
    spans = re.findall(r"\*\*([^\n*]+)\*\*|\*([^\n*]+)\*", response)
    return sum(1 for bold, italic in spans if (bold or italic).strip()) >= num_highlights


@instruction("detectable_format:multiple_sections")
def multiple_sections(response: str, *, section_spliter: str, num_sections: int) -> bool:
    """At least ``num_sections`` section headers ``<section_spliter> <number>`` ("SECTION 1"); the splitter is
    matched case-sensitively, as the reference does."""
    headers = re.findall(rf"(?<!\w){re.escape(section_spliter.strip())}\s?\d+", response)
    return len(headers) >= num_sections


@instruction("detectable_format:json_format")
def json_format(response: str) -> bool:
    """The whole response is JSON, possibly inside a ```` ```json ```` fence."""
    text = re.sub(r"^```[a-zA-Z]*\s*|\s*```$", "", response.strip())
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@instruction("detectable_format:title")
def title(response: str) -> bool:
    """A title in double angular brackets, such as ``<<poem of joy>>``."""
    return any(t.strip() for t in re.findall(r"<<([^\n<>]+)>>", response))


# --- combination --------------------------------------------------------------------------------------------------
@instruction("combination:two_responses")
def two_responses(response: str) -> bool:
    """Two different responses separated by six asterisks ``******``; an empty one between separators fails."""
    parts = response.split("******")
    if any(not p.strip() for p in parts[1:-1]):
        return False
    answers = [p.strip() for p in parts if p.strip()]
    return len(answers) == 2 and answers[0] != answers[1]


@instruction("combination:repeat_prompt")
def repeat_prompt(response: str, *, prompt_to_repeat: str) -> bool:
    """Starts by repeating the request word for word (case-insensitive, surrounding whitespace ignored)."""
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


# --- start and end --------------------------------------------------------------------------------------------------
@instruction("startend:end_checker")
def end_checker(response: str, *, end_phrase: str) -> bool:
    """Ends with ``end_phrase`` (case-insensitive; closing quotes and whitespace ignored), nothing after it."""
    return response.strip().strip("\"”").rstrip().lower().endswith(end_phrase.strip().lower())


@instruction("startend:quotation")
def quotation(response: str) -> bool:
    """Wrapped in double quotation marks; straight ``"…"`` or curly ``“…”`` (curly is our addition)."""
    text = response.strip()
    return len(text) > 1 and (text[0], text[-1]) in {('"', '"'), ("“", "”")}


# --- change case ------------------------------------------------------------------------------------------------------
@instruction("change_case:capital_word_frequency")
def capital_word_frequency(response: str, *, capital_frequency: int, capital_relation: str) -> bool:
    """Less than / at least ``capital_frequency`` words in all capital letters ("I" counts, as in the reference)."""
    return _compare(sum(1 for w in _words(response) if w.isupper()), capital_relation, capital_frequency)


def _is_english(text: str) -> bool:
    script, detected = dominant_script(text), detect_language(text)
    return script is None or detected == "en" or (detected is None and script == "latin")


@instruction("change_case:english_capital")
def english_capital(response: str) -> bool:
    """English, and every cased letter a capital."""
    return response.isupper() and _is_english(response)


@instruction("change_case:english_lowercase")
def english_lowercase(response: str) -> bool:
    """English, and every cased letter lowercase."""
    return response.islower() and _is_english(response)


# --- punctuation ----------------------------------------------------------------------------------------------------
@instruction("punctuation:no_comma")
def no_comma(response: str) -> bool:
    """No ASCII comma ``,`` (other scripts' commas are not counted, as in the reference)."""
    return "," not in response


# --- the language heuristic -------------------------------------------------------------------------------------------
# IFEval's reference uses the langdetect package, which is not installed here; this heuristic needs no package and
# no network. It is a heuristic: the script with the most letters decides the language when one language uses it
# (Thai, Korean, Tamil...); kana decides Japanese over Chinese; where several languages share a script, the one
# whose common function words (and letters only it uses) occur most often wins, and a tie gives no answer.
_SCRIPT_RANGES = sorted([
    (0x0041, 0x005A, "latin"), (0x0061, 0x007A, "latin"), (0x00C0, 0x024F, "latin"), (0x1E00, 0x1EFF, "latin"),
    (0x0370, 0x03FF, "greek"), (0x0400, 0x04FF, "cyrillic"), (0x0530, 0x058F, "armenian"),
    (0x0590, 0x05FF, "hebrew"), (0x0600, 0x06FF, "arabic"), (0x0750, 0x077F, "arabic"),
    (0xFB50, 0xFDFF, "arabic"), (0xFE70, 0xFEFF, "arabic"), (0x0900, 0x097F, "devanagari"),
    (0x0980, 0x09FF, "bengali"), (0x0A00, 0x0A7F, "gurmukhi"), (0x0A80, 0x0AFF, "gujarati"),
    (0x0B80, 0x0BFF, "tamil"), (0x0C00, 0x0C7F, "telugu"), (0x0C80, 0x0CFF, "kannada"),
    (0x0D00, 0x0D7F, "malayalam"), (0x0E00, 0x0E7F, "thai"), (0x10A0, 0x10FF, "georgian"),
    (0x1100, 0x11FF, "hangul"), (0x3130, 0x318F, "hangul"), (0xAC00, 0xD7AF, "hangul"),
    (0x3040, 0x30FF, "kana"), (0x3400, 0x4DBF, "han"), (0x4E00, 0x9FFF, "han"),
])

#: Language code -> its script; the languages this heuristic knows (IFEval's response languages among them).
LANGUAGE_SCRIPTS = {
    **dict.fromkeys("en es pt fr de it nl pl vi sw fi tr id".split(), "latin"),
    **dict.fromkeys("ru uk bg".split(), "cyrillic"), **dict.fromkeys("ar fa ur".split(), "arabic"),
    **dict.fromkeys("hi mr ne".split(), "devanagari"),
    "el": "greek", "hy": "armenian", "he": "hebrew", "bn": "bengali", "pa": "gurmukhi", "gu": "gujarati",
    "ta": "tamil", "te": "telugu", "kn": "kannada", "ml": "malayalam", "th": "thai", "ka": "georgian",
    "ko": "hangul", "ja": "kana", "zh": "han",
}

_STOPWORDS = {code: set(words.split()) for code, words in {
    "en": "the and of to is in that it for you with are this on as be was have not or by at your can will from an "
          "they which we their has would there what my me",
    "es": "el la los las de que y en un una es por con para del se no al lo como más pero sus su este esta son "
          "también muy porque cuando hay está",
    "pt": "o os as de que e do da dos das em um uma para com não no na por se mais como mas ao ele isso também são "
          "está muito você seu sua é",
    "fr": "le la les de des du et est un une en que qui dans pour pas ne sur au aux avec ce cette il elle nous vous "
          "sont mais ou plus être je ils leur",
    "de": "der die das und ist nicht ein eine zu den dem von mit sich des auf für im es sie auch an als werden "
          "wird sind oder aber wie ich wir noch bei nach einen",
    "it": "il lo la gli le di che e è un una per non in con del della dei sono si da al come anche più ma questo "
          "questa nel alla ha essere",
    "nl": "de het een en van is dat niet op te zijn voor met die er ook als maar bij om aan wordt worden dit ik je "
          "hij naar",
    "pl": "i w z na nie się że do jest to jak ale o od po za dla czy jego są oraz tak przez być który które także",
    "vi": "và của là có không những được các một trong cho này người với đã để khi đến thì như cũng từ về bạn tôi "
          "rất nhiều",
    "sw": "na ya wa kwa ni za katika la kuwa hii cha vya kama lakini pia yake hiyo wake zaidi sana hata wao huo "
          "baada kwamba ili watu",
    "fi": "ja on ei että se oli hän mutta kun ovat tai myös joka kuin tämä ole sen niin voi mitä jos vain nyt "
          "minä sinä olla kanssa",
    "tr": "ve bir bu da de için ile çok daha olarak gibi ama ne o en var değil olan kadar sonra her şey",
    "id": "yang dan di ini itu dengan untuk tidak dari dalam akan pada juga ke karena ada atau oleh saya bisa "
          "sudah mereka",
    "ru": "и в не на что с это как по но он я к из у то за для от так же все она был быть его мы вы они который "
          "также или если",
    "uk": "і в не на що з це як по але він я до із у та за для від так же все вона був бути його ми ви вони який "
          "також або якщо",
    "bg": "и в на не да се за от с е са че то по като това но ще съм си който които при към му ги или ако беше "
          "има една един",
    "ar": "في من على إلى أن عن ما هذا هذه التي الذي كان مع هو هي لا قد ذلك بين كل",
    "fa": "و در به از که این را با است برای آن یک خود تا می بر هم نیز شد شده ها",
    "ur": "کے کی کا ہے میں اور سے کو نے یہ ہیں پر ایک تھا کہ وہ بھی",
    "hi": "है हैं के की का में और से को यह कि पर भी एक नहीं था लिए तो हो इस जो ने गया कर वह",
    "mr": "आहे आहेत आणि या हे ही व मध्ये नाही त्या ते होते असे करण्यात केले त्यांच्या म्हणून पण आपण तर",
    "ne": "छ छन् र मा यो पनि गर्न भएको थियो गरेको लागि भने हुन्छ छैन तथा उनी गर्ने",
}.items()}

# letters one language of its script uses and the others (nearly) never do: strong evidence, so they weigh double
_OWN_LETTERS = {"de": "ß", "es": "ñ¿¡", "pt": "ãõ", "fr": "èêœ", "pl": "ąęłśźżćń", "vi": "ơưđ",
                "tr": "ığş", "ru": "ыэё", "uk": "іїєґ", "bg": "ъ", "ar": "يكةى", "ur": "ٹڈڑںےہھ", "fa": "پچژگ"}


def dominant_script(text: str) -> str | None:
    """The script with the most letters in ``text`` (kana beats Han: Japanese mixes both); None without letters."""
    import bisect

    counts: dict[str, int] = {}
    starts = [r[0] for r in _SCRIPT_RANGES]
    for ch in text:
        i = bisect.bisect_right(starts, ord(ch)) - 1
        if i >= 0 and ord(ch) <= _SCRIPT_RANGES[i][1]:
            counts[_SCRIPT_RANGES[i][2]] = counts.get(_SCRIPT_RANGES[i][2], 0) + 1
    if counts.get("kana"):
        counts["kana"] += counts.pop("han", 0)
    return max(counts, key=counts.get) if counts else None


def _tokens(text: str) -> list[str]:
    import unicodedata

    def edge(ch: str) -> bool:
        return unicodedata.category(ch)[0] in "PSZ"

    tokens = []
    for raw in text.lower().split():  # not \w+: it splits Devanagari words at their vowel signs
        start, end = 0, len(raw)
        while start < end and edge(raw[start]):
            start += 1
        while end > start and edge(raw[end - 1]):
            end -= 1
        tokens.append(raw[start:end])
    return tokens


def detect_language(text: str) -> str | None:
    """Our heuristic guess at the language code of ``text``; None when it has no letters or no evidence."""
    script = dominant_script(text)
    candidates = [code for code, s in LANGUAGE_SCRIPTS.items() if s == script]
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    tokens, lowered = _tokens(text), text.lower()
    scores = {code: sum(t in _STOPWORDS[code] for t in tokens)
              + 2 * sum(lowered.count(ch) for ch in _OWN_LETTERS.get(code, "")) for code in candidates}
    best = max(scores.values())
    winners = [code for code, score in scores.items() if score == best]
    return winners[0] if best > 0 and len(winners) == 1 else None
