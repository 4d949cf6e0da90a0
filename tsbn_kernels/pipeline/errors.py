"""The error the dataset readers raise for a file that exists but is not what the benchmark's format says."""
from __future__ import annotations


class DatasetError(ValueError):
    """A corrupt, truncated or foreign dataset file (a missing one is a FileNotFoundError); the message names it.
    The command-line tools print it as one line and exit with status 2."""
