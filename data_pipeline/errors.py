"""User errors: :class:`UserError`, the base of every error the project raises for bad input (a file, a field, a
flag), and the data pipeline's own. Every message names the file or field, the value, and the fix; every tool's
``main`` catches UserError and prints that one line with exit code 2 (no traceback). Standard library only, so that
data_pipeline, launcher and evidence all import it."""


class UserError(ValueError):
    """Bad input from the user; the message is one line: what, where, and how to fix it."""


class DatasetError(UserError):
    """A dataset file (or a corpus line) is missing, truncated, corrupt or otherwise unusable."""


class SamplePlanError(UserError):
    """A stage plan, split or batch layout that cannot be served exactly (the message shows the equation)."""
