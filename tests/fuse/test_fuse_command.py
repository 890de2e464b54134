"""`mergeplug fuse` end to end: two sources with different tokenizers (byte-level BPE, Unigram) fused into a pivot
(Metaspace BPE); the model card; the fused model reloads and knows the sources' patterns better than the pivot;
a rerun reuses every step; SCE merges the same targets; bad recipes fail in one line before any model runs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergeplug.cli import cli

QUICK = {"learning_rate": 1e-2, "max_steps": 30, "warmup_ratio": 0.0, "per_device_batch_size": 8,
         "gradient_accumulation_steps": 1, "max_seq_length": 64, "save_steps": 1000}


def write_recipe(folder: Path, models, **changes) -> Path:
    recipe = {"kind": "fuse", "name": "tiny fusion", "pivot": str(models.pivot),
              "sources": [str(models.counter), str(models.speller)],
              "corpus": {"data_files": "corpus.jsonl"}, "shard_sequences": 40, "device": "cpu",
              "finetuner": {"name": "fusion", "parameters": QUICK}}
    recipe.update(changes)
    path = folder / "fuse.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def fused(models, kit, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuse-run")
    corpus = kit.count_train + kit.spell_train + kit.general
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus), encoding="utf-8")
    recipe = write_recipe(folder, models)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("MERGEPLUG_CACHE", str(folder / "cache"))
        result = CliRunner().invoke(cli, ["fuse", str(recipe), "-o", str(folder / "out")])
    assert result.exit_code == 0, result.output
    return folder, result


def test_the_fused_model_is_written_with_its_model_card_and_reloads(models, fused):
    folder, result = fused
    out = folder / "out"
    assert f"wrote {out}" in result.output
    model = AutoModelForCausalLM.from_pretrained(str(out))
    pivot = AutoModelForCausalLM.from_pretrained(str(models.pivot))
    assert model.config.vocab_size == pivot.config.vocab_size == 100
    assert AutoTokenizer.from_pretrained(str(out)).get_vocab() == AutoTokenizer.from_pretrained(
        str(models.pivot)).get_vocab()
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["mergeplug"]["method"] == "fuse" and front["mergeplug"]["merger"] == "varm"
    assert front["mergeplug"]["sources"] == [str(models.counter), str(models.speller)]
    assert front["mergeplug"]["fusion"]["function"] == "minimum_ce"
    assert "arXiv:2402.16107" in card and "## Recipe" in card and "corpus.jsonl" in card
    assert not list(folder.glob(".out.*"))  # no staging folder left beside the output


def test_every_step_left_its_output_in_the_work_folder(fused):
    folder, result = fused
    work = folder / "out.fuse-work"
    stores = sorted(p.name.rsplit("-", 1)[0] for p in (work / "stores").iterdir())
    assert stores == ["counter", "pivot", "speller"]
    assert sorted(p.name.rsplit("-", 1)[0] for p in (work / "targets").iterdir()) == ["counter", "speller"]
    for model in (work / "models").iterdir():
        summary = json.loads((model / "model" / "mergeplug_finetune.json").read_text())
        assert summary["finetuner"] == "fusion" and summary["steps"] == 30
    for step in ("[1/4] record distributions 3/3: speller (running)", "[2/4] align 2/2: speller -> pivot",
                 "[3/4] finetune 2/2", "[4/4] merge 2 target model(s) with varm"):
        assert step in result.output


def test_the_fused_model_knows_the_sources_patterns_better_than_the_pivot(models, kit, fused):
    folder, _ = fused
    out = folder / "out"
    for lines in (kit.count_held_out, kit.spell_held_out):
        pivot, fused_nll = kit.continuation_nll(models.pivot, lines), kit.continuation_nll(out, lines)
        assert fused_nll < 0.6 * pivot, (lines[0], pivot, fused_nll)
    # Each source beats the pivot on its own lines, so MinCE chose it there.
    for target in (folder / "out.fuse-work" / "targets").iterdir():
        manifest = json.loads((target / "manifest.json").read_text())
        assert 0 < manifest["source_chosen"] < manifest["sequences"]
        assert manifest["paired"] > 0.7 * manifest["positions"]


def test_a_rerun_reuses_every_step_and_sce_merges_the_same_targets(models, fused, monkeypatch):
    folder, _ = fused
    monkeypatch.setenv("MERGEPLUG_CACHE", str(folder / "cache"))
    runner = CliRunner()
    again = runner.invoke(cli, ["fuse", str(folder / "fuse.yaml"), "-o", str(folder / "out"), "--force"])
    assert again.exit_code == 0, again.output
    assert again.output.count("(cached)") == 7 and "(running)" not in again.output
    recipe = write_recipe(folder, models, merger={"name": "sce", "parameters": {"select_topk": 0.5}})
    sce = runner.invoke(cli, ["fuse", str(recipe), "-o", str(folder / "sce"), "--quiet"])
    assert sce.exit_code == 0, sce.output
    card = yaml.safe_load((folder / "sce" / "README.md").read_text().split("---")[1])
    assert card["mergeplug"]["merger"] == "sce"
    AutoModelForCausalLM.from_pretrained(str(folder / "sce"))


def error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def test_bad_recipes_fail_in_one_line_before_any_model_runs(models, fused, tmp_path, monkeypatch):
    folder, _ = fused
    runner = CliRunner()
    with monkeypatch.context() as patch:
        patch.setenv("WORLD_SIZE", "2")
        several = runner.invoke(cli, ["fuse", str(folder / "fuse.yaml"), "-o", str(tmp_path / "x")])
    assert several.exit_code == 2 and "fuse: run it as one process" in error_lines(several)[0]
    exists = runner.invoke(cli, ["fuse", str(folder / "fuse.yaml"), "-o", str(folder / "out")])
    assert exists.exit_code == 2 and "already exists; pass --force" in error_lines(exists)[0]
    missing = write_recipe(tmp_path, models)
    result = runner.invoke(cli, ["fuse", str(missing), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and len(error_lines(result)) == 1
    assert "corpus: local data file corpus.jsonl does not exist" in error_lines(result)[0]
    typo = write_recipe(tmp_path, models, fusion={"function": "minimum_ce", "unpaired": "zero"})
    result = runner.invoke(cli, ["fuse", str(typo), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "fusion.unpaired: 'zero' is not one of" in error_lines(result)[0]
    no_base = write_recipe(tmp_path, models, merger="linear")
    result = runner.invoke(cli, ["fuse", str(no_base), "-o", str(tmp_path / "out")])
    assert "merger: 'linear' does not merge against a base model" in error_lines(result)[0]
    bad_lambda = write_recipe(tmp_path, models, finetuner={"name": "fusion", "parameters": {"lm_loss_weight": 2}})
    result = runner.invoke(cli, ["fuse", str(bad_lambda), "-o", str(tmp_path / "out")])
    assert "finetuner.parameters.lm_loss_weight: 2 is greater than the maximum of 1" in error_lines(result)[0]
    not_a_model = write_recipe(tmp_path, models, sources=[str(tmp_path)])
    (tmp_path / "corpus.jsonl").write_text('{"text": "count: 1 2 3"}\n')
    result = runner.invoke(cli, ["fuse", str(not_a_model), "-o", str(tmp_path / "out")])
    assert f"sources[0] ({tmp_path}): no config.json" in error_lines(result)[0]
    assert not (tmp_path / "out.fuse-work").exists()
