"""The hooks a mergeplug plugin may implement.

Every plugin is one entry point in the group ``mergeplug``. Each ``register_*`` hook receives a ``register``
callback; call it once per component. The core records which plugin and distribution provided each
component, so a plugin never names itself. Implement only the hooks you need; a hook implementation may
take a subset of the arguments listed here.

``register(name, target, *, description, parameters=None, reference=None, **extra)``:
  name         the component's name, unique within its kind (``ties``, ``math``, ``llama``)
  target       the component itself, or a lazy ``"package.module:Attribute"`` string, imported only when
               the component is used, so ``mergeplug list`` stays fast
  description  one line
  parameters   a JSON Schema (draft 2020-12, an object with ``properties`` and defaults), as a dict or a
               path to a ``.json`` file; None when the component takes no parameters
  reference    an arXiv id (``arXiv:2306.01708``) or URL of the method, where one applies
  extra        kind-specific metadata (a merger's ``model_parameters`` schema, a family's ``model_types``)
"""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("mergeplug")
hookimpl = pluggy.HookimplMarker("mergeplug")


# --- parameter-space and fusion methods -------------------------------------------------------------------
@hookspec
def register_mergers(register):
    """Register merge methods: functions of aligned tensors of a base and N models."""


@hookspec
def register_aligners(register):
    """Register token aligners: map one tokenizer's tokens and distributions onto another's vocabulary."""


@hookspec
def register_finetuners(register):
    """Register finetuners: turn a base checkpoint and a data set into a new checkpoint."""


# --- measuring ---------------------------------------------------------------------------------------------
@hookspec
def register_evaluators(register):
    """Register evaluators: score a model's outputs on benchmark samples."""


@hookspec
def register_judges(register):
    """Register judges: label a model's responses (e.g. refusal or not) for evaluators that need a verdict."""


@hookspec
def register_backends(register):
    """Register model-runner backends: batched generation and log-likelihood scoring (transformers, vLLM)."""


@hookspec
def register_domains(register):
    """Register domains: a capability's training data and benchmarks (data and configuration)."""


# --- models ------------------------------------------------------------------------------------------------
@hookspec
def register_families(register):
    """Register model families: what is special about an architecture (tied embeddings, layer names...)."""


# --- searching and scheduling ------------------------------------------------------------------------------
@hookspec
def register_strategies(register):
    """Register search strategies for ``mergeplug tune``: propose the next coefficients to try from the trials so far."""


@hookspec
def register_executors(register):
    """Register executors for ``mergeplug bench``: run a graph of steps (in-process, worker processes, Ray)."""


# --- the command line --------------------------------------------------------------------------------------
@hookspec
def register_commands(cli):
    """Add subcommands to the ``mergeplug`` click group ``cli``."""


#: The component kinds and the hook through which each is registered.
KIND_HOOKS = {
    "merger": "register_mergers",
    "aligner": "register_aligners",
    "finetuner": "register_finetuners",
    "evaluator": "register_evaluators",
    "judge": "register_judges",
    "backend": "register_backends",
    "domain": "register_domains",
    "family": "register_families",
    "strategy": "register_strategies",
    "executor": "register_executors",
}

#: Every component kind, in the order ``mergeplug list`` shows them.
KINDS = tuple(KIND_HOOKS)
