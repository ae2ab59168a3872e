"""Tests see no GEOLOC_* variables of the shell that runs them: they would point every test world at a
user's real data root or device."""

import pytest


@pytest.fixture(autouse=True)
def _no_geoloc_environment(monkeypatch):
    for var in ("GEOLOC_CONFIG", "GEOLOC_ROOT", "GEOLOC_DEVICE"):
        monkeypatch.delenv(var, raising=False)


def _separate_stderr() -> None:
    """click < 8.2 (what typer 0.15.4, the oldest allowed, may bring) mixes stderr into a CliRunner's stdout
    unless asked: the tests read them as click 8.2+ gives them - stdout and stderr apart, `output` both."""
    import inspect

    from click.testing import CliRunner, Result

    init = CliRunner.__init__
    if "mix_stderr" in inspect.signature(init).parameters:
        def separate(self, *args, mix_stderr: bool = False, **kwargs) -> None:
            init(self, *args, mix_stderr=mix_stderr, **kwargs)

        CliRunner.__init__ = separate
        Result.output = property(lambda r: r.stdout + (r.stderr if r.stderr_bytes is not None else ""))


_separate_stderr()
