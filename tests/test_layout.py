"""Local paths follow astroquery's layout and never leave the download directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from bulkfetch.errors import UnsafePathError
from bulkfetch.layout import relative_path, resolve_inside, safe_component

OBS = "tess2018206045859-s0001-0000000025132999-0120-s"
NAME = OBS + "_lc.fits"


def test_nested_layout_is_astroquerys() -> None:
    assert relative_path("TESS", OBS, NAME, flat=False) == f"mastDownload/TESS/{OBS}/{NAME}"


def test_flat_layout_is_just_the_name() -> None:
    assert relative_path("TESS", OBS, NAME, flat=True) == NAME


@pytest.mark.parametrize(
    "hostile",
    [
        "../evil.fits",
        "..",
        ".",
        "/etc/passwd",
        "a/b.fits",
        "a\\b.fits",
        "",
        "x\x00.fits",
        "C:x",
        " lead",
    ],
)
def test_hostile_file_names_are_refused(hostile: str) -> None:
    with pytest.raises(UnsafePathError, match="productFilename"):
        relative_path("TESS", OBS, hostile, flat=False)
    with pytest.raises(UnsafePathError):
        relative_path("TESS", OBS, hostile, flat=True)


@pytest.mark.parametrize("hostile", ["..", "../../tmp", "/abs", "a/.."])
def test_hostile_obs_ids_are_refused(hostile: str) -> None:
    with pytest.raises(UnsafePathError, match="obs_id"):
        relative_path("TESS", hostile, NAME, flat=False)


def test_safe_component_accepts_real_tess_names() -> None:
    for name in (NAME, "tess2018206190142-s0001-s0003-0000000025132999-00129_dvr.pdf"):
        assert safe_component(name, "productFilename") == name


def test_resolve_inside_refuses_escape(tmp_path: Path) -> None:
    root = tmp_path / "job"
    root.mkdir()
    inside = resolve_inside(root, f"mastDownload/TESS/{OBS}/{NAME}")
    assert root.resolve() in inside.parents
    with pytest.raises(UnsafePathError):
        resolve_inside(root, "../outside.fits")
    # A symlink planted inside DIR that points outside is caught too.
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(UnsafePathError):
        resolve_inside(root, "link/outside.fits")
