"""One exception hierarchy for bulkfetch.

Every error a user can meet derives from :class:`BulkfetchError`, so the CLI can turn any of them
into one clear line and the right exit code without a traceback. The message of each error says
what a user needs to act: which file, which URL, which status, what to do next.
"""

from __future__ import annotations


class BulkfetchError(Exception):
    """Base class of every error bulkfetch raises on purpose."""

    #: Exit code the CLI uses when this error ends a command.
    exit_code: int = 1


class UsageError(BulkfetchError):
    """The user asked for something that cannot be done (bad option, unknown column, bad table)."""

    exit_code = 2


class ArchiveError(BulkfetchError):
    """The archive (MAST or a mirror) failed in a way retries did not cure."""


class IntegrityError(BulkfetchError):
    """A downloaded file does not match its expected size, digest or FITS checksum."""


class StateError(BulkfetchError):
    """The job state on disk is missing, locked by another process, or inconsistent."""


class UnsafePathError(UsageError):
    """A file name or obs_id from the catalog would place a file outside the download directory."""
