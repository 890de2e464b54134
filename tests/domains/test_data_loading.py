"""mergeplug.data: local files replace the sample, columns map and check, the hub falls back to the sample only
for network failures, and prompts and training examples render exactly."""
from __future__ import annotations

import json

import pytest

from mergeplug import MergeplugError, data
from mergeplug.data import (
    ALPACA_NO_INPUT, ALPACA_WITH_INPUT, is_network_error, load_rows, map_columns, render_prompt,
    render_training_example,
)
from mergeplug.plugins import Registry

GSM8K_ROWS = [
    {"question": "What is 6 times 7?", "answer": "6 * 7 = 42.\n#### 42"},
    {"question": "What is 10 minus 4?", "answer": "10 - 4 = 6.\n#### 6"},
    {"question": "What is 9 plus 1?", "answer": "9 + 1 = 10.\n#### 10"},
]
MAPPED = [{"question": "What is 6 times 7?", "answer": "42", "id": 0},
          {"question": "What is 10 minus 4?", "answer": "6", "id": 1},
          {"question": "What is 9 plus 1?", "answer": "10", "id": 2}]


@pytest.fixture(scope="module")
def gsm8k() -> dict:
    return Registry().get("domain", "math").load().benchmark("gsm8k")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_local_jsonl_replaces_the_sample_and_limit_keeps_the_first_rows(gsm8k, tmp_path, capsys):
    path = write_jsonl(tmp_path / "test.jsonl", GSM8K_ROWS)
    loaded = load_rows(gsm8k, source={"data_files": str(path)})
    assert loaded.rows == MAPPED and loaded.origin == f"files:{path}"
    assert load_rows(gsm8k, source={"data_files": [str(path)]}, limit=2).rows == MAPPED[:2]
    assert load_rows(gsm8k, source={"data_files": str(path), "limit": 1}, limit=2).rows == MAPPED[:1]
    assert "offline sample" not in capsys.readouterr().err


def test_local_parquet_csv_and_json_read_the_same_rows(gsm8k, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(GSM8K_ROWS), tmp_path / "test.parquet")
    assert load_rows(gsm8k, source={"data_files": str(tmp_path / "test.parquet")}).rows == MAPPED
    (tmp_path / "rows.json").write_text(json.dumps({"data": GSM8K_ROWS}), encoding="utf-8")
    assert load_rows(gsm8k, source={"data_files": str(tmp_path / "rows.json")}).rows == MAPPED
    # CSV through pyarrow infers types: an index column arrives as int, as from the hub.
    (tmp_path / "mc.csv").write_text("question,answer\nPick one,2\nPick two,0\n", encoding="utf-8")
    rows = load_rows({"columns": {"question": "question", "answer": "answer"}, "split": "test"},
                     source={"data_files": str(tmp_path / "mc.csv")}).rows
    assert rows == [{"question": "Pick one", "answer": 2, "id": 0}, {"question": "Pick two", "answer": 0, "id": 1}]


def test_data_dir_picks_the_split_and_the_config_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bench = {"name": "m", "config": "fr", "split": "test", "columns": {"q": "instruction"}}
    (tmp_path / "fr").mkdir()
    (tmp_path / "de").mkdir()
    pq.write_table(pa.Table.from_pylist([{"instruction": "Bonjour"}]), tmp_path / "fr" / "test-00000-of-00001.parquet")
    write_jsonl(tmp_path / "fr" / "train.jsonl", [{"instruction": "entraînement"}])
    write_jsonl(tmp_path / "de" / "test.jsonl", [{"instruction": "Hallo"}])
    assert load_rows(bench, source={"data_dir": str(tmp_path)}).rows == [{"q": "Bonjour", "id": 0}]
    assert load_rows(bench, source={"data_dir": str(tmp_path), "split": "train"}).rows == [{"q": "entraînement", "id": 0}]
    with pytest.raises(MergeplugError) as info:
        load_rows(bench, source={"data_dir": str(tmp_path), "split": "validation"}, label="multilingual/m")
    assert str(info.value) == (
        f"multilingual/m: data_dir {tmp_path}: no file for split 'validation' (looked for validation*.jsonl|json|parquet|csv "
        f"or a validation/ folder); found: de/test.jsonl, fr/test-00000-of-00001.parquet, fr/train.jsonl; "
        f"name the file with data_files"
    )


def test_a_missing_column_names_the_file_row_and_columns(gsm8k, tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", [GSM8K_ROWS[0], {"question": "No answer here"}])
    with pytest.raises(MergeplugError) as info:
        load_rows(gsm8k, source={"data_files": str(path)})
    assert str(info.value) == f"{path}: row 1 has no column 'answer' (columns: question)"


def test_a_malformed_jsonl_line_names_the_file_and_line(gsm8k, tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps(GSM8K_ROWS[0]) + "\n\n" + '{"question": "broken",\n', encoding="utf-8")
    with pytest.raises(MergeplugError) as info:
        load_rows(gsm8k, source={"data_files": str(path)})
    assert str(info.value) == (
        f"{path}: line 3: not valid JSON (Expecting property name enclosed in double quotes, column 23); "
        f"each line of a JSONL file is one JSON object"
    )
    path.write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(MergeplugError, match=r"line 1: a JSON list, not an object"):
        load_rows(gsm8k, source={"data_files": str(path)})


def test_bad_local_sources_are_clear_errors(gsm8k, tmp_path):
    with pytest.raises(MergeplugError, match=r"^math/gsm8k: local data file .*nope.jsonl does not exist$"):
        load_rows(gsm8k, source={"data_files": str(tmp_path / "nope.jsonl")}, label="math/gsm8k")
    with pytest.raises(MergeplugError, match=r"unknown key\(s\) path; use data_dir or data_files"):
        load_rows(gsm8k, source={"path": "x"})
    (tmp_path / "rows.txt").write_text("x", encoding="utf-8")
    with pytest.raises(MergeplugError, match=r"rows.txt: unsupported file type .txt; use JSONL, JSON, parquet or CSV"):
        load_rows(gsm8k, source={"data_files": str(tmp_path / "rows.txt")})


def test_column_specs_gather_reach_convert_and_extract():
    rows = [{"q": "Q1", "a": "x", "b": None, "c": "", "d": "y", "label": " 2", "meta": {"aliases": ["P", "Paris"]},
             "messages": [{"content": "hi"}, {"content": "bye"}], "sol": "work\n#### 1,234"}]
    columns = {"choices": ["a", "b", "c", "d"], "answer": {"column": "label", "type": "int"}, "aliases": "meta.aliases",
               "last": "messages.-1.content", "gold": {"column": "sol", "pattern": r"####\s*(.+)$"},
               "harmful": {"value": True}, "id": "q"}
    assert map_columns([("f", rows)], columns) == [{
        "choices": ["x", "y"], "answer": 2, "aliases": ["P", "Paris"], "last": "bye", "gold": "1,234",
        "harmful": True, "id": "Q1"}]
    with pytest.raises(MergeplugError) as info:
        map_columns([("f", [{"sol": "no hashes"}])], {"gold": {"column": "sol", "pattern": r"####\s*(.+)$"}})
    assert str(info.value) == "f: row 0: field 'gold': column 'sol' ('no hashes') does not match the pattern '####\\\\s*(.+)$'"
    with pytest.raises(MergeplugError, match=r"^f: row 0: field 'answer': 'B' is not a valid int$"):
        map_columns([("f", [{"label": "B"}])], {"answer": {"column": "label", "type": "int"}})
    with pytest.raises(MergeplugError, match=r"^g: row 0 has the id 'same' of an earlier row \(f: row 0\)"):
        map_columns([("f", [{"k": "same"}]), ("g", [{"k": "same"}])], {"id": "k"})


def test_offline_uses_the_sample_and_warns_once(gsm8k, capsys):
    first = load_rows(gsm8k, offline=True, label="math/gsm8k")
    second = load_rows(gsm8k, offline=True, label="math/gsm8k")
    assert first.rows == second.rows and len(first.rows) == 5
    assert first.origin == f"sample:{gsm8k['sample']}"
    assert capsys.readouterr().err == "mergeplug: using the offline sample of 5 rows for math/gsm8k (offline)\n"


def test_an_unreachable_hub_falls_back_to_the_sample_without_calling_datasets(gsm8k, monkeypatch, capsys):
    import datasets

    monkeypatch.setattr(data, "_hub_reachable", False)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("load_dataset must not run"))
    loaded = load_rows(gsm8k, offline=False, label="math/gsm8k")
    assert loaded.origin.startswith("sample:") and len(loaded.rows) == 5
    assert capsys.readouterr().err == (
        "mergeplug: using the offline sample of 5 rows for math/gsm8k (the hub could not be reached)\n")


def test_env_offline_skips_the_hub_when_datasets_was_imported_online(gsm8k, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(data, "hub_reachable", lambda: pytest.fail("the hub must not be probed"))
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("load_dataset must not run"))
    assert load_rows(gsm8k, label="math/gsm8k").origin.startswith("sample:")


def test_env_offline_reads_the_datasets_cache_first(gsm8k, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list(GSM8K_ROWS))
    assert load_rows(gsm8k).rows == MAPPED


def test_the_hub_rows_are_mapped_and_limited(gsm8k, monkeypatch):
    import datasets

    calls = []

    def fake_load(path, name=None, split=None, **options):
        calls.append((path, name, split, options))
        return datasets.Dataset.from_list(GSM8K_ROWS)

    monkeypatch.setattr(data, "_hub_reachable", True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    loaded = load_rows(gsm8k, offline=False, limit=2)
    assert loaded.rows == MAPPED[:2] and loaded.origin == "hub:openai/gsm8k:main:test"
    assert calls == [("openai/gsm8k", "main", "test", {})]


def test_a_network_failure_falls_back_but_a_refusal_is_an_error(gsm8k, monkeypatch, capsys):
    import datasets

    monkeypatch.setattr(data, "_hub_reachable", True)

    def unreachable(*a, **k):
        try:
            raise OSError("[Errno -2] Name or service not known")
        except OSError as exc:
            raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)") from exc

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    assert load_rows(gsm8k, offline=False, label="math/gsm8k").origin.startswith("sample:")
    assert "(the hub could not be reached)" in capsys.readouterr().err

    def gated(*a, **k):
        raise ValueError("Dataset 'openai/gsm8k' is a gated dataset on the Hub. You must be authenticated to access it.")

    monkeypatch.setattr(datasets, "load_dataset", gated)
    with pytest.raises(MergeplugError) as info:
        load_rows(gsm8k, offline=False, label="math/gsm8k")
    assert str(info.value) == (
        "math/gsm8k: cannot load hub data set openai/gsm8k (main) split test: ValueError: Dataset 'openai/gsm8k' is "
        "a gated dataset on the Hub. You must be authenticated to access it.; check the id and your access (gated "
        "data sets need `hf auth login`), pass local files or run offline to use the shipped sample"
    )


def test_no_hub_and_no_sample_is_an_error():
    entry = {"dataset": "org/set", "split": "train", "columns": {"instruction": "q", "response": "a"}}
    with pytest.raises(MergeplugError) as info:
        load_rows(entry, offline=True, label="legal/training[0]")
    assert str(info.value) == (
        "legal/training[0]: hub data set org/set (offline) and no offline sample; pass local files (data_files or data_dir)")


def test_network_errors_are_told_from_other_failures():
    class ConnectTimeout(Exception):
        pass

    try:
        try:
            raise ConnectTimeout("timed out")
        except ConnectTimeout as inner:
            raise RuntimeError("download failed") from inner
    except RuntimeError as exc:
        wrapped = exc
    assert is_network_error(wrapped) and is_network_error(ConnectionError("x")) and is_network_error(TimeoutError())
    assert not is_network_error(ValueError("gated")) and not is_network_error(FileNotFoundError("x"))


# --- prompts -------------------------------------------------------------------------------------------------
def test_render_prompt_joins_exemplars_and_prompt_with_the_separator():
    bench = {"name": "t", "prompt": "Q: {q}\nA:", "target": "{a}"}
    shots = [{"q": "1+1", "a": "2"}, {"q": "2+3", "a": "5"}]
    assert render_prompt(bench, {"q": "2+2", "id": 0}, shots) == "Q: 1+1\nA: 2\n\nQ: 2+3\nA: 5\n\nQ: 2+2\nA:"
    bench.update(few_shot_prompt="{q} = {target}", few_shot_separator="\n")
    assert render_prompt(bench, {"q": "2+2", "id": 0}, shots) == "1+1 = 2\n2+3 = 5\nQ: 2+2\nA:"
    assert render_prompt({"name": "t", "prompt": "{options[1]}?"}, {"options": ["x", "y"]}) == "y?"


def test_a_missing_format_field_names_the_benchmark_and_field():
    with pytest.raises(MergeplugError) as info:
        render_prompt({"name": "t", "prompt": "Q: {question}"}, {"q": "2+2", "id": 0})
    assert str(info.value) == "benchmark t: row 0 (prompt): the format needs field 'question', which the row lacks (fields: q, id)"
    with pytest.raises(MergeplugError) as info:
        render_prompt({"name": "t", "prompt": "{q}", "target": "{answer}"}, {"q": "x", "id": 0}, [{"q": "1"}])
    assert str(info.value) == "benchmark t: exemplar 0 (target): the format needs field 'answer', which the row lacks (fields: q)"
    with pytest.raises(MergeplugError, match=r"^benchmark t: row 3 \(prompt\): cannot fill '\{o\[2\]\}': IndexError"):
        render_prompt({"name": "t", "prompt": "{o[2]}"}, {"o": ["a"], "id": 3})


# --- training examples ---------------------------------------------------------------------------------------
def test_alpaca_with_and_without_input_is_mergebenchs_template():
    assert ALPACA_WITH_INPUT.format(instruction="I", input="X") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nI\n\n### Input:\nX\n\n### Response:\n")
    domain = {"name": "d", "prompt_format": "alpaca"}
    assert render_training_example(domain, {"instruction": "Add {x}", "input": "2 and 3", "response": "5"}) == (
        ALPACA_WITH_INPUT.replace("{instruction}", "Add {x}").replace("{input}", "2 and 3"), "5")
    assert render_training_example(domain, {"instruction": "Say hi", "input": None, "response": "hi"}) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSay hi\n\n### Response:\n", "hi")
    assert ALPACA_NO_INPUT.endswith("### Response:\n")


def test_custom_template_chat_and_messages():
    row = {"instruction": "Translate", "input": "chat", "response": "cat"}
    assert render_training_example({"prompt_format": "User: {instruction} [{input}]\nBot: {response}</s>"}, row) == (
        "User: Translate [chat]\nBot: ", "cat</s>")
    assert render_training_example({"prompt_format": "chat"}, row) == ("Translate\n\nchat", "cat")
    messages = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"},
                             {"role": "assistant", "content": "4"}]}
    assert render_training_example({"prompt_format": "chat"}, messages) == ("2+2?", "4")
    with pytest.raises(MergeplugError, match=r"^domain d: row 7 has no response \(map it in `columns`\)$"):
        render_training_example({"name": "d"}, {"instruction": "x", "id": 7})
    with pytest.raises(MergeplugError, match=r"messages need a user turn followed by an assistant turn"):
        render_training_example({"name": "d"}, {"messages": [{"role": "user", "content": "x"}]})
