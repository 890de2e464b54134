"""`mergeplug finetune` end to end on a tiny model: it learns, the output reloads and generates, the log, the
loss curve and the summary are written, an interrupted run resumes from its checkpoint without touching the
output, and several CPU processes (torchrun, gloo) train one model."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from mergeplug.data import resolve_domains
from mergeplug.errors import MergeplugError
from mergeplug.finetuning import (Collator, finetune, load_training_sets, mixture, pack_examples, staging_folder,
                                  tokenize_examples)
from mergeplug.plugins import Registry

STEPS = 8


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "math-specialist"
    parameters = {"max_seq_length": 256, "gradient_accumulation_steps": 1, "learning_rate": 3e-3,
                  "warmup_ratio": 0.0, "max_steps": STEPS}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        assert finetune(str(tiny.base), "math", out, parameters=parameters, progress=False) == out
    return out


def math_batch(model_folder: Path) -> dict:
    """Every example of the math domain's training sample, packed and collated as the run trains on them."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_folder))
    sets = load_training_sets(resolve_domains("math"), {}, offline=True)
    examples = tokenize_examples(mixture(sets, seed=42), tokenizer, 256)
    return Collator(tokenizer.pad_token_id)(pack_examples(examples, 256))


def loss_of(model_folder: Path, batch: dict) -> float:
    model = AutoModelForCausalLM.from_pretrained(str(model_folder)).eval()
    with torch.no_grad():
        return model(**batch, use_cache=False).loss.item()


def test_the_full_finetuner_is_registered():
    from mergeplug.finetuning import Finetuner

    cls = Registry().get("finetuner", "full").load()
    assert issubclass(cls, Finetuner) and cls.__name__ == "FullFinetuner"


def test_training_lowers_the_loss_on_the_domains_data(tiny, trained):
    batch = math_batch(tiny.base)
    assert batch["input_ids"].shape[0] == 4  # four sample rows, none short enough to share a sequence
    before, after = loss_of(tiny.base, batch), loss_of(trained, batch)
    assert after < before - 0.2, (before, after)  # 5.57 -> 5.11 here


def test_output_is_a_checkpoint_that_reloads_and_generates(trained):
    assert sorted(p.name for p in trained.iterdir()) == [
        "config.json", "generation_config.json", "loss.png", "mergeplug_finetune.json", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json", "training_log.jsonl"]
    assert not staging_folder(trained).exists()
    model = AutoModelForCausalLM.from_pretrained(str(trained))
    tokenizer = AutoTokenizer.from_pretrained(str(trained))
    assert model.dtype == torch.float32 and model.config.use_cache  # the base's dtype; cache back on
    prompt = tokenizer("Question: what is 12 plus 30?", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert generated.shape == (1, prompt["input_ids"].shape[1] + 4)


def test_log_has_every_step_with_the_cosine_learning_rate(trained):
    lines = [json.loads(line) for line in (trained / "training_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    assert all(set(line) == {"step", "epoch", "loss", "learning_rate", "time"} for line in lines)
    # the rate each step trained with: cosine from 3e-3 over 8 steps, no warmup
    expected = [3e-3 * 0.5 * (1 + math.cos(math.pi * k / STEPS)) for k in range(STEPS)]
    assert [line["learning_rate"] for line in lines] == pytest.approx(expected, rel=1e-6)
    assert [line["epoch"] for line in lines] == pytest.approx([k / 4 for k in range(1, STEPS + 1)])  # 4 sequences
    assert all(math.isfinite(line["loss"]) and line["loss"] > 0 for line in lines)
    assert lines[-1]["loss"] < lines[0]["loss"]


def test_summary_and_loss_curve(trained, decode_png):
    summary = json.loads((trained / "mergeplug_finetune.json").read_text())
    log = [json.loads(line) for line in (trained / "training_log.jsonl").read_text().splitlines()]
    assert {k: summary[k] for k in ("domains", "finetuner", "steps", "examples", "sequences", "resumed_from")} == {
        "domains": ["math"], "finetuner": "full", "steps": STEPS, "examples": 4, "sequences": 4, "resumed_from": None}
    assert summary["final_loss"] == log[-1]["loss"] and summary["parameters"]["learning_rate"] == 3e-3
    assert summary["parameters"]["gradient_accumulation_steps"] == 1 and summary["parameters"]["epochs"] == 2
    assert set(summary["data"]) == {"math.0", "math.1"}
    width, height, rows = decode_png((trained / "loss.png").read_bytes())
    assert (width, height) == (640, 400) and any(b"\x1f\x77\xb4" in row for row in rows)  # the blue curve


def test_a_bf16_base_gives_a_bf16_specialist(tiny, tmp_path, quick):
    from safetensors import safe_open

    from mergeplug.testing import make_tiny_model

    base = make_tiny_model(tmp_path / "bf16", base=tiny.base, noise=0.0, dtype=torch.bfloat16,
                           tokenizer_folder=tiny.tokenizer)
    out = finetune(str(base), "math", tmp_path / "out", parameters={**quick, "max_steps": 1}, progress=False)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(name).dtype for name in f.keys()} == {torch.bfloat16}


class StopAfterSaving(TrainerCallback):
    """Interrupts the run once checkpoint ``step`` is on disk, as Ctrl-C would."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


class StepsSeen(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def test_an_interrupted_run_resumes_from_its_checkpoint_and_leaves_the_output_alone(tiny, tmp_path, quick):
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("an earlier model")
    parameters = {**quick, "max_steps": 6}
    with pytest.raises(KeyboardInterrupt):
        finetune(str(tiny.base), "math", out, parameters=parameters, force=True, progress=False,
                 callbacks=[StopAfterSaving(4)])
    assert [p.name for p in out.iterdir()] == ["previous.txt"]
    staging = staging_folder(out)
    assert sorted(p.name for p in (staging / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    seen = StepsSeen()
    finetune(str(tiny.base), "math", out, parameters=parameters, force=True, progress=False, callbacks=[seen])
    assert seen.steps == [5, 6]
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log] == [1, 2, 3, 4, 5, 6]
    summary = json.loads((out / "mergeplug_finetune.json").read_text())
    assert (summary["steps"], summary["resumed_from"]) == (6, "checkpoint-4")
    assert not (out / "previous.txt").exists() and not staging.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_changed_setting_does_not_resume_silently_and_restart_starts_over(tiny, tmp_path, quick):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        finetune(str(tiny.base), "math", out, parameters={**quick, "max_steps": 4}, progress=False,
                 callbacks=[StopAfterSaving(2)])
    with pytest.raises(MergeplugError) as info:
        finetune(str(tiny.base), "math", out, parameters={**quick, "max_steps": 4, "learning_rate": 1e-4},
                 progress=False)
    assert str(info.value) == (f"{staging_folder(out)}: holds an interrupted run with other settings (parameters); "
                               "rerun it as it was to resume, or pass --restart to start over")
    seen = StepsSeen()
    finetune(str(tiny.base), "math", out, parameters={**quick, "max_steps": 4, "learning_rate": 1e-4},
             progress=False, resume=False, callbacks=[seen])
    assert seen.steps == [1, 2, 3, 4]
    assert json.loads((out / "mergeplug_finetune.json").read_text())["resumed_from"] is None


def test_two_cpu_processes_train_one_model(tiny, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "mergeplug", "finetune", "--base", str(tiny.base), "--domain", "math", "-o", str(out),
               "--device", "cpu", "--max-steps", "2", "--set", "max_seq_length=256",
               "--set", "gradient_accumulation_steps=1", "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 1  # the main process reports, once
    summary = json.loads((out / "mergeplug_finetune.json").read_text())
    # 4 sequences over 2 processes: 2 per process, one per step, so 2 steps is one epoch
    assert (summary["steps"], summary["epochs"]) == (2, 1.0)
    assert [json.loads(line)["step"] for line in (out / "training_log.jsonl").read_text().splitlines()] == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]
    AutoModelForCausalLM.from_pretrained(str(out))


def test_gradient_checkpointing_trains_the_blocks_behind_frozen_embeddings(tiny, tmp_path, quick, use_registry):
    from safetensors.torch import load_file

    from mergeplug import hookimpl
    from mergeplug.finetuning import Finetuner

    class FrozenEmbeddings(Finetuner):
        def prepare_model(self, model):
            model.get_input_embeddings().weight.requires_grad_(False)
            return model

    class Plugin:
        @hookimpl
        def register_finetuners(self, register):
            register("frozen", FrozenEmbeddings, description="full finetuning, embeddings frozen")

    use_registry(Registry(plugins=[("frozen", Plugin())]))
    out = finetune(str(tiny.base), "math", tmp_path / "out", finetuner="frozen", progress=False,
                   parameters={**quick, "max_steps": 1, "gradient_checkpointing": True})
    before, after = load_file(str(tiny.base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == set(before) - {"model.embed_tokens.weight"}


def test_a_finetuner_without_its_own_save_writes_the_base_dtype(tmp_path):
    """The base class's save (what a third-party finetuner inherits) writes the model in the dtype the base is
    stored in, as the built-in finetuners do: a bf16 base gives a bf16 specialist."""
    import transformers

    from mergeplug.checkpoint import read_safetensors_header
    from mergeplug.finetuning import Finetuner

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    base = tmp_path / "base"
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(base)
    trained = transformers.LlamaForCausalLM(config)  # float32, as training leaves it

    class Tokenizer:
        def save_pretrained(self, folder):
            (Path(folder) / "tokenizer.json").write_text("{}")

    class Plain(Finetuner):
        pass

    out = tmp_path / "out"
    out.mkdir()
    Plain().save(trained, Tokenizer(), out, base=str(base))
    header = read_safetensors_header(out / "model.safetensors")
    assert {entry["dtype"] for name, entry in header.items() if name != "__metadata__"} == {"BF16"}
    assert (out / "tokenizer.json").exists()
