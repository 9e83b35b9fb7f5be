"""Where a product lands on disk, laid out exactly as astroquery lays it out.

``DIR/mastDownload/<obs_collection>/<obs_id>/<productFilename>`` (astroquery's default, which
lightkurve also searches) or ``DIR/<productFilename>`` with ``flat``. Every component comes from
the archive's catalog, which we do not trust: a component that is empty, absolute, contains a
path separator or a NUL, or is ``.``/``..`` is refused with :class:`UnsafePathError`, so nothing
is ever written outside ``DIR``.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from .errors import UnsafePathError

#: Suffix of a file being downloaded; renamed to the final name only once verified.
PART_SUFFIX = ".part"
#: Suffix of the file that keeps a partial body's ETag next to its ``.part``.
ETAG_SUFFIX = ".etag"


def safe_component(value: str, what: str) -> str:
    """Return ``value`` if it is a single, harmless path component; raise otherwise.

    ``what`` names the catalog column (``obs_id``, ``productFilename``) for the error message.
    """
    text = str(value)
    bad = (
        not text
        or text in (".", "..")
        or "/" in text
        or "\\" in text
        or "\x00" in text
        or text != text.strip()
        or (len(text) > 1 and text[1] == ":")  # a Windows drive letter
    )
    if bad:
        raise UnsafePathError(f"refusing {what} {text!r}: it would leave the download directory")
    return text


def relative_path(obs_collection: str, obs_id: str, product_filename: str, flat: bool) -> str:
    """The product's path relative to the download directory, as a POSIX string.

    astroquery keeps only the basename of ``productFilename`` in the nested layout; we refuse
    names with separators outright instead, because silently dropping a directory part is how
    two different products end up fighting over one file.
    """
    name = safe_component(product_filename, "productFilename")
    if flat:
        return name
    collection = safe_component(obs_collection, "obs_collection")
    obs = safe_component(obs_id, "obs_id")
    return str(PurePosixPath("mastDownload", collection, obs, name))


def resolve_inside(root: str | os.PathLike[str], rel: str) -> Path:
    """Join ``rel`` to ``root`` and prove the result stays inside ``root``.

    A second line of defence for paths read back from the job state or a table.
    """
    base = Path(root).resolve()
    target = (base / rel).resolve()
    if target != base and base not in target.parents:
        raise UnsafePathError(f"refusing path {rel!r}: it resolves outside {base}")
    return target
