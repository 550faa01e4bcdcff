"""User-facing errors.

Every error a user can cause is a ``GalipError``: its message is one line that says what
was expected, what was found and how to fix it. The CLIs print that line and exit with
code 2 (see :func:`galip.runtime.cli_support.user_errors`), never a traceback.
"""


class GalipError(Exception):
    """Base class of every error a user can cause."""

    exit_code = 2


class InputError(GalipError):
    """An input file or array is unusable (not a NIfTI, wrong dimensionality, ...)."""


class BundleError(GalipError):
    """A bundle is missing, malformed, or fails its checksums."""


class BackendError(GalipError):
    """A requested inference backend cannot run on this machine."""


class OutputError(GalipError):
    """An output cannot be written (exists without --overwrite, unwritable folder, ...)."""


class ConfigError(GalipError):
    """Bad arguments or settings (unknown domain, empty data folder, ...)."""
