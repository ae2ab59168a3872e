"""User-facing errors. The CLI turns any GeolocError into one line on stderr and an exit code.

Use these for things the user can fix (bad config, missing file, malformed input); use `assert` for
invariants of our own code, which should crash loudly with a traceback.
"""

import errno


class GeolocError(Exception):
    """Something the user can fix. The message is shown as-is, without a traceback."""

    exit_code = 1


class ConfigError(GeolocError):
    """Bad configuration: unknown key, wrong type or value. Exit code 2, like a usage error."""

    exit_code = 2


class InputError(GeolocError):
    """A missing, unreadable or malformed input file; the message names the file (and row/column)."""

    exit_code = 1


class StorageError(GeolocError, OSError):
    """The operating system refused a file operation (disk full, read-only, permission, too many open
    files). Also an OSError, so code that handles OSError around a write keeps doing so."""

    exit_code = 1

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.errno = code  # str() stays the message alone (OSError(code, text) would prefix "[Errno n]")


class LockedError(GeolocError):
    """Another process is writing the same target (it holds the target's lock)."""

    exit_code = 1


# The user errors by name: a worker process sends (name, message) back and its parent raises the same error
# (same message and exit code) as if it had happened there.
USER_ERRORS: dict[str, type[GeolocError]] = {
    c.__name__: c for c in (GeolocError, ConfigError, InputError, StorageError, LockedError)}


def worker_error(e: BaseException) -> tuple[str, str] | None:
    """(name, message) of an error a worker process should report as a user error (None: a bug)."""
    if isinstance(e, GeolocError):
        return type(e).__name__, str(e)
    if isinstance(e, OSError):  # disk full, too many open files...: a message, not a traceback
        return "StorageError", str(storage_error(e))
    return None


# The causes a user can act on, in words; any other errno falls back to its strerror.
_CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a path component is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.EMFILE: "too many open files (raise `ulimit -n`)",
    errno.ENFILE: "too many open files in the system",
    errno.ENOENT: "no such file or folder",
}


def os_error_message(e: OSError, action: str | None = None) -> str:
    """One line naming the cause, the operation and the path: "no space left on device while writing
    runs/x/resume.pt". `action` ("writing PATH") wins over the path the error itself carries."""
    # a re-raised worker error (torch's DataLoader) carries a traceback: its last line says what happened
    text = e.strerror.lower() if e.strerror else (str(e).strip() or type(e).__name__).splitlines()[-1]
    cause = _CAUSES.get(e.errno or 0) or text
    if action is None:
        verb = "writing" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) else "accessing"
        action = f"{verb} {e.filename}" if e.filename is not None else None
    return f"{cause} while {action}" if action else cause


def install_hint(extra: str) -> str:
    """The command that installs one of geoloc's extras (pyproject.toml: fetch, plots, train, predict, metrics)."""
    return f"pip install 'geoloc[{extra}]'"


def require(*modules: str, extra: str = "train") -> None:
    """Fail with an install hint when an optional dependency (e.g. torch on a predict-only install) is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise GeolocError(f"this needs {', '.join(missing)}, which is not installed: {install_hint(extra)}")


def storage_error(e: OSError, action: str | None = None) -> StorageError:
    """`e` as a StorageError whose message names the cause and `action` ("writing PATH"; default: the
    path the error carries)."""
    return e if isinstance(e, StorageError) else StorageError(os_error_message(e, action), e.errno)
