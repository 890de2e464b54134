"""IFEval evaluator: every checker on a passing and a failing response, strict vs loose, prompt vs instruction level,
the metric module by path, and the errors a user can hit."""
from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest

from mergeplug import MergeplugError
from mergeplug.evaluation import Generate, Scored
from mergeplug.plugins import Registry
from mergeplug_plugins.evaluators.ifeval import instructions
from mergeplug_plugins.evaluators.ifeval.evaluator import IFEval, ratio_with_stderr

HERE = Path(instructions.__file__).parent

# (instruction id, kwargs, a response that follows it, a response that does not)
CASES = [
    ("keywords:existence", {"keywords": ["banana", "Apple"]}, "I like apple pie and a BANANA.", "I like apple pie."),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "at least"},
     "A cat and another Cat.", "One cat only."),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "less than"}, "One cat.", "cat, cat"),
    ("keywords:forbidden_words", {"forbidden_words": ["red", "blue"]},
     "The sky is bluish and reddish.", "The sky is Blue."),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 3, "let_relation": "at least"},
     "Zebras zigzag lazily.", "A zebra."),
    ("language:response_language", {"language": "fr"},
     "Le chat est sur la table et il dort.", "The cat is on the table and it sleeps."),
    ("language:response_language", {"language": "ru"},
     "Собака не в доме, она спит на улице.", "Кучето не е в къщата, то спи навън и ще дойде."),
    ("language:response_language", {"language": "ja"}, "今日はいい天気ですね。", "今天天气很好。"),
    ("language:response_language", {"language": "hi"},
     "यह एक अच्छा दिन है और मैं खुश हूं।", "हा एक चांगला दिवस आहे आणि मी आनंदी आहे."),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "Dr. Smith arrived. He sat down.", "One. Two. Three."),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "at least"},
     "It costs 3.5 dollars! Really?", "It costs 3.5 dollars, e.g. cheap."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2},
     "First part.\n***\nSecond part.", "First.\n***\n\n***\nSecond."),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"},
     "Only four words here.", "This one has exactly five."),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "However"},
     "Intro text.\n\n\"However, this.\"", "Intro.\n\nBut no."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2},
     "Send it to [name] at [address].", "Send it to [name]."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hello.\n\np.s. see you", "Hello. PS see you"),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\nP. P. S. more", "Hi.\nP.S. more"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2},
     "Intro\n* one\n  - two\n**Bold** line", "* one\n- two\n* three"),
    ("detectable_format:constrained_response", {}, "Thinking... My answer is maybe.", "My answer is perhaps."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and **two**", "*one* and ** **"),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\nIntro\nSECTION 2\nEnd", "SECTION 1\nAll in one."),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', 'Here is JSON: {"a": 1}'),
    ("detectable_format:title", {}, "<<My Poem>>\nRoses are red.", "<< >>\nRoses are red."),
    ("combination:two_responses", {}, "Answer one.\n******\nAnswer two.", "Same.\n******\nSame."),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."},
     "write a poem. Roses are red.", "Roses are red. Write a poem."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     'Done. Any other questions?"', "Any other questions? Bye."),
    ("startend:quotation", {}, '"Hello there."', "Hello there."),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "This is VERY IMPORTANT.", "This is Very important."),
    ("change_case:english_capital", {}, "THIS IS ALL CAPS AND IT IS FINE.", "LE CHAT EST SUR LA TABLE ET IL DORT."),
    ("change_case:english_lowercase", {}, "all lowercase and it is fine.", "Not all lowercase."),
    ("punctuation:no_comma", {}, "No commas here.", "Yes, a comma."),
]


def test_the_table_covers_every_instruction_of_the_benchmark():
    assert {case[0] for case in CASES} == set(instructions.INSTRUCTIONS)
    assert len(instructions.INSTRUCTIONS) == 25


@pytest.mark.parametrize(("instruction_id", "kwargs", "good", "bad"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_checker_on_a_following_and_a_breaking_response(instruction_id, kwargs, good, bad):
    assert instructions.follows(instruction_id, good, kwargs) is True
    assert instructions.follows(instruction_id, bad, kwargs) is False


def test_blank_response_follows_nothing_even_loosely():
    assert instructions.follows("punctuation:no_comma", "  \n ", {}, loose=True) is False


def test_sentence_splitter_keeps_abbreviations_initials_and_decimals():
    assert instructions.split_sentences("Mr. J. Doe paid 3.50 dollars, e.g. cash. Then he left! Why?") == [
        "Mr. J. Doe paid 3.50 dollars, e.g. cash.", "Then he left!", "Why?"]


def test_language_heuristic_tells_languages_of_one_script_apart():
    detect = instructions.detect_language
    assert [detect(t) for t in ["Der Hund ist nicht im Haus und er schläft.", "Tänään on kaunis päivä ja minä olen.",
                                "یہ ایک اچھا دن ہے اور میں خوش ہوں", "این یک روز خوب است و من در خانه هستم",
                                "12 + 3 = 15", "Hola"]] == ["de", "fi", "ur", "fa", None, None]
    # no letters, or the right script without evidence: passes (see the checker's docstring)
    assert instructions.follows("language:response_language", "12 + 3", {"language": "ko"})
    assert instructions.follows("language:response_language", "Hola", {"language": "es"})
    assert not instructions.follows("language:response_language", "Hola", {"language": "ru"})


def test_none_kwargs_are_ignored_and_whole_floats_read_as_ints():
    kwargs = {"num_words": 5.0, "relation": "less than", "keywords": None, "language": None}
    bound = instructions.bind_kwargs("length_constraints:number_words", kwargs)
    assert bound == {"num_words": 5, "relation": "less than"}


def test_loose_passes_where_strict_fails_on_a_preamble_line_and_markdown():
    evaluator = IFEval()
    sample = {"instruction_id_list": ["punctuation:no_comma", "startend:quotation"], "kwargs": [{}, {}]}
    strict, loose = evaluator.follows(sample, 'Sure, here it is:\n**"Hello there"**')
    assert strict == [False, False]
    assert loose == [True, True]  # first line removed; first line removed and * stripped
    scored = evaluator.score(sample, [['Sure, here it is:\n**"Hello there"**']])
    assert scored.scores == {"prompt_level_strict": 0.0, "prompt_level_loose": 1.0,
                             "instruction_level_strict": 0.0, "instruction_level_loose": 1.0}


THREE_SAMPLES = [
    ({"instruction_id_list": ["punctuation:no_comma", "detectable_format:title"], "kwargs": [{}, {}]},
     "<<Title>>\nNo commas."),  # 2 of 2
    ({"instruction_id_list": ["punctuation:no_comma", "startend:quotation", "keywords:existence"],
      "kwargs": [{}, {}, {"keywords": ["zebra"]}]}, "Hello, a zebra"),  # 1 of 3
    ({"instruction_id_list": ["change_case:english_lowercase"], "kwargs": json.dumps([{"language": None}])},
     "Upper Case"),  # 0 of 1; kwargs given as a JSON string
]


def test_prompt_level_is_a_mean_over_prompts_and_instruction_level_a_micro_average():
    evaluator = IFEval()
    scored = [evaluator.score(sample, [[response]]) for sample, response in THREE_SAMPLES]
    assert [s.scores["instruction_level_strict"] for s in scored] == pytest.approx([1.0, 1 / 3, 0.0])
    result = evaluator.aggregate(scored)
    assert list(result) == list(IFEval.metrics)
    for mode in ("strict", "loose"):
        assert result[f"prompt_level_{mode}"].value == pytest.approx(1 / 3)
        assert result[f"prompt_level_{mode}"].stderr == pytest.approx(1 / 3)  # sqrt((1/3)/3)
        assert result[f"prompt_level_{mode}"].n == 3
        # 3 of 6 instructions, not the macro mean (1 + 1/3 + 0) / 3
        assert result[f"instruction_level_{mode}"].value == pytest.approx(0.5)
        # residuals y - R x = 1, -0.5, -0.5: sqrt(1.5 / (3 * 2)) / mean(x)=2
        assert result[f"instruction_level_{mode}"].stderr == pytest.approx(0.25)
        assert result[f"instruction_level_{mode}"].n == 6


def test_aggregate_of_records_without_details_is_an_error():
    with pytest.raises(MergeplugError, match="lacks details"):
        IFEval().aggregate([Scored({"prompt_level_strict": 1.0, "prompt_level_loose": 1.0})])


def test_ratio_stderr_edge_cases():
    assert ratio_with_stderr([2], [3]).stderr is None and ratio_with_stderr([2], [3]).value == pytest.approx(2 / 3)
    assert math.isnan(ratio_with_stderr([], []).value)


def test_metric_module_loads_by_path_and_gives_the_evaluators_numbers(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from mergeplug.evaluation import load_metric

    metric = load_metric(HERE / "ifeval_metric.py")
    references = [{"instruction_id_list": s["instruction_id_list"],
                   "kwargs": s["kwargs"] if isinstance(s["kwargs"], str) else json.dumps(s["kwargs"])}
                  for s, _ in THREE_SAMPLES]
    values = metric.compute(predictions=[r for _, r in THREE_SAMPLES], references=references)
    assert values == pytest.approx({"prompt_level_strict": 1 / 3, "prompt_level_loose": 1 / 3,
                                    "instruction_level_strict": 0.5, "instruction_level_loose": 0.5})


def test_registered_through_the_plugin_manager_with_its_schema_defaults():
    component = Registry().get("evaluator", "ifeval")
    assert component.load() is IFEval
    assert component.reference == "arXiv:2311.07911"
    assert component.parameters["properties"]["extra_instructions"]["default"] == {}
    evaluator = component.load()(extra_instructions={})
    assert evaluator.requests({}, "Write a haiku.", {"max_new_tokens": 1280}) == [
        Generate("Write a haiku.", max_new_tokens=1280)]


def test_unknown_instruction_id_lists_known_ones_closest_first():
    with pytest.raises(MergeplugError, match="unknown IFEval instruction id 'punctuation:no_commas'") as err:
        IFEval().score({"instruction_id_list": ["punctuation:no_commas"], "kwargs": [{}]}, [["x"]])
    assert str(err.value).split("known: ")[1].startswith("punctuation:no_comma, ")


@pytest.mark.parametrize(("instruction_id", "kwargs", "message"), [
    ("keywords:frequency", {"keyword": "a", "frequency": 1}, r"missing \['relation'\]"),
    ("punctuation:no_comma", {"num_words": 3}, r"unexpected \['num_words'\]"),
    ("length_constraints:number_words", {"num_words": "five", "relation": "at least"},
     "num_words='five' should be int"),
    ("keywords:existence", {"keywords": "apple"}, "should be a list of strings"),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at most"}, "unknown IFEval relation 'at most'"),
    ("language:response_language", {"language": "xx"}, "unknown IFEval response language 'xx'"),
])
def test_bad_kwargs_are_named(instruction_id, kwargs, message):
    with pytest.raises(MergeplugError, match=message):
        instructions.follows(instruction_id, "Some response.", kwargs)


@pytest.mark.parametrize(("sample", "answers", "message"), [
    ({"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}, {}]}, [["x"]], "1 instruction ids but 2 kwargs"),
    ({"instruction_id_list": [], "kwargs": []}, [["x"]], "non-empty list"),
    ({"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}, [["x", "y"]], "exactly one response"),
])
def test_bad_samples_are_named(sample, answers, message):
    with pytest.raises(MergeplugError, match=message):
        IFEval().score(sample, answers)


def test_a_checker_added_in_process_with_the_decorator():
    @instructions.instruction("test:ends_with_exclamation")
    def ends_with_exclamation(response: str, *, count: int = 1) -> bool:
        return response.rstrip().endswith("!" * count)

    try:
        sample = {"instruction_id_list": ["test:ends_with_exclamation"], "kwargs": [{"count": 2}]}
        assert IFEval().score(sample, [["Wow!!"]]).scores["prompt_level_strict"] == 1.0
        assert IFEval().score(sample, [["Wow!"]]).scores["prompt_level_strict"] == 0.0
        with pytest.raises(MergeplugError, match="already has a checker"):
            instructions.instruction("test:ends_with_exclamation")(lambda response: True)
    finally:
        instructions.INSTRUCTIONS.pop("test:ends_with_exclamation")


def test_a_checker_named_by_extra_instructions(tmp_path, monkeypatch):
    (tmp_path / "my_checkers.py").write_text(textwrap.dedent("""
        def starts_with(response, *, prefix):
            return response.startswith(prefix)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    evaluator = IFEval(extra_instructions={"acme:starts_with": "my_checkers:starts_with"})
    sample = {"instruction_id_list": ["acme:starts_with", "punctuation:no_comma"], "kwargs": [{"prefix": "Yo"}, {}]}
    assert evaluator.score(sample, [["Yo there"]]).scores["prompt_level_strict"] == 1.0
    assert evaluator.score(sample, [["Hi there"]]).scores["instruction_level_strict"] == 0.5
    assert "acme:starts_with" not in IFEval().checkers  # per evaluator, not global
    with pytest.raises(MergeplugError, match="'acme:x': cannot load 'my_checkers:missing'"):
        IFEval(extra_instructions={"acme:x": "my_checkers:missing"})
    with pytest.raises(MergeplugError, match="is a built-in instruction"):
        IFEval(extra_instructions={"punctuation:no_comma": "my_checkers:starts_with"})


def test_scored_details_keep_per_instruction_results():
    sample, response = THREE_SAMPLES[1]
    scored = IFEval().score(sample, [[response]])
    assert isinstance(scored, Scored)
    assert scored.details == {
        "instruction_id_list": ["punctuation:no_comma", "startend:quotation", "keywords:existence"],
        "strict": [False, False, True], "loose": [False, False, True]}
