"""Errors the plugin raises for bad input. The plugin turns each into a one-line pytest usage error
or skip reason, never a traceback from its internals."""


class NeoxUsageError(Exception):
    """The user asked for something that cannot work (unknown model, bad dtype, unreadable directory).

    The message is one line and says what to do instead."""


class BackendUnavailable(Exception):
    """A backend cannot run here (package missing, no GPU, dtype unsupported): the test skips with this reason."""


class BaselineError(Exception):
    """A baseline file is unreadable, corrupt or schema-invalid; the message names the file and the problem."""


def in_brief(exc: BaseException, lines: int = 2) -> str:
    """An exception as 'Type: message' on one line, from its message's first non-empty lines: what a failure
    caused by the user's files says (transformers' second line is often the one naming the tensor)."""
    said = [ln.strip() for ln in str(exc).splitlines() if ln.strip()][:lines]
    return f"{type(exc).__name__}: {' '.join(said)}" if said else type(exc).__name__
