"""Domains as data: a YAML file checked against ``schemas/domain.schema.json``.

A domain plugin registers the path of its YAML file as the component's target:
``register("math", HERE / "domain.yaml", description=...)``. Loading it (``Component.load()``) parses and
checks the file and resolves ``sample`` paths against the file's folder.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import MergeplugError
from .schema import load_schema, problems, with_defaults


@dataclass
class Domain:
    name: str
    description: str
    data: dict[str, Any]
    path: Path

    @property
    def benchmarks(self) -> list[dict]:
        return self.data["benchmarks"]

    @property
    def training(self) -> list[dict]:
        return self.data["training"]

    @property
    def validation(self) -> dict | None:
        return self.data.get("validation")


def load_domain(path: str | Path) -> Domain:
    """Read and check a domain file; every problem is reported as ``file: json.path: what is wrong``."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise MergeplugError(f"{path}: cannot read the domain file: {exc}") from None
    schema = load_schema("domain")
    lines = problems(data, schema, source=str(path))
    if lines:
        raise MergeplugError(*lines)
    data = with_defaults(data, schema)
    data["benchmarks"] = [with_defaults(b, schema["$defs"]["benchmark"]) for b in data["benchmarks"]]
    data["training"] = [with_defaults(t, schema["$defs"]["dataset"]) for t in data["training"]]
    for entry in [*data["benchmarks"], *data["training"], *([data["validation"]] if "validation" in data else [])]:
        if "sample" in entry:
            sample = (path.parent / entry["sample"]).resolve()
            if not sample.is_file():
                raise MergeplugError(f"{path}: sample file {entry['sample']} does not exist (looked in {sample.parent})")
            entry["sample"] = str(sample)
        if "dataset" not in entry and "sample" not in entry:
            raise MergeplugError(f"{path}: {entry.get('name', 'a data set')}: give a hub `dataset`, a local `sample`, or both")
    return Domain(data["name"], data["description"], data, path)
