"""Errors the plugin raises for bad input. The plugin turns each into a one-line pytest usage error
or skip reason, never a traceback from its internals."""


class NeoxUsageError(Exception):
    """The user asked for something that cannot work (unknown model, bad dtype, unreadable directory).

    The message is one line and says what to do instead."""


class BackendUnavailable(Exception):
    """A backend cannot run here (package missing, no GPU, dtype unsupported): the test skips with this reason."""


class BaselineError(Exception):
    """A baseline file is unreadable, corrupt or schema-invalid; the message names the file and the problem."""
