"""Errors raised by the data pipeline; every message names the file or field, the value, and the fix."""


class DatasetError(ValueError):
    """A dataset file (or a corpus line) is missing, truncated, corrupt or otherwise unusable."""


class SamplePlanError(ValueError):
    """A stage plan, split or batch layout that cannot be served exactly (the message shows the equation)."""
