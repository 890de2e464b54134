"""Shared fixtures: an in-process registry built through the real plugin manager."""
from __future__ import annotations

import os

import pytest

from mergeplug import plugins


def pytest_configure(config):
    # Tiny test models gain nothing from several threads, and where the CPU is shared OpenMP's spinning threads
    # made steps of them 10-100x slower. Set before torch is first imported (no conftest imports it).
    os.environ.setdefault("OMP_NUM_THREADS", "1")


class FakeDist:
    def __init__(self, name: str, version: str):
        self.name, self.version = name, version


class FakeEntryPoint:
    """Stands in for importlib.metadata.EntryPoint: a name, a distribution and a load()."""

    def __init__(self, name, load, dist="acme-plugins", version="1.2.3", value=None):
        self.name, self._load = name, load
        self.value = value or f"{name}_module"
        self.dist = FakeDist(dist, version)

    def load(self):
        if isinstance(self._load, BaseException):
            raise self._load
        return self._load


@pytest.fixture
def use_registry():
    """Install a registry as the process-wide one for the duration of a test."""
    previous = plugins.set_registry(None)

    def install(registry):
        plugins.set_registry(registry)
        return registry

    yield install
    plugins.set_registry(previous)
