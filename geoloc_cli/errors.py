"""User-facing errors. The CLI turns any GeolocError into one line on stderr and an exit code.

Use these for things the user can fix (bad config, missing file, malformed input); use `assert` for
invariants of our own code, which should crash loudly with a traceback.
"""


class GeolocError(Exception):
    """Something the user can fix. The message is shown as-is, without a traceback."""

    exit_code = 1


class ConfigError(GeolocError):
    """Bad configuration: unknown key, wrong type or value. Exit code 2, like a usage error."""

    exit_code = 2


class InputError(GeolocError):
    """A missing, unreadable or malformed input file; the message names the file (and row/column)."""

    exit_code = 1


def require(*modules: str, extra: str = "train") -> None:
    """Fail with an install hint when an optional dependency (e.g. torch on a predict-only install) is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise GeolocError(f"this needs {', '.join(missing)}, which is not installed: pip install 'geoloc[{extra}]'")
