"""Tests see no GEOLOC_* variables of the shell that runs them: they would point every test world at a
user's real data root or device."""

import pytest


@pytest.fixture(autouse=True)
def _no_geoloc_environment(monkeypatch):
    for var in ("GEOLOC_CONFIG", "GEOLOC_ROOT", "GEOLOC_DEVICE"):
        monkeypatch.delenv(var, raising=False)
