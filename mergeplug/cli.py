"""The ``mergeplug`` command line.

Only click and the plugin manager are imported here: ``mergeplug list`` and ``--help`` never load torch,
transformers or datasets. Commands that need them import them inside their function.
"""
from __future__ import annotations

import json
import sys
import textwrap

import click

from . import __version__
from .errors import MergeplugError
from .hookspecs import KINDS
from .plugins import get_registry


class MergeplugGroup(click.Group):
    """Turns :class:`MergeplugError` into one line per problem on stderr and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MergeplugError as exc:
            for line in exc.problems:
                click.echo(f"error: {line}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=MergeplugGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", package_name="mergeplug", message="mergeplug %(version)s")
@click.pass_context
def cli(ctx):
    """mergeplug: build, merge, fuse and evaluate domain-specialised LLMs.

    Every method, domain and model family is a plugin: `mergeplug list` shows what is installed.
    """
    if ctx.invoked_subcommand not in ("list", None):
        get_registry().warn_broken()


# --- list / show -------------------------------------------------------------------------------------------
def _rows(kind: str | None) -> list[dict]:
    registry = get_registry()
    rows = []
    for c in registry.components(kind):
        conflict = registry.conflict(c)
        rows.append({
            "kind": c.kind, "name": c.name, "plugin": c.plugin, "distribution": c.distribution,
            "version": c.version, "description": c.description, "reference": c.reference,
            "status": "broken" if conflict else "ok", "error": conflict,
        })
    if kind is None:
        for p in registry.broken():
            rows.append({
                "kind": None, "name": p.name, "plugin": p.name, "distribution": p.distribution,
                "version": p.version, "description": "", "reference": None, "status": "broken", "error": p.error,
            })
    return rows


@cli.command("list")
@click.option("--kind", type=click.Choice(KINDS),
              help="Only components of this kind.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of objects instead of a table.")
def list_command(kind, as_json):
    """List installed components, grouped by kind, and plugins that failed to load."""
    rows = _rows(kind)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no components installed" + (f" of kind {kind}" if kind else ""))
        return
    headers = ("KIND", "NAME", "PLUGIN", "VERSION", "DESCRIPTION")
    table = [(r["kind"] or "(plugin)", r["name"], r["plugin"], r["version"],
              r["description"] if r["status"] == "ok" else f"BROKEN: {r['error']}") for r in rows]
    widths = [max(len(headers[i]), *(len(str(t[i])) for t in table)) for i in range(4)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    click.echo(fmt.format(*headers))
    previous = None
    for row in table:
        if previous is not None and row[0] != previous:
            click.echo("")
        previous = row[0]
        click.echo(fmt.format(*row).rstrip())
    disabled = [p.name for p in get_registry().plugins.values() if p.status == "disabled"]
    if disabled:
        click.echo(f"\ndisabled by MERGEPLUG_DISABLE: {', '.join(disabled)}")


def _describe_parameters(schema: dict) -> list[str]:
    props = schema.get("properties", {})
    required = set(schema.get("required", []))
    lines = []
    for name, prop in props.items():
        facts = []
        if "type" in prop:
            facts.append(prop["type"] if isinstance(prop["type"], str) else "|".join(prop["type"]))
        if "enum" in prop:
            facts.append("one of " + ", ".join(map(str, prop["enum"])))
        for key, word in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")):
            if key in prop:
                facts.append(f"{word} {prop[key]}")
        if "default" in prop:
            facts.append(f"default {json.dumps(prop['default'])}")
        elif name in required:
            facts.append("required")
        lines.append(f"  {name} ({', '.join(facts)})")
        if prop.get("description"):
            lines += textwrap.wrap(prop["description"], 96, initial_indent="      ", subsequent_indent="      ")
    return lines or ["  (none)"]


@cli.command("show")
@click.argument("name")
@click.option("--kind", type=click.Choice(KINDS),
              help="The component's kind, when several kinds share the name.")
@click.option("--json", "as_json", is_flag=True, help="Print the component and its parameter schema as JSON.")
def show_command(name, kind, as_json):
    """Show one component: description, reference and its parameters with defaults."""
    registry = get_registry()
    if kind:
        found = [registry.get(kind, name)]
    else:
        found = [c for c in registry.components() if c.name == name]
        if not found:
            from .errors import unknown_name_message

            raise MergeplugError(unknown_name_message("component", name, [c.name for c in registry.components()]))
    docs = []
    for c in found:
        doc = {"kind": c.kind, "name": c.name, "description": c.description, "reference": c.reference,
               "plugin": c.plugin, "distribution": c.distribution, "version": c.version,
               "parameters": c.parameters}
        if c.model_parameters is not None:
            doc["model_parameters"] = c.model_parameters
        docs.append(doc)
        if as_json:
            continue
        click.echo(f"{c.kind} {c.name}: {c.description}")
        if c.reference:
            click.echo(f"reference: {c.reference}")
        click.echo(f"plugin: {c.plugin} ({c.distribution} {c.version})")
        conflict = registry.conflict(c)
        if conflict:
            click.echo(f"BROKEN: {conflict}")
        if c.kind == "family":
            click.echo(f"model types: {', '.join(c.extra.get('model_types', [])) or '(none)'}")
            notes = getattr(c.load(), "notes", "")
            if notes:
                click.echo("notes:\n" + "\n".join(textwrap.wrap(notes, 96, initial_indent="  ", subsequent_indent="  ")))
        if c.kind == "domain":
            domain = c.load()
            click.echo(f"role: {domain.role}")
            click.echo("benchmarks:")
            for b in domain.benchmarks:
                source = b.get("dataset") or "(local data / sample only)"
                headline = b.get("metric") or "(the evaluator's first metric)"
                click.echo(f"  {b['name']}: {source} [{b.get('split')}], evaluator {b['evaluator']}, headline {headline}")
            for t in domain.training:
                click.echo(f"training: {t.get('dataset') or '(sample only)'} [{t.get('split')}]")
            continue
        if c.kind == "evaluator":
            from .schema import with_defaults

            evaluator = c.load()(**with_defaults({}, c.parameters))
            click.echo(f"metrics (default parameters; headline first): {', '.join(evaluator.metrics) or '(per sample)'}")
            fields = getattr(evaluator, "required_fields", ())
            click.echo(f"sample fields it reads: {', '.join(fields) or '(the prompt only)'}")
        click.echo("parameters:")
        click.echo("\n".join(_describe_parameters(c.parameters)))
        if c.model_parameters is not None:
            click.echo("per-model parameters (set under models[i].parameters, or globally as a default):")
            click.echo("\n".join(_describe_parameters(c.model_parameters)))
    if as_json:
        click.echo(json.dumps(docs if len(docs) > 1 else docs[0], indent=2))


# --- recipes -----------------------------------------------------------------------------------------------
@cli.command("validate")
@click.argument("recipe", type=click.Path(dir_okay=False))
def validate_command(recipe):
    """Check a recipe (YAML or JSON) and every component it names, without loading any model."""
    from .recipe import load_recipe

    checked = load_recipe(recipe)
    names = ", ".join(f"{c.kind} {c.name}" for c in checked.components.values())
    click.echo(f"{recipe}: a valid {checked.kind} recipe" + (f" ({names})" if names else ""))


# --- contributing ------------------------------------------------------------------------------------------
@cli.command("new-plugin")
@click.argument("kind", type=click.Choice(["merger", "domain", "evaluator", "judge", "backend", "family", "finetuner", "aligner",
                                                    "strategy", "executor"]))
@click.argument("name")
@click.option("-o", "--output", "output", type=click.Path(file_okay=False), default=None,
              help="Folder to create (default: ./mergeplug-NAME).")
def new_plugin_command(kind, name, output):
    """Write a complete, installable plugin package for a new KIND component called NAME."""
    from .scaffold import write_plugin

    folder = write_plugin(kind, name, output)
    click.echo(f"wrote {folder}\nnext: pip install -e {folder} && mergeplug list --kind {kind}")


# --- merging -----------------------------------------------------------------------------------------------
@cli.command("merge")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output", required=True, type=click.Path(), help="Folder to write the merged model to.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists (only once the new model is complete).")
@click.option("--device", default="cpu", show_default=True,
              help="Where to compute: cpu, cuda, cuda:N, mps, or auto (cuda when available).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16", "fp32", "fp16", "bf16"]), default=None,
              help="Output dtype (overrides the recipe's dtype; default: the base model's).")
@click.option("--statistics-batch-tokens", type=click.IntRange(min=1), default=None,
              help="Padded tokens per forward pass when the merger runs the models on data (Fisher, RegMean, "
                   "trained Localize-and-Stitch): speed and memory only, not the result. [default: 4096]")
def merge_command(recipe, output, force, device, dtype, statistics_batch_tokens):
    """Merge the models of RECIPE (mergeplug or mergekit YAML) into OUTPUT, streaming tensor by tensor.

    On the CPU the pruning mergers (ties, dare_*, breadcrumbs*, della*, sce) run as fused C kernels that
    the first such merge compiles with the system's C compiler and caches; MERGEPLUG_NATIVE=0 (or no
    compiler) runs them as torch operations instead, with the same results to float32 rounding. They use
    as many threads as torch does (OMP_NUM_THREADS, else one a core).
    """
    from .engine import merge
    from .recipe import load_recipe

    checked = load_recipe(recipe, kind="merge")
    out = merge(checked, output, force=force, device=device, dtype=dtype,
                statistics_batch_tokens=statistics_batch_tokens)
    click.echo(f"wrote {out}")


# --- evaluating --------------------------------------------------------------------------------------------
def _pairs(values, option):
    out = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key or not rest:
            raise MergeplugError(f"{option} {value!r}: write NAME=VALUE (e.g. {option} math=./specialists/math)")
        out[key] = rest
    return out


@cli.command("evaluate")
@click.argument("models", nargs=-1)
@click.option("--domains", "domains", default=None, help="Comma-separated domain names, or all (the five capability domains).")
@click.option("-o", "--output", "output", default=None, type=click.Path(file_okay=False), help="Results folder.")
@click.option("--recipe", "recipe", default=None, type=click.Path(dir_okay=False), help="An evaluate recipe (options given here override it).")
@click.option("--base", "base", default=None, help="The base model: evaluated too, the reference for forgetting.")
@click.option("--specialist", "specialists", multiple=True, metavar="DOMAIN=MODEL",
              help="A domain's specialist: evaluated too, the reference for normalised performance. Repeatable.")
@click.option("--backend", default=None, help="Model runner backend (`mergeplug list --kind backend`). [default: transformers]")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Sequences per forward pass. [default: 16]")
@click.option("--device", default=None, help="auto, cpu, cuda, cuda:N or mps. [default: auto]")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16"]), default=None,
              help="Weights dtype. [default: auto: bf16 on a GPU that supports it, else float32]")
@click.option("--chat-template/--no-chat-template", "chat_template", default=None,
              help="Wrap prompts in the model's chat template. [default: off, as MergeBench evaluates]")
@click.option("--max-length", type=click.IntRange(min=1), default=None, help="Longest prompt + output in tokens.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most this many samples per benchmark.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
              help="Cap every benchmark's generation length (quick smoke runs; scores differ from the protocol's).")
@click.option("--data", "data", multiple=True, metavar="BENCHMARK=PATH",
              help="Local data (JSONL/JSON/parquet/CSV file or folder) for a benchmark (gsm8k or math.gsm8k). Repeatable.")
@click.option("--offline", is_flag=True, default=None, help="Never try the hub: local data or the shipped samples.")
@click.option("--trust-remote-code", is_flag=True, default=None, help="Allow a model's own code to run.")
@click.option("--quiet", is_flag=True, help="No progress output.")
def evaluate_command(models, domains, output, recipe, base, specialists, backend, batch_size, device, dtype,
                     chat_template, max_length, limit, max_new_tokens, data, offline, trust_remote_code, quiet):
    """Evaluate MODELS on domains' benchmarks: per-sample records, metrics with standard errors, and a table.

    A rerun into the same folder skips every sample already scored.
    """
    from pathlib import Path

    from .evaluate_models import EvaluateOptions, evaluate_models
    from .recipe import load_recipe

    conf: dict = {}
    if recipe:
        conf = dict(load_recipe(recipe, kind="evaluate").data)
    given = {"models": list(models) or None, "domains": domains.split(",") if domains else None, "base_model": base,
             "backend": backend, "batch_size": batch_size, "device": device, "dtype": dtype,
             "chat_template": chat_template, "max_length": max_length, "limit": limit, "offline": offline,
             "trust_remote_code": trust_remote_code}
    conf.update({k: v for k, v in given.items() if v is not None})
    conf.setdefault("specialists", {}).update(_pairs(specialists, "--specialist"))
    sources = dict(conf.get("data") or {})
    for name, path in _pairs(data, "--data").items():
        sources[name] = {"data_dir": path} if Path(path).is_dir() else {"data_files": path}
    if not conf.get("models"):
        raise MergeplugError("evaluate: name at least one MODEL (a model folder or hub id), or a --recipe with `models`")
    if not conf.get("domains"):
        raise MergeplugError("evaluate: say which --domains (e.g. --domains math,coding or --domains all)")
    if not output:
        raise MergeplugError("evaluate: give a results folder with -o/--output")
    registry = get_registry()
    backend_name = conf.get("backend", "transformers")
    registry.get("backend", backend_name)  # an unknown backend fails here, before any data is read
    backend_options = {"device": conf.get("device", "auto"), "dtype": conf.get("dtype", "auto"),
                       "batch_size": conf.get("batch_size", 16), "chat_template": conf.get("chat_template", False),
                       "max_length": conf.get("max_length"), "trust_remote_code": conf.get("trust_remote_code", False)}
    options = EvaluateOptions(backend=backend_name, backend_options=backend_options, limit=conf.get("limit"),
                              data=sources, offline=conf.get("offline"), progress=not quiet,
                              max_new_tokens=max_new_tokens)
    domain_names = conf["domains"]
    summary = evaluate_models(conf["models"], domain_names if domain_names != ["all"] else "all", output, options,
                              base=conf.get("base_model"), specialists=conf.get("specialists"))
    from .evaluate_models import format_table

    click.echo(format_table(summary))
    click.echo(f"results in {output}")


# --- finetuning --------------------------------------------------------------------------------------------
def _typed_setting(text: str, prop: dict | None):
    """``--set key=text`` as the parameter's schema types it (``2e-5`` a number, ``true`` a boolean, ``null``);
    an unknown key or a value of the wrong type is the schema check's error."""
    if prop is None:
        return text
    kinds = prop.get("type", [])
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    enum = prop.get("enum", [])
    lowered = text.strip().lower()
    if lowered in ("null", "none") and ("null" in kinds or None in enum):
        return None
    if lowered in ("true", "false") and ("boolean" in kinds or True in enum):
        return lowered == "true"
    for kind, convert in (("integer", int), ("number", float)):
        if kind in kinds:
            try:
                return convert(text)
            except ValueError:
                pass
    if "array" in kinds or "object" in kinds:
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


@cli.command("finetune")
@click.option("--base", "base", default=None, help="The base model: a Hugging Face model folder or hub id.")
@click.option("--domain", "domains", default=None,
              help="Domain to train on; a comma-separated list or all trains one model on their mixture.")
@click.option("-o", "--output", "output", default=None, type=click.Path(file_okay=False),
              help="Folder to write the model to.")
@click.option("--recipe", "recipe", default=None, type=click.Path(dir_okay=False),
              help="A finetune recipe (options given here override it).")
@click.option("--finetuner", default=None, help="Finetuner plugin (`mergeplug list --kind finetuner`). [default: full]")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="A finetuner parameter (`mergeplug show full`), e.g. --set learning_rate=1e-5. Repeatable.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="Stop after N optimiser steps (smoke runs).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Read at most N rows of each training set.")
@click.option("--data", "data", multiple=True, metavar="DOMAIN=PATH",
              help="Local training data (JSONL/JSON/parquet/CSV file or folder) for a domain, or DOMAIN.N=PATH for its "
                   "N-th training set. Repeatable.")
@click.option("--offline", is_flag=True, default=None, help="Never try the hub: local data or the shipped samples.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists (only once the new model is complete).")
@click.option("--restart", is_flag=True, help="Discard an interrupted run's checkpoints instead of resuming from them.")
@click.option("--device", default=None,
              help="auto, cpu, cuda or mps (several GPUs: torchrun or accelerate launch). [default: auto]")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def finetune_command(base, domains, output, recipe, finetuner, settings, max_steps, limit, data, offline, force,
                     restart, device, quiet):
    """Finetune a base model on a domain's training data (or a mixture of domains) into OUTPUT.

    Loss on response tokens only, packed sequences, MergeBench's recipe by default. Training happens in
    .OUTPUT.partial/ beside OUTPUT; rerunning an interrupted command resumes from its last checkpoint. Runs
    unchanged under torchrun / accelerate launch on several GPUs or nodes.
    """
    import os
    from pathlib import Path

    from .finetuning import finetune
    from .recipe import load_recipe

    conf: dict = {}
    if recipe:
        conf = dict(load_recipe(recipe, kind="finetune").data)
    given = {"base_model": base, "domains": domains.split(",") if domains else None, "finetuner": finetuner,
             "limit": limit, "offline": offline, "device": device}
    conf.update({k: v for k, v in given.items() if v is not None})
    if not conf.get("base_model"):
        raise MergeplugError("finetune: name the base model with --base (a model folder or hub id), or give a --recipe")
    if not conf.get("domains"):
        raise MergeplugError("finetune: say which --domain to train on (math, a list math,coding, or all)")
    if not output:
        raise MergeplugError("finetune: give the output folder with -o/--output")
    name = conf.get("finetuner", "full")
    from .finetuning import parameter_schema

    schema = parameter_schema(get_registry().get("finetuner", name))
    parameters = dict(conf.get("parameters") or {})
    for setting in settings:
        key, sep, text = setting.partition("=")
        if not sep or not key.strip():
            raise MergeplugError(f"--set {setting!r}: write KEY=VALUE (e.g. --set learning_rate=1e-5)")
        key = key.strip()
        parameters[key] = _typed_setting(text.strip(), schema.get("properties", {}).get(key))
    if max_steps is not None:
        parameters["max_steps"] = max_steps
    sources = dict(conf.get("data") or {})
    for key, path in _pairs(data, "--data").items():
        sources[key] = {"data_dir": path} if Path(path).is_dir() else {"data_files": path}
    domain_names = conf["domains"]
    out = finetune(conf["base_model"], "all" if domain_names == ["all"] else domain_names, output, finetuner=name,
                   parameters=parameters, data=sources, force=force, resume=not restart, limit=conf.get("limit"),
                   device=conf.get("device", "auto"), progress=not quiet, offline=conf.get("offline"))
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"wrote {out}")


# --- commands defined in their own modules (each imports only click until it runs) -------------------------
from .bench_command import bench_command  # noqa: E402
from .fuse_command import fuse_command  # noqa: E402
from .report_command import report_command  # noqa: E402
from .tune_command import tune_command  # noqa: E402

for _command in (tune_command, fuse_command, bench_command, report_command):
    cli.add_command(_command)


def main(argv=None):
    """Console entry point: lets plugins add commands, then runs the group."""
    try:
        get_registry().add_commands(cli)
    except MergeplugError as exc:  # pragma: no cover - the registry itself records plugin failures
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    return cli.main(args=argv, prog_name="mergeplug")


if __name__ == "__main__":  # pragma: no cover
    main()
