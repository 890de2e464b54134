"""The evaluate loop with in-process fake components: records, resume, aggregation, comparisons, errors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

import mergeplug.evaluate_models as em
from mergeplug import MergeplugError, hookimpl
from mergeplug.cli import cli
from mergeplug.evaluation import Evaluator, Scored
from mergeplug.plugins import Registry, set_registry
from mergeplug.runner import Backend

QUESTIONS = [f"q{i}" for i in range(6)]
ANSWERS = {q: str(i * 7) for i, q in enumerate(QUESTIONS)}
# What each model gets right: index sets, so every score below is known by hand.
RIGHT = {"special": {0, 1, 2, 3, 4, 5}, "merged": {0, 1, 2}, "base": {0, 1, 2, 3}}
OPENED: list[str] = []
ANSWERED: list[str] = []


class FakeBackend(Backend):
    name = "fake"

    def __init__(self, model, **options):
        super().__init__(model, **options)
        self.who = Path(model).name
        OPENED.append(self.who)

    def generate(self, requests):
        out = []
        for r in requests:
            question = r.prompt.split("Q: ")[-1].split("\n")[0]
            ANSWERED.append(question)
            right = QUESTIONS.index(question) in RIGHT[self.who]
            out.append([ANSWERS[question] if right else "nope"])
        return out


class Match(Evaluator):
    metrics = ("match",)
    required_fields = ("answer",)

    def score(self, sample, answers):
        return Scored({"match": float(answers[0][0] == sample["answer"])}, {"said": answers[0][0]})


class Plugin:
    def __init__(self, folder: Path):
        self.folder = folder

    @hookimpl
    def register_backends(self, register):
        register("fake", FakeBackend, description="answers from a table")

    @hookimpl
    def register_evaluators(self, register):
        register("match", Match, description="exact string match")

    @hookimpl
    def register_domains(self, register):
        register("quiz", self.folder / "quiz.yaml", description="a quiz")
        register("basics", self.folder / "basics.yaml", description="base abilities")


DOMAIN = """\
name: {name}
description: a test domain
{role}
benchmarks:
  - name: {bench}
    sample: rows.jsonl
    columns: {{question: question, answer: answer}}
    prompt: "Q: {{question}}\\nA:"
    evaluator: match
"""


@pytest.fixture
def world(tmp_path):
    folder = tmp_path / "domains"
    folder.mkdir()
    (folder / "rows.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in ANSWERS.items()))
    (folder / "quiz.yaml").write_text(DOMAIN.format(name="quiz", role="", bench="trivia"))
    (folder / "basics.yaml").write_text(DOMAIN.format(name="basics", role="role: base_ability", bench="facts"))
    models = {}
    for who in RIGHT:
        (tmp_path / who).mkdir()
        (tmp_path / who / "config.json").write_text("{}")
        models[who] = str(tmp_path / who)
    previous = set_registry(Registry(entry_points=[], plugins=[("test", Plugin(folder))]))
    OPENED.clear()
    ANSWERED.clear()
    yield tmp_path, models
    set_registry(previous)


def options(**kw):
    return em.EvaluateOptions(backend="fake", offline=True, progress=False, **kw)


def test_scores_records_and_comparisons(world):
    tmp_path, models = world
    out = tmp_path / "results"
    summary = em.evaluate_models([models["merged"]], ["quiz", "basics"], out, options(),
                                 base=models["base"], specialists={"quiz": models["special"]})
    merged = summary["models"][models["merged"]]
    assert merged["domain_scores"] == {"quiz": 0.5, "basics": 0.5}
    assert merged["normalised"] == {"quiz": 0.5 / 1.0}
    # Forgetting on the base-ability domain: base 4/6, merged 3/6.
    assert merged["forgetting_absolute"] == pytest.approx(4 / 6 - 3 / 6)
    assert merged["forgetting"] == pytest.approx((4 / 6 - 3 / 6) / (4 / 6))
    assert summary["models"][models["base"]]["role"] == "base"
    metrics = json.loads((out / em.model_key(models["merged"]) / "metrics.json").read_text())
    match = metrics["domains"]["quiz"]["trivia"]["metrics"]["match"]
    # Mean of [1,1,1,0,0,0] and its standard error sqrt(s²/n), s² = 0.3 (Bessel).
    assert match["value"] == 0.5 and match["n"] == 6
    assert match["stderr"] == pytest.approx(math.sqrt(0.3 / 6))
    records = [json.loads(line) for line in (out / em.model_key(models["merged"]) / "quiz" / "trivia.jsonl").open()]
    assert [r["scores"]["match"] for r in records] == [1, 1, 1, 0, 0, 0]
    assert records[0]["prompt"] == "Q: q0\nA:" and records[0]["outputs"] == [["0"]]
    assert records[4]["details"] == {"said": "nope"}
    table = (out / "summary.md").read_text()
    assert table.splitlines()[0] == "| model | quiz | basics | normalised | forgetting |"
    assert "| 0.500 | 0.500 | 0.500 | 0.250 |" in table


def test_rerun_skips_scored_samples_and_rescores_changed_ones(world, tmp_path):
    _, models = world
    out = tmp_path / "results"
    em.evaluate_models([models["merged"]], ["quiz"], out, options(limit=4))
    assert OPENED == ["merged"] and len(ANSWERED) == 4
    em.evaluate_models([models["merged"]], ["quiz"], out, options(limit=4))
    assert OPENED == ["merged"], "nothing left to score: the model is not even loaded"
    em.evaluate_models([models["merged"]], ["quiz"], out, options())
    assert ANSWERED[4:] == ["q4", "q5"], "only the two new samples are scored"
    records = (out / em.model_key(models["merged"]) / "quiz" / "trivia.jsonl").read_text().splitlines()
    assert len(records) == 6
    # A changed prompt format invalidates the records of every sample.
    yaml = tmp_path / "domains" / "quiz.yaml"
    yaml.write_text(yaml.read_text().replace('"Q: {question}\\nA:"', '"Q: {question}\\nAnswer:"'))
    set_registry(Registry(entry_points=[], plugins=[("test", Plugin(tmp_path / "domains"))]))
    ANSWERED.clear()
    em.evaluate_models([models["merged"]], ["quiz"], out, options())
    assert len(ANSWERED) == 6


def test_interrupted_run_keeps_finished_rounds(world, tmp_path, monkeypatch):
    _, models = world
    out = tmp_path / "results"
    monkeypatch.setattr(em, "ROUND_SAMPLES", 2)
    calls = {"n": 0}
    real = FakeBackend.generate

    def flaky(self, requests):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, requests)

    monkeypatch.setattr(FakeBackend, "generate", flaky)
    with pytest.raises(KeyboardInterrupt):
        em.evaluate_models([models["merged"]], ["quiz"], out, options())
    folder = out / em.model_key(models["merged"])
    assert len((folder / "quiz" / "trivia.jsonl").read_text().splitlines()) == 2
    assert not (folder / "metrics.json").exists(), "no metrics from a partial run"
    ANSWERED.clear()
    em.evaluate_models([models["merged"]], ["quiz"], out, options())
    assert ANSWERED == ["q2", "q3", "q4", "q5"]
    assert json.loads((folder / "metrics.json").read_text())["domains"]["quiz"]["trivia"]["metrics"]["match"]["value"] == 0.5


def test_bad_inputs_give_one_line_errors(world, tmp_path):
    _, models = world
    with pytest.raises(MergeplugError, match="unknown domain 'quizz'.*quiz"):
        em.evaluate_models([models["merged"]], ["quizz"], tmp_path / "r", options())
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergeplugError, match="no config.json"):
        em.evaluate_models([str(tmp_path / "empty")], ["quiz"], tmp_path / "r", options())
    with pytest.raises(MergeplugError, match="no such folder"):
        em.evaluate_models([str(tmp_path / "missing")], ["quiz"], tmp_path / "r", options())
    with pytest.raises(MergeplugError, match="specialist for domain 'basics'"):
        em.evaluate_models([models["merged"]], ["quiz"], tmp_path / "r", options(), specialists={"basics": models["base"]})


def test_cli_prints_the_table_and_reports_errors(world, tmp_path):
    _, models = world
    runner = CliRunner()
    result = runner.invoke(cli, ["evaluate", models["merged"], "--domains", "quiz", "-o", str(tmp_path / "r"),
                                 "--backend", "fake", "--offline", "--quiet", "--specialist", f"quiz={models['special']}"])
    assert result.exit_code == 0, result.output
    assert "| merged | 0.500 | 0.500 |" in result.output
    result = runner.invoke(cli, ["evaluate", models["merged"], "-o", str(tmp_path / "r"), "--backend", "fake"])
    assert result.exit_code == 2 and "say which --domains" in result.output
    result = runner.invoke(cli, ["evaluate", models["merged"], "--domains", "quiz", "-o", str(tmp_path / "r"),
                                 "--backend", "fakee"])
    assert result.exit_code == 2 and "unknown backend 'fakee'" in result.output
