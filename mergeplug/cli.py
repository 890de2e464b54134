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
@click.argument("kind", type=click.Choice(["merger", "domain", "evaluator", "family", "finetuner", "aligner"]))
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
def merge_command(recipe, output, force, device, dtype):
    """Merge the models of RECIPE (mergeplug or mergekit YAML) into OUTPUT, streaming tensor by tensor."""
    from .engine import merge
    from .recipe import load_recipe

    checked = load_recipe(recipe, kind="merge")
    out = merge(checked, output, force=force, device=device, dtype=dtype)
    click.echo(f"wrote {out}")


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
