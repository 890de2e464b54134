"""`mergeplug fuse` under torchrun, two CPU processes: the main process records, aligns and merges, both train
each target model data parallel in half a single process's steps; stores and targets are byte for byte a single
process's; an error of the main process before the training (in a step the other waits for, or with every step
cached) stops both with that error, in seconds; a marker left by an earlier launch is not taken for one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from mergeplug.cli import cli

#: 16 texts, no packing, 4 sequences per device and step, one epoch: one process takes 16 / 4 = 4 steps per
#: target, two take 16 / (2 * 4) = 2 (each process reads its half, 8 texts, in 2 batches of 4).
TRAINING = {"learning_rate": 1e-2, "epochs": 1, "warmup_ratio": 0.0, "per_device_batch_size": 4,
            "gradient_accumulation_steps": 1, "max_seq_length": 64, "packing": False, "save_steps": 1000,
            "logging_steps": 1}
TOP_K_ERROR = "error: top_k: 150 is more than the model's 100 vocabulary entries; lower top_k"


def write_run(folder: Path, models, kit, **changes) -> Path:
    texts = kit.count_train[:8] + kit.spell_train[:8]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    recipe = {"kind": "fuse", "name": "tiny fusion", "pivot": str(models.pivot),
              "sources": [str(models.counter), str(models.speller)], "corpus": {"data_files": "corpus.jsonl"},
              "shard_sequences": 10, "device": "cpu", "finetuner": {"name": "fusion", "parameters": TRAINING},
              **changes}
    path = folder / "fuse.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def torchrun(folder: Path, *arguments: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "MERGEPLUG_CACHE": str(folder / "cache")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *arguments]
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=folder, timeout=300)
    return result, time.monotonic() - start


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(models, kit, tmp_path_factory):
    """The same recipe fused by one process (in this one) and by two under torchrun."""
    folder = tmp_path_factory.mktemp("fuse-distributed")
    recipe = write_run(folder, models, kit)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("MERGEPLUG_CACHE", str(folder / "cache"))
        single = CliRunner().invoke(cli, ["fuse", str(recipe), "-o", str(folder / "single"), "--quiet"])
    assert single.exit_code == 0, single.output
    # A marker an earlier launch left behind: the main process removes it, and nobody takes it for its own.
    (folder / "ddp.fuse-work").mkdir()
    (folder / "ddp.fuse-work" / "error.json").write_text(json.dumps(
        {"launch": "an earlier launch", "problems": ["the earlier launch's error"]}))
    result, _ = torchrun(folder, "-m", "mergeplug", "fuse", str(recipe), "-o", str(folder / "ddp"), "--device",
                         "cpu")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return folder, result


def test_two_processes_fuse_one_model_the_main_one_writes_and_reports(runs):
    folder, result = runs
    out = folder / "ddp"
    assert result.stdout.count("wrote ") == 1 and f"wrote {out}" in result.stdout
    assert result.stderr.count("fuse [1/4] record distributions 1/3: pivot (running)") == 1
    assert result.stderr.count("fuse [3/4] finetune 2/2") == 1 and result.stderr.count(f"fuse: wrote {out}") == 1
    assert "2 processes" in result.stderr
    assert "terminate called" not in result.stderr
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.vocab_size == 100
    assert (out / "README.md").is_file()
    # Nothing left beside the output but the work folder; the stale marker is gone, this launch's word is there.
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(("ddp", ".ddp"))) == ["ddp", "ddp.fuse-work"]
    assert not list((folder / "ddp.fuse-work").glob("error*"))
    assert json.loads((folder / "ddp.fuse-work" / "main-steps.json").read_text())["launch"] != "an earlier launch"


def test_each_target_trained_on_both_processes_in_half_the_steps(runs):
    folder, _ = runs
    for work, steps in (("single.fuse-work", 4), ("ddp.fuse-work", 2)):
        summaries = [json.loads((m / "model" / "mergeplug_finetune.json").read_text())
                     for m in sorted((folder / work / "models").iterdir())]
        assert [(s["sequences"], s["steps"], s["epochs"]) for s in summaries] == [(16, steps, 1.0)] * 2, work
        for model in (folder / work / "models").iterdir():
            log = (model / "model" / "training_log.jsonl").read_text().splitlines()
            assert [json.loads(line)["step"] for line in log] == list(range(1, steps + 1))


def test_stores_and_targets_are_byte_for_byte_the_single_process_ones(runs):
    folder, _ = runs
    for step, count in (("stores", 3), ("targets", 2)):
        single, ddp = files(folder / "single.fuse-work" / step), files(folder / "ddp.fuse-work" / step)
        # 16 texts in shards of 10: two shards and a manifest per folder
        assert len(single) == 3 * count and sum(name.endswith("manifest.json") for name in single) == count
        assert ddp == single


def failed_launch(folder: Path, recipe: Path, out: Path, error: str) -> None:
    """torchrun the fuse of ``recipe`` into ``out``, which the main process fails with an error line starting
    with ``error``: both processes print that same line as their one error and stop, the main one first, in
    seconds (no waiting out a timeout)."""
    logs = folder / f"logs-{out.name}"
    result, seconds = torchrun(folder, "--log-dir", str(logs), "--redirects", "3", "-m", "mergeplug", "fuse",
                               str(recipe), "-o", str(out), "--device", "cpu", "--quiet")
    assert result.returncode != 0
    printed = {p.parent.name: p.read_text() for p in logs.rglob("stderr.log")}
    assert sorted(printed) == ["0", "1"]
    lines = {rank: [line for line in text.splitlines() if line.startswith("error:")] for rank, text in printed.items()}
    assert lines["0"] == lines["1"] and len(lines["0"]) == 1 and lines["0"][0].startswith(error), printed
    assert all("Traceback" not in text for text in printed.values()), printed
    # The main process exits first, with the CLI's code for an error: torchrun names it the root cause (then
    # stops the other, which has printed the error and waits for that).
    root_cause = result.stderr.rpartition("Root Cause")[2]
    assert "rank      : 0 (local_rank: 0)" in root_cause and "exitcode  : 2" in root_cause, result.stderr[-3000:]
    work = out.parent / f"{out.name}.fuse-work"
    assert json.loads((work / "error.json").read_text())["problems"] == [lines["0"][0].removeprefix("error: ")]
    reported = sorted(p.name for p in work.glob("error-reported-*.json"))
    assert reported == ["error-reported-0.json", "error-reported-1.json"]
    assert not (work / "main-steps.json").exists()
    assert seconds < 60


def test_an_error_of_the_main_process_in_a_step_the_other_waits_for_stops_both_with_it(models, kit, tmp_path):
    # top_k above the pivot's 100 ids: only the main process finds out, when it runs the pivot (step 1).
    recipe = write_run(tmp_path, models, kit, top_k=150)
    failed_launch(tmp_path, recipe, tmp_path / "out", TOP_K_ERROR)
    assert not (tmp_path / "out").exists()


def test_the_other_process_does_not_leave_while_the_main_one_fails_even_with_every_step_cached(runs):
    # Every step of the earlier launch is reused, so the other process has nothing to wait for but the main
    # process's word; it checks the output, which exists: no --force.
    folder, _ = runs
    out = folder / "ddp"
    before = files(out)
    failed_launch(folder, folder / "fuse.yaml", out, f"error: {out}: already exists; pass --force")
    assert files(out) == before


def test_a_waiting_process_takes_only_its_own_launchs_markers(tmp_path, monkeypatch):
    import atexit

    from mergeplug import MergeplugError, fusion

    launch = {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500",
              "TORCHELASTIC_RUN_ID": "a1b2", "TORCHELASTIC_RESTART_COUNT": "0"}
    for name, value in launch.items():
        monkeypatch.setenv(name, value)
    processes = fusion.Processes.from_environment()
    assert processes == fusion.Processes(rank=1, world_size=2, launch="a1b2/0/node0/29500")
    assert not processes.main and processes.several
    monkeypatch.setattr(fusion, "POLL_SECONDS", 0.01)
    (tmp_path / "error.json").write_text(json.dumps({"launch": "a1b2/0/node0/29501", "problems": ["old"]}))
    looks = iter([None, None, "ready"])
    assert processes.wait_for(lambda: next(looks), tmp_path) == "ready"  # another launch's error: ignored
    (tmp_path / "error.json").write_text(json.dumps({"launch": processes.launch, "problems": ["a", "b"]}))
    try:
        with pytest.raises(MergeplugError) as raised:
            processes.wait_for(lambda: None, tmp_path)
        assert raised.value.problems == ["a", "b"]
    finally:
        atexit.unregister(processes._report_at_exit)  # it would wait for a main process that is not there
    monkeypatch.delenv("RANK")
    with pytest.raises(MergeplugError, match=r"fuse: run it as one process .*\(missing: RANK\)"):
        fusion.Processes.from_environment()
