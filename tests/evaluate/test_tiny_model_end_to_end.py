"""Every domain end to end on a tiny Llama made here: real data samples, real evaluators, transformers backend."""
from __future__ import annotations

import json
import math

import pytest

import mergeplug.evaluate_models as em
from mergeplug.runner import open_backend
from mergeplug.evaluation import Generate, Loglikelihood
from mergeplug.testing import make_tiny_model, train_tiny_tokenizer

DOMAINS = ["instruction_following", "math", "multilingual", "coding", "safety", "general"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    tokenizer = train_tiny_tokenizer(root / "tok")
    model = make_tiny_model(root / "tiny", tokenizer_folder=tokenizer, max_position_embeddings=1024)
    out = root / "results"
    options = em.EvaluateOptions(offline=True, progress=False, limit=2, max_new_tokens=6,
                                 backend_options={"device": "cpu", "batch_size": 8})
    summary = em.evaluate_models([str(model)], DOMAINS, out, options)
    return str(model), out / em.model_key(str(model)), summary, options


def records(folder, domain, benchmark):
    return [json.loads(line) for line in (folder / domain / f"{benchmark}.jsonl").open()]


def test_every_benchmark_of_every_domain_is_scored(run):
    model, folder, summary, _ = run
    metrics = json.loads((folder / "metrics.json").read_text())["domains"]
    assert sorted(metrics) == sorted(DOMAINS)
    assert len([b for d in metrics.values() for b in d]) == 22
    for domain, benchmarks in metrics.items():
        for name, entry in benchmarks.items():
            headline = entry["metrics"][entry["headline"]]
            if headline["n"] == 0:  # xstest's first two rows are benign: no harmful prompt to refuse
                assert (domain, name, headline["value"]) == ("safety", "xstest", None)
                assert entry["metrics"]["compliance_rate"]["n"] == 2
            else:
                assert 0.0 <= headline["value"] <= 1.0, (domain, name)
            assert len(records(folder, domain, name)) == 2
    scores = summary["models"][model]["domain_scores"]
    assert set(scores) == set(DOMAINS) and all(0.0 <= v <= 1.0 for v in scores.values())


def test_generation_records_hold_what_the_model_generates(run):
    model, folder, _, _ = run
    got = records(folder, "math", "gsm8k")[0]
    with open_backend("transformers", model, device="cpu", progress=False) as backend:
        again = backend.generate([Generate(got["prompt"], max_new_tokens=6, stop=("Q:", "\n\n\n"))])
    assert got["outputs"] == [again[0]]
    assert got["prompt"].endswith("\nA:") and got["prompt"].count("Q: ") == 9  # 8 exemplars + the question
    coding = records(folder, "coding", "humanevalplus")[0]
    assert len(coding["outputs"][0]) == 10, "10 samples per problem, as MergeBench draws"
    assert set(coding["scores"]) == {"pass@1", "pass@10"}


def test_multiple_choice_scores_follow_the_models_log_likelihoods(run):
    model, folder, _, _ = run
    record = records(folder, "general", "mmlu")[0]
    logprobs = [o["logprob"] for o in record["outputs"]]
    pred = max(range(len(logprobs)), key=lambda i: logprobs[i])
    assert record["scores"]["acc"] == float(pred == record["details"]["gold"])
    with open_backend("transformers", model, device="cpu", progress=False) as backend:
        again = backend.loglikelihood([Loglikelihood(record["prompt"], " A")])
    assert math.isclose(again[0].logprob, logprobs[0], rel_tol=1e-5)


def test_rerun_scores_nothing_again(run, monkeypatch):
    model, folder, summary, options = run
    opened = []
    import mergeplug.runner as runner

    monkeypatch.setattr(runner, "open_backend", lambda *a, **k: opened.append(a))
    again = em.evaluate_models([model], DOMAINS, folder.parent, options)
    assert opened == []
    assert again["models"][model]["domain_scores"] == summary["models"][model]["domain_scores"]
