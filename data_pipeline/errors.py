"""Errors raised by the data pipeline.

Every message names the file or field, the offending value, and what to do about it.
"""


class DatasetError(ValueError):
    """A dataset file (or a corpus line) is missing, truncated, corrupt or otherwise unusable."""


class SamplePlanError(ValueError):
    """A stage plan, split or batch layout that cannot be served exactly (the message shows the equation)."""
