"""Errors the plugin raises for bad input. The plugin turns each into a one-line pytest usage error
or skip reason, never a traceback from its internals."""


class NeoxUsageError(Exception):
    """The user asked for something that cannot work (unknown model, bad dtype, unreadable directory).

    The message is one line and says what to do instead."""


class BackendUnavailable(Exception):
    """A backend cannot run here (package missing, no GPU, dtype unsupported): the test skips with this reason."""


class BaselineError(Exception):
    """A baseline file is unreadable, corrupt or schema-invalid; the message names the file and the problem."""


def first_line(exc: BaseException) -> str:
    """An exception's message in one line, without its type: its first non-empty line, or the type's name
    where it says nothing (an outcome's reason, a config file's error, a device's message)."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def in_brief(exc: BaseException, lines: int = 2) -> str:
    """An exception as 'Type: message' on one line, from its message's first non-empty lines: what a failure
    caused by the user's files says (transformers' second line is often the one naming the tensor). A message
    that embeds another error's traceback (transformers' pipeline, which MII loads with, does) says its first
    line, then that error's own."""
    text = str(exc).splitlines()
    start = next((i for i, ln in enumerate(text) if ln.strip() == _TRACEBACK), len(text))
    said = [ln.strip() for ln in text[:start] if ln.strip()]
    embedded = _embedded_error(text[start:])
    if embedded:
        return f"{type(exc).__name__}: {said[0]} ... {embedded}" if said else f"{type(exc).__name__}: {embedded}"
    return f"{type(exc).__name__}: {' '.join(said[:lines])}" if said else type(exc).__name__


_TRACEBACK = "Traceback (most recent call last):"


def _embedded_error(text: list[str]) -> str | None:
    """The error line ending the traceback that `text` starts with (its frames are indented), with the line
    after it where that one continues the error's message (indented too)."""
    for k in range(1, len(text)):
        if text[k].strip() and not text[k][0].isspace():
            more = text[k + 1] if k + 1 < len(text) else ""
            return f"{text[k].strip()} {more.strip()}".strip() if more[:1].isspace() else text[k].strip()
    return None
