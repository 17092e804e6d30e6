"""Typed errors for patchserve.

Every package raises from its own ``errors.py``; all of them derive from
:class:`PatchserveError` so the CLI can turn any of them into a one-line
message and a non-zero exit code instead of a traceback.
"""


class PatchserveError(Exception):
    """Base of every error patchserve raises on purpose."""


class SpecError(PatchserveError, ValueError):
    """A model spec field is invalid; the message names the field."""


class InputError(PatchserveError, ValueError):
    """A user-supplied file, folder or flag is unusable; the message names it."""


class FlagError(InputError):
    """An option is wrong for the whole job (or for an input it must apply to): the job stops at once,
    naming the flag, instead of recording the same error for every item."""


class ImageReadError(InputError):
    """One image could not be read or decoded (jobs record it and go on)."""


class SlideError(InputError):
    """A whole-slide image cannot be opened or tiled as asked (jobs record it for that slide and go on)."""


class SlideFlagError(SlideError, FlagError):
    """A slide option (--mpp-target, --level, --overlap, --tissue-mask ...) cannot be applied: the job stops."""


class ServerError(PatchserveError):
    """The embedded Triton server could not be started or stopped."""


class ModelLoadError(ServerError):
    """The server started but failed to load models: ``failures`` holds each one with Triton's reason."""

    def __init__(self, message: str, failures: tuple = ()):
        super().__init__(message)
        self.failures = tuple(failures)


class ClientError(PatchserveError):
    """Base of errors raised while talking to a Triton server."""


class ServerUnavailableError(ClientError):
    """The server did not answer (after retries)."""


class ModelNotFoundError(ClientError):
    """The server does not serve the requested model (or it is not ready)."""


class SpecMismatchError(ClientError):
    """The server's model spec disagrees with what the client expects."""


class FeaturesMissingError(SpecMismatchError):
    """``--features`` against a served model without a features output (exported without one, or before)."""


class BadInputError(ClientError, ValueError):
    """Images given to the client have the wrong shape or dtype."""


class InferenceError(ClientError):
    """The server answered a request with an error on purpose (bad input, model failure): never retried."""


class RequestTimeoutError(ClientError, TimeoutError):
    """A request got no answer in time (the client's deadline): retried like a lost connection."""


class JobError(InputError):
    """A scoring job cannot start or go on as asked (exit code 2, output untouched)."""


class JobLockedError(JobError):
    """Another job holds the lock of the same output."""


class FingerprintMismatchError(JobError):
    """``--resume`` of a job whose model, options or inputs changed; the message names each difference."""


class ServerMismatchError(ClientError):
    """Two servers, or one server before and after a restart, serve different models under one name."""
