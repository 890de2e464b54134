"""Domains as data: a YAML file checked against ``schemas/domain.schema.json``.

A domain plugin registers the path of its YAML file as the component's target:
``register("math", HERE / "domain.yaml", description=...)``. Loading it (``Component.load()``) parses and
checks the file, fills in the schema's defaults and resolves ``sample`` and ``few_shot_sample`` paths against
the file's folder. Everything that can be checked without reading a data set is checked here, so a typo in a
prompt format fails when the domain loads, not after a model has run: format strings parse, every field a
benchmark's ``prompt`` names is mapped in its ``columns``, exemplar files hold enough rows, benchmark names are
unique, and training entries map an instruction and a response (or messages). Reading rows is
:mod:`mergeplug.data`'s job.
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import MergeplugError
from .schema import load_schema, parse_yaml, problems, with_defaults

#: Fields a custom ``prompt_format`` template may use.
TEMPLATE_FIELDS = ("instruction", "input", "response")


@dataclass
class Domain:
    name: str
    description: str
    data: dict[str, Any]
    path: Path

    @property
    def role(self) -> str:
        """``capability`` (counted in normalised performance) or ``base_ability`` (used for forgetting)."""
        return self.data.get("role", "capability")

    @property
    def benchmarks(self) -> list[dict]:
        return self.data["benchmarks"]

    @property
    def training(self) -> list[dict]:
        return self.data["training"]

    @property
    def validation(self) -> dict | None:
        return self.data.get("validation")

    def benchmark(self, name: str) -> dict:
        """The benchmark called ``name``; a clear error listing the domain's benchmarks otherwise."""
        for bench in self.benchmarks:
            if bench["name"] == name:
                return bench
        from .errors import unknown_name_message

        known = [b["name"] for b in self.benchmarks]
        raise MergeplugError(f"domain {self.name}: " + unknown_name_message("benchmark", name, known))


def format_fields(template: str, *, source: str) -> list[str]:
    """The root names of the fields a format string uses (``{choices[0]}`` -> ``choices``), in order."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise MergeplugError(
            f"{source}: {template!r} is not a valid format string ({exc}); write {{{{ and }}}} for literal braces"
        ) from None
    fields = []
    for _, field, _, _ in parsed:
        if field is None:
            continue
        root = field.split(".", 1)[0].split("[", 1)[0]
        if not root or root.isdigit():
            raise MergeplugError(f"{source}: {template!r} has a positional field {{{field}}}; name the field ({{question}})")
        fields.append(root)
    return fields


def load_domain(path: str | Path) -> Domain:
    """Read and check a domain file; every problem is reported as ``file: json.path: what is wrong``."""
    import yaml

    path = Path(path)
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise MergeplugError(f"{path}: cannot read the domain file: {exc}") from None
    schema = load_schema("domain")
    lines = problems(data, schema, source=str(path))
    if lines:
        raise MergeplugError(*lines)
    data = with_defaults(data, schema)
    data["benchmarks"] = [with_defaults(b, schema["$defs"]["benchmark"]) for b in data["benchmarks"]]
    data["training"] = [with_defaults(t, schema["$defs"]["dataset"]) for t in data["training"]]
    if "validation" in data:
        data["validation"] = with_defaults(data["validation"], schema["$defs"]["dataset"])
    entries = [
        *((f"benchmarks[{i}] ({b['name']})", b) for i, b in enumerate(data["benchmarks"])),
        *((f"training[{i}]", t) for i, t in enumerate(data["training"])),
        *((("validation", data["validation"]),) if "validation" in data else ()),
    ]
    for where, entry in entries:
        for key in ("sample", "few_shot_sample"):
            if key in entry:
                entry[key] = _resolve_file(path, where, key, entry[key])
        if "dataset" not in entry and "sample" not in entry:
            raise MergeplugError(f"{path}: {where}: give a hub `dataset`, a local `sample`, or both")
    _check_prompt_format(path, data["prompt_format"])
    seen: set[str] = set()
    for i, bench in enumerate(data["benchmarks"]):
        if bench["name"] in seen:
            raise MergeplugError(
                f"{path}: benchmarks[{i}]: a second benchmark named {bench['name']!r}; names must be unique in a domain")
        seen.add(bench["name"])
        _check_benchmark(path, f"benchmarks[{i}] ({bench['name']})", bench)
    for where, entry in entries[len(data["benchmarks"]):]:
        columns = entry["columns"]
        if "messages" not in columns and not {"instruction", "response"} <= set(columns):
            raise MergeplugError(
                f"{path}: {where}.columns: map `instruction` and `response` (and optionally `input`), or `messages`; "
                f"mapped: {', '.join(columns) or '(none)'}"
            )
    return Domain(data["name"], data["description"], data, path)


def _resolve_file(path: Path, where: str, key: str, value: str) -> str:
    resolved = (path.parent / value).resolve()
    if not resolved.is_file():
        raise MergeplugError(f"{path}: {where}.{key}: file {value} does not exist (looked in {resolved.parent})")
    return str(resolved)


def _check_prompt_format(path: Path, prompt_format: str) -> None:
    if prompt_format in ("alpaca", "chat"):
        return
    fields = format_fields(prompt_format, source=f"{path}: prompt_format")
    unknown = sorted(set(fields) - set(TEMPLATE_FIELDS))
    if unknown or fields.count("response") != 1:
        raise MergeplugError(
            f"{path}: prompt_format: a template uses {{instruction}}, optionally {{input}}, and {{response}} exactly "
            f"once (or write alpaca or chat); this one uses {', '.join(fields) or 'no field'}"
        )


def _check_benchmark(path: Path, where: str, bench: dict) -> None:
    mapped = set(bench["columns"]) | {"id"}
    for field in format_fields(bench["prompt"], source=f"{path}: {where}.prompt"):
        if field not in mapped:
            raise MergeplugError(
                f"{path}: {where}.prompt uses {{{field}}}, which `columns` does not map "
                f"(mapped: {', '.join(sorted(mapped))})"
            )
    for key in ("few_shot_prompt", "target"):
        if key in bench:
            format_fields(bench[key], source=f"{path}: {where}.{key}")
    if bench["few_shot"]:
        if "few_shot_sample" not in bench:
            raise MergeplugError(f"{path}: {where}: few_shot is {bench['few_shot']} but no few_shot_sample names the exemplars")
        from .data import read_jsonl

        available = len(read_jsonl(bench["few_shot_sample"]))
        if available < bench["few_shot"]:
            raise MergeplugError(
                f"{path}: {where}: few_shot is {bench['few_shot']} but {bench['few_shot_sample']} holds {available} exemplars"
            )
