"""Typed errors of the training package (all derive from PatchserveError)."""

from serving.core.errors import InputError, PatchserveError


class TrainingError(PatchserveError):
    """Training could not start or continue."""


class ModelConfigError(TrainingError, ValueError):
    """A model flag (arch, head, pooling, pretrained file) is invalid; names the flag."""


class DataError(InputError):
    """The training data is unusable (bad files, empty class, one class)."""


class CheckpointError(TrainingError):
    """A checkpoint or run folder is missing, unreadable or lacks its spec."""
