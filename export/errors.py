"""Typed errors of the export package (all derive from PatchserveError)."""

from serving.core.errors import InputError, PatchserveError


class ExportError(PatchserveError):
    """An export step failed; the message names the run, model or file."""


class ExportInputError(ExportError, InputError):
    """A run, flag or repository path given to export is unusable; names it."""


class ParityError(ExportError):
    """The exported model disagrees with its source beyond the stated tolerance."""


class RepositoryExistsError(ExportInputError):
    """The target version folder already exists and --overwrite was not given."""


class TensorRTUnavailable(ExportError):
    """No GPU or no tensorrt package: the plan cannot be built on this machine."""


class RepositoryCheckError(ExportError):
    """A model repository could not be read at all (check-export)."""


class FixtureError(ExportError):
    """A parity fixture is missing, unreadable or incomplete: a failure of the gate, never a skip."""


class ManifestError(ExportError):
    """A version folder's manifest is missing or unreadable."""
