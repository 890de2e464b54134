"""The plugin manager: provenance, broken plugins, duplicates, conflicts, disabling, lazy targets."""
from __future__ import annotations

import io

import pytest

from mergeplug import MergeplugError, hookimpl
from mergeplug.errors import ComponentConflictError, UnknownComponentError
from mergeplug.plugins import Registry
from tests.conftest import FakeEntryPoint

SCHEMA = {
    "type": "object", "additionalProperties": False,
    "properties": {"density": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.2, "description": "kept fraction"}},
}


def merger_plugin(*names, target="math:sqrt"):
    class Plugin:
        @hookimpl
        def register_mergers(self, register):
            for name in names:
                register(name, target, description=f"{name} merger", parameters=SCHEMA, reference="arXiv:2306.01708")
    return Plugin()


def test_component_carries_its_provenance_and_schema():
    registry = Registry(entry_points=[FakeEntryPoint("acme", merger_plugin("ties"))])
    c = registry.get("merger", "ties")
    assert (c.kind, c.name, c.plugin, c.distribution, c.version) == ("merger", "ties", "acme", "acme-plugins", "1.2.3")
    assert c.description == "ties merger"
    assert c.reference == "arXiv:2306.01708"
    assert c.parameters["properties"]["density"]["default"] == 0.2
    import math

    assert c.load() is math.sqrt  # lazy "module:attr" target


def test_broken_import_is_recorded_and_others_still_load():
    registry = Registry(entry_points=[
        FakeEntryPoint("bad", ImportError("No module named 'missing_dep'")),
        FakeEntryPoint("good", merger_plugin("linear")),
    ])
    assert registry.plugins["bad"].status == "broken"
    assert registry.plugins["bad"].error == "ImportError: No module named 'missing_dep'"
    assert registry.names("merger") == ["linear"]


def test_hook_that_raises_breaks_only_its_plugin_and_drops_its_components():
    class Raises:
        @hookimpl
        def register_mergers(self, register):
            register("half", "x:y", description="registered before the failure")
            raise RuntimeError("boom")

    registry = Registry(entry_points=[FakeEntryPoint("raises", Raises()), FakeEntryPoint("ok", merger_plugin("ok"))])
    assert registry.plugins["raises"].status == "broken"
    assert "register_mergers raised RuntimeError: boom" in registry.plugins["raises"].error
    assert registry.names("merger") == ["ok"]


def test_unknown_hook_marks_plugin_broken():
    class Typo:
        @hookimpl
        def register_merger(self, register):  # missing "s"
            pass

    registry = Registry(entry_points=[FakeEntryPoint("typo", Typo())])
    assert registry.plugins["typo"].status == "broken"
    assert "unknown hook 'register_merger'" in registry.plugins["typo"].error


def test_hook_with_wrong_argument_marks_plugin_broken():
    class WrongArg:
        @hookimpl
        def register_mergers(self, add):
            pass

    registry = Registry(entry_points=[FakeEntryPoint("wrong", WrongArg())])
    assert registry.plugins["wrong"].status == "broken"
    assert "add" in registry.plugins["wrong"].error


def test_duplicate_plugin_name_is_reported_not_dropped_silently():
    registry = Registry(entry_points=[
        FakeEntryPoint("dup", merger_plugin("a"), dist="first-dist"),
        FakeEntryPoint("dup", merger_plugin("b"), dist="second-dist"),
    ])
    second = registry.plugins["dup (second-dist)"]
    assert second.status == "broken"
    assert "already used by first-dist 1.2.3" in second.error
    assert registry.names("merger") == ["a"]


def test_same_component_from_two_distributions_is_a_clear_error_naming_both():
    registry = Registry(entry_points=[
        FakeEntryPoint("one", merger_plugin("ties"), dist="mergeplug", version="0.1.0"),
        FakeEntryPoint("two", merger_plugin("ties"), dist="mergeplug-extra", version="2.0"),
    ])
    with pytest.raises(ComponentConflictError) as info:
        registry.get("merger", "ties")
    message = str(info.value)
    assert "mergeplug 0.1.0 (plugin one)" in message and "mergeplug-extra 2.0 (plugin two)" in message
    assert "MERGEPLUG_DISABLE=two" in message


def test_disable_by_name_from_environment(monkeypatch):
    monkeypatch.setenv("MERGEPLUG_DISABLE", " two ,other")
    registry = Registry(entry_points=[
        FakeEntryPoint("one", merger_plugin("ties")), FakeEntryPoint("two", merger_plugin("ties")),
    ])
    assert registry.plugins["two"].status == "disabled"
    assert registry.get("merger", "ties").plugin == "one"


def test_unknown_name_lists_known_names_closest_first():
    registry = Registry(entry_points=[FakeEntryPoint("acme", merger_plugin("ties", "dare_ties", "linear"))])
    with pytest.raises(UnknownComponentError) as info:
        registry.get("merger", "tie")
    assert str(info.value) == "unknown merger 'tie'; known: ties, dare_ties, linear"


def test_lazy_target_that_fails_to_import_names_the_plugin():
    registry = Registry(entry_points=[FakeEntryPoint("acme", merger_plugin("x", target="no_such_module_zz:Thing"))])
    with pytest.raises(MergeplugError) as info:
        registry.get("merger", "x").load()
    assert str(info.value).startswith("merger 'x' (plugin acme, acme-plugins 1.2.3): cannot load no_such_module_zz:Thing")


def test_commands_hook_adds_subcommands_and_a_raising_one_is_recorded():
    import click

    class Cmd:
        @hookimpl
        def register_commands(self, cli):
            @cli.command()
            def hello():
                click.echo("hi")

    class BadCmd:
        @hookimpl
        def register_commands(self, cli):
            raise ValueError("nope")

    group = click.Group()
    registry = Registry(entry_points=[FakeEntryPoint("cmd", Cmd()), FakeEntryPoint("badcmd", BadCmd())])
    registry.add_commands(group)
    assert "hello" in group.commands
    assert registry.plugins["badcmd"].status == "broken"


def test_broken_plugins_are_warned_about_once():
    registry = Registry(entry_points=[FakeEntryPoint("bad", ImportError("x"))])
    out = io.StringIO()
    registry.warn_broken(out)
    registry.warn_broken(out)
    assert out.getvalue().count("plugin bad") == 1


def test_in_process_plugins_go_through_the_same_path():
    registry = Registry(entry_points=[], plugins=[("inline", merger_plugin("inline_merge"))])
    c = registry.get("merger", "inline_merge")
    assert (c.plugin, c.distribution) == ("inline", "<in-process>")


def test_two_families_claiming_one_model_type_is_a_conflict():
    from mergeplug.families import ModelFamily, family_for

    def family_plugin(name):
        class Plugin:
            @hookimpl
            def register_families(self, register):
                register(name, ModelFamily(), description=name, model_types=["llama"])
        return Plugin()

    registry = Registry(entry_points=[FakeEntryPoint("one", family_plugin("llama")),
                                      FakeEntryPoint("two", family_plugin("llama_fast"), dist="fast-dist")])
    with pytest.raises(ComponentConflictError) as info:
        family_for({"model_type": "llama"}, registry, source="models[0]")
    assert "model_type 'llama' is claimed by families llama from acme-plugins 1.2.3 (plugin one) and llama_fast" in str(info.value)
