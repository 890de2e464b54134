"""Every test here runs without the hub: offline environment, fresh warning and reachability caches."""
from __future__ import annotations

import pytest

from mergeplug import data


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(data, "_warned", set())
    monkeypatch.setattr(data, "_hub_reachable", None)
