"""The plugin manager: loads every entry point of the group ``mergeplug`` and collects their components.

Built-in plugins and third-party ones go through the same path. Unlike pluggy's own entry-point loader, each
entry point is loaded in its own ``try``: a plugin that fails to import, registers an unknown hook, or raises
inside a hook is recorded as broken (``mergeplug list`` shows why) and the others load normally. A second
entry point with a name already in use is reported, never dropped silently.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
from dataclasses import dataclass, field
from functools import cached_property
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

import pluggy

from . import hookspecs
from .errors import ComponentConflictError, MergeplugError, UnknownComponentError, unknown_name_message

ENTRY_POINT_GROUP = "mergeplug"
DISABLE_ENV = "MERGEPLUG_DISABLE"
IN_PROCESS = "<in-process>"


@dataclass
class PluginRecord:
    """One plugin (one entry point, or one object registered in-process) and how its loading went."""

    name: str
    distribution: str
    version: str
    status: str = "ok"  # ok | broken | disabled
    error: str | None = None
    module: Any = None


@dataclass
class Component:
    """A merger, aligner, finetuner, evaluator, domain or family that a plugin registered."""

    kind: str
    name: str
    target: Any
    description: str
    plugin: str
    distribution: str
    version: str
    reference: str | None = None
    parameters_source: dict | str | Path | None = None
    extra: dict = field(default_factory=dict)

    @cached_property
    def parameters(self) -> dict:
        """The JSON Schema of the component's parameters (an empty object schema when it takes none)."""
        return _load_schema(self.parameters_source, self)

    @cached_property
    def model_parameters(self) -> dict | None:
        """A merger's per-model parameter schema (``weight``, ``density``...), if it declares one."""
        source = self.extra.get("model_parameters")
        return None if source is None else _load_schema(source, self)

    def load(self) -> Any:
        """The component object, importing a lazy ``"module:attr"`` target on first use.

        A ``Path`` target is a data file (a domain's YAML), parsed and checked on first use.
        """
        if isinstance(self.target, Path):
            from .domains import load_domain

            if self.kind != "domain":
                raise MergeplugError(f"{self.describe()}: only domains may be registered as a data file")
            self.target = load_domain(self.target)
            return self.target
        if not isinstance(self.target, str):
            return self.target
        module_name, _, attr = self.target.partition(":")
        try:
            obj = importlib.import_module(module_name)
            for part in filter(None, attr.split(".")):
                obj = getattr(obj, part)
        except Exception as exc:  # noqa: BLE001 - any import failure is the plugin's, reported as such
            raise MergeplugError(
                f"{self.kind} {self.name!r} (plugin {self.plugin}, {self.distribution} {self.version}): "
                f"cannot load {self.target}: {type(exc).__name__}: {exc}"
            ) from exc
        self.target = obj
        return obj

    def describe(self) -> str:
        return f"{self.kind} {self.name!r} from plugin {self.plugin} ({self.distribution} {self.version})"


def _load_schema(source: dict | str | Path | None, component: Component) -> dict:
    if source is None:
        return {"type": "object", "properties": {}, "additionalProperties": False}
    if isinstance(source, dict):
        return source
    try:
        return json.loads(Path(source).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MergeplugError(f"{component.describe()}: cannot read its parameter schema {source}: {exc}") from exc


def disabled_from_env() -> set[str]:
    return {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}


class Registry:
    """Every loaded plugin and every component, by kind and name.

    ``entry_points`` defaults to the installed ones in group ``mergeplug``; ``plugins`` adds in-process plugin
    objects as ``(name, object)`` pairs (tests, notebooks); ``disabled`` defaults to ``$MERGEPLUG_DISABLE``.
    """

    def __init__(
        self,
        entry_points: Iterable[metadata.EntryPoint] | None = None,
        plugins: Iterable[tuple[str, Any]] = (),
        disabled: Iterable[str] | None = None,
    ):
        self.pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginRecord] = {}
        self._components: dict[str, dict[str, list[Component]]] = {k: {} for k in hookspecs.KIND_HOOKS}
        self._warned = False
        self.disabled = set(disabled_from_env() if disabled is None else disabled)
        if entry_points is None:
            entry_points = metadata.entry_points(group=ENTRY_POINT_GROUP)
        seen: set[tuple[str, str, str]] = set()
        for ep in entry_points:
            dist = ep.dist.name if ep.dist is not None else "unknown"
            key = (ep.name, ep.value, dist)
            if key in seen:  # the same distribution found twice on sys.path
                continue
            seen.add(key)
            version = ep.dist.version if ep.dist is not None else "unknown"
            self._add(ep.name, dist, version, ep.load)
        for name, obj in plugins:
            self._add(name, IN_PROCESS, "", lambda obj=obj: obj)
        self._drop_unknown_hooks()
        for kind, hook in hookspecs.KIND_HOOKS.items():
            self._collect(kind, hook)

    # --- loading -----------------------------------------------------------------------------------------
    def _add(self, name: str, dist: str, version: str, load) -> None:
        if name in self.plugins:
            first = self.plugins[name]
            self.plugins[f"{name} ({dist})"] = PluginRecord(
                name, dist, version, "broken",
                f"plugin name {name!r} is already used by {first.distribution} {first.version}; "
                f"uninstall one of the two distributions",
            )
            return
        record = PluginRecord(name, dist, version)
        self.plugins[name] = record
        if name in self.disabled:
            record.status = "disabled"
            return
        try:
            module = load()
            self.pm.register(module, name=name)
            record.module = module
        except Exception as exc:  # noqa: BLE001 - a broken plugin must never take the others down
            record.status, record.error = "broken", f"{type(exc).__name__}: {exc}"

    def _drop_unknown_hooks(self) -> None:
        # pluggy's check_pending() raises on the first offender; attribute each one to its plugin instead.
        for hook_name, caller in vars(self.pm.hook).items():
            if hook_name.startswith("_") or caller.has_spec():
                continue
            for impl in caller.get_hookimpls():
                if impl.optionalhook:
                    continue
                self._break(impl.plugin_name, f"implements unknown hook {hook_name!r} (see mergeplug.hookspecs)")

    def _break(self, plugin_name: str, error: str) -> None:
        record = self.plugins[plugin_name]
        record.status, record.error = "broken", error
        if self.pm.get_plugin(plugin_name) is not None:
            self.pm.unregister(name=plugin_name)
        for by_name in self._components.values():
            for name in list(by_name):
                by_name[name] = [c for c in by_name[name] if c.plugin != plugin_name]
                if not by_name[name]:
                    del by_name[name]

    def _collect(self, kind: str, hook: str) -> None:
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            record = self.plugins[impl.plugin_name]
            if record.status != "ok":
                continue

            def register(name, target, *, description, parameters=None, reference=None, _r=record, **extra):
                component = Component(
                    kind, str(name), target, str(description).strip(), _r.name, _r.distribution, _r.version,
                    reference, parameters, extra,
                )
                self._components[kind].setdefault(component.name, []).append(component)

            try:
                impl.function(**{arg: register for arg in impl.argnames})
            except Exception as exc:  # noqa: BLE001
                self._break(record.name, f"{hook} raised {type(exc).__name__}: {exc}")

    def add_commands(self, cli) -> None:
        """Let plugins add subcommands to the click group ``cli``; a hook that raises marks its plugin broken."""
        for impl in self.pm.hook.register_commands.get_hookimpls():
            try:
                impl.function(**{arg: cli for arg in impl.argnames})
            except Exception as exc:  # noqa: BLE001
                self._break(impl.plugin_name, f"register_commands raised {type(exc).__name__}: {exc}")

    # --- queries -----------------------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        return sorted(self._components[kind])

    def components(self, kind: str | None = None) -> list[Component]:
        kinds = [kind] if kind else list(self._components)
        return [c for k in kinds for name in sorted(self._components[k]) for c in self._components[k][name]]

    def conflict(self, component: Component) -> str | None:
        """Why ``component`` cannot be used because another plugin registered the same kind and name."""
        rivals = self._components[component.kind].get(component.name, [])
        if len(rivals) < 2:
            return None
        who = " and ".join(f"{c.distribution} {c.version} (plugin {c.plugin})" for c in rivals)
        return (
            f"{component.kind} {component.name!r} is registered by both {who}; keep one: uninstall the other "
            f"or disable its plugin with {DISABLE_ENV}={rivals[-1].plugin}"
        )

    def get(self, kind: str, name: str) -> Component:
        """The one component of ``kind`` called ``name``; a clear error when it is unknown or ambiguous."""
        if kind not in self._components:
            raise MergeplugError(unknown_name_message("component kind", kind, self._components))
        found = self._components[kind].get(name)
        if not found:
            raise UnknownComponentError(unknown_name_message(kind, name, self._components[kind]))
        problem = self.conflict(found[0])
        if problem:
            raise ComponentConflictError(problem)
        return found[0]

    def broken(self) -> list[PluginRecord]:
        return [p for p in self.plugins.values() if p.status == "broken"]

    def warn_broken(self, stream=None) -> None:
        """Say once per registry, on stderr, which plugins could not be loaded."""
        if self._warned:
            return
        self._warned = True
        for record in self.broken():
            print(
                f"mergeplug: warning: plugin {record.name} ({record.distribution}) is broken and was skipped: "
                f"{record.error} (see `mergeplug list`)",
                file=stream or sys.stderr,
            )


_registry: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry of installed plugins, loaded on first use."""
    global _registry
    if _registry is None:
        _registry = Registry()
    return _registry


def set_registry(registry: Registry | None) -> Registry | None:
    """Replace the process-wide registry (tests); returns the previous one. ``None`` reloads on next use."""
    global _registry
    previous, _registry = _registry, registry
    return previous
