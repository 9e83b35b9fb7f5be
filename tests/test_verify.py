"""Integrity checks: the ones' complement sum, the streaming FITS walker, digests and verify_file.

The reference for "correct" is astropy (an independent implementation of the FITS checksum
convention) and a plain-Python end-around-carry sum, never our own output; corrupted files are
made by flipping, cutting or appending real bytes on disk.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from bulkfetch.testing.catalog import ProductInfo
from bulkfetch.testing.fitsgen import product_body
from bulkfetch.verify import (
    ALL_ONES,
    StreamVerifier,
    check_fits,
    check_fits_bytes,
    encode_checksum,
    looks_like_fits,
    looks_like_html,
    ones_complement_sum,
    sha256_file,
    verify_file,
)

BLOCK = 2880
LC = "tess2018206045859-s0001-0000000025155310-0120-s_lc.fits"
PDF = "tess2018206190142-s0001-s0001-0000000025155310-00106_dvr.pdf"
HTML = (
    b"<!DOCTYPE html>\n<html><head><title>503 Service Unavailable</title></head>"
    b"<body><h1>Service Unavailable</h1></body></html>\n"
)


def lc_body(has_datasum: bool = True, blocks: int = 40, seed: int = 0) -> bytes:
    info = ProductInfo(f"mast:TESS/product/{LC}", LC, blocks * BLOCK, "LC", 1, has_datasum)
    return product_body(info, seed)


def reference_sum(data: bytes) -> int:
    """The textbook definition: add big-endian 32-bit words, folding each carry back in."""
    total = 0
    for i in range(0, len(data), 4):
        total += int.from_bytes(data[i : i + 4], "big")
        if total > 0xFFFFFFFF:
            total = (total & 0xFFFFFFFF) + 1
    return total


def hdu_offsets(body: bytes) -> list[tuple[int, int, int]]:
    """(header start, data start, data end padded) per HDU, as astropy sees the file."""
    import io

    with fits.open(io.BytesIO(body)) as hdul:
        out = []
        for i in range(len(hdul)):
            info = hdul.fileinfo(i)
            out.append((info["hdrLoc"], info["datLoc"], info["datLoc"] + info["datSpan"]))
        return out


def astropy_file(tmp_path: Path) -> Path:
    """A multi-HDU file written by astropy with checksum=True: image, table and empty primary."""
    rng = np.random.default_rng(42)
    table = fits.BinTableHDU.from_columns(
        [
            fits.Column("A", "D", array=rng.normal(size=1234)),
            fits.Column("B", "J", array=rng.integers(-(2**31), 2**31 - 1, 1234)),
            fits.Column("C", "10E", array=rng.normal(size=(1234, 10)).astype(np.float32)),
        ],
        name="TAB",
    )
    image = fits.ImageHDU(rng.integers(0, 2**16, (37, 51)).astype(np.int16), name="IMG")
    path = tmp_path / "astropy.fits"
    fits.HDUList([fits.PrimaryHDU(), table, image]).writeto(path, checksum=True)
    return path


# -- ones' complement sum ----------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 4, 8, 400, 4004])
def test_sum_matches_textbook_definition(n: int) -> None:
    rng = np.random.default_rng(n)
    for data in (rng.bytes(n), b"\xff" * n, b"\xff\xff\xff\xfe" * (n // 4), b"\x00" * n):
        assert ones_complement_sum(data) == reference_sum(data)


def test_sum_in_chunks_equals_sum_of_whole() -> None:
    rng = np.random.default_rng(1)
    data = rng.bytes(4 * 100_003)
    whole = ones_complement_sum(data)
    cuts = sorted(set(4 * rng.integers(0, 100_003, 12)))
    running = 0
    start = 0
    for cut in [*cuts, len(data)]:
        running = ones_complement_sum(memoryview(data)[start:cut], running)
        start = cut
    assert running == whole == reference_sum(data)


def test_sum_accepts_bytearray_memoryview_and_arrays() -> None:
    data = np.random.default_rng(2).bytes(4096)
    expected = reference_sum(data)
    assert ones_complement_sum(bytearray(data)) == expected
    assert ones_complement_sum(memoryview(data)) == expected
    assert ones_complement_sum(np.frombuffer(data, dtype=np.uint8)) == expected
    assert ones_complement_sum(np.frombuffer(data, dtype=">u4")) == expected


def test_sum_refuses_lengths_that_are_not_whole_words() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        ones_complement_sum(b"abcdefg")


def test_sum_agrees_with_astropy_checksums(tmp_path: Path) -> None:
    """astropy's DATASUM is its data sum and its CHECKSUM makes each HDU sum to -0."""
    path = astropy_file(tmp_path)
    body = path.read_bytes()
    with fits.open(path) as hdul:
        datasums = [int(hdu.header["DATASUM"]) for hdu in hdul]
    for (hdr, dat, end), datasum in zip(hdu_offsets(body), datasums, strict=True):
        assert ones_complement_sum(body[dat:end]) == datasum
        assert ones_complement_sum(body[hdr:end]) == ALL_ONES


def test_checksum_encoding_reproduces_astropys(tmp_path: Path) -> None:
    """Zeroing CHECKSUM, summing and encoding the complement gives astropy's exact string."""
    body = bytearray(astropy_file(tmp_path).read_bytes())
    for hdr, _dat, end in hdu_offsets(bytes(body)):
        header = body[hdr:end]
        pos = header.find(b"CHECKSUM= '")
        stored = header[pos + 11 : pos + 27].decode()
        header[pos + 11 : pos + 27] = b"0" * 16
        assert encode_checksum(ones_complement_sum(header)) == stored


# -- check_fits on good files ------------------------------------------------------------------


def test_astropy_written_file_passes(tmp_path: Path) -> None:
    assert check_fits(astropy_file(tmp_path)) == []


@pytest.mark.parametrize("has_datasum", [True, False])
def test_generated_files_pass_from_disk_and_memory(tmp_path: Path, has_datasum: bool) -> None:
    body = lc_body(has_datasum)
    path = tmp_path / LC
    path.write_bytes(body)
    assert check_fits(path) == []
    assert check_fits_bytes(body) == []


def test_hdus_without_checksum_are_accepted(tmp_path: Path) -> None:
    """The convention is optional; without CHECKSUM there is nothing to verify, only structure."""
    path = tmp_path / "plain.fits"
    fits.HDUList([fits.PrimaryHDU(np.arange(100, dtype=np.int32))]).writeto(path)
    assert check_fits(path) == []
    data = bytearray(path.read_bytes())
    data[BLOCK + 10] ^= 0xFF  # undetectable without a checksum: still accepted
    assert check_fits_bytes(data) == []


# -- check_fits catches damage -----------------------------------------------------------------


@pytest.mark.parametrize("has_datasum", [True, False])
def test_flipped_header_byte_is_caught(has_datasum: bool) -> None:
    body = bytearray(lc_body(has_datasum))
    hdr, _dat, _end = hdu_offsets(bytes(body))[1]
    pos = body.find(b"column title", hdr)  # a comment: structure unchanged, content not
    body[pos] ^= 0x01
    problems = check_fits_bytes(body)
    assert len(problems) == 1
    assert "HDU 1 (LIGHTCURVE)" in problems[0] and "CHECKSUM mismatch" in problems[0]


@pytest.mark.parametrize("has_datasum", [True, False])
def test_flipped_data_byte_is_caught(has_datasum: bool) -> None:
    body = bytearray(lc_body(has_datasum))
    _hdr, dat, end = hdu_offsets(bytes(body))[1]
    body[(dat + end) // 2] ^= 0x40
    problems = check_fits_bytes(body)
    assert any("HDU 1 (LIGHTCURVE)" in p and "CHECKSUM mismatch" in p for p in problems)
    assert any("DATASUM mismatch" in p for p in problems) is has_datasum
    assert all("HDU 1" in p for p in problems)


def test_flipped_byte_in_last_hdu_is_caught() -> None:
    body = bytearray(lc_body())
    _hdr, dat, _end = hdu_offsets(bytes(body))[-1]
    body[dat + 3] ^= 0x01
    problems = check_fits_bytes(body)
    assert problems and all("HDU 2 (APERTURE)" in p for p in problems)


def test_changed_size_keyword_is_a_structure_problem() -> None:
    body = bytearray(lc_body())
    hdr, _dat, _end = hdu_offsets(bytes(body))[1]
    pos = body.find(b"NAXIS2  =", hdr)
    card = body[pos : pos + 80].decode()
    rows = int(card[10:30])
    body[pos + 10 : pos + 30] = f"{rows + 200:>20d}".encode()
    problems = check_fits_bytes(body)
    assert any("truncated" in p for p in problems)


@pytest.mark.parametrize("cut", [1, 100, BLOCK, 5 * BLOCK])
def test_truncated_file_is_caught(tmp_path: Path, cut: int) -> None:
    body = lc_body()
    path = tmp_path / LC
    path.write_bytes(body[:-cut])
    problems = check_fits(path)
    assert problems and "truncated" in problems[0]


def test_file_cut_inside_a_header_is_caught() -> None:
    body = lc_body()
    hdr, dat, _end = hdu_offsets(body)[1]
    problems = check_fits_bytes(body[: hdr + BLOCK + 40])
    # EXTNAME comes after the column cards, so the cut header cannot name itself.
    assert problems == ["HDU 1: header has no END card (file truncated)"]
    short = check_fits_bytes(body[:1000])
    assert short == ["HDU 0 (PRIMARY): header has no END card (file truncated)"]


@pytest.mark.parametrize("extra", [b"\x00" * BLOCK, b"junk", HTML])
def test_extra_bytes_after_last_hdu_are_caught(extra: bytes) -> None:
    problems = check_fits_bytes(lc_body() + extra)
    assert problems == [
        f"{len(extra)} extra bytes after the last HDU (from offset {40 * BLOCK}; "
        "they do not start a FITS extension)"
    ]


def test_non_fits_and_html_and_empty_are_caught(tmp_path: Path) -> None:
    pdf = product_body(ProductInfo("mast:x/" + PDF, PDF, 9000, "DVR", 1, True), 0)
    assert "not FITS" in check_fits_bytes(pdf)[0]
    html_problems = check_fits_bytes(HTML)
    assert len(html_problems) == 1 and "HTML" in html_problems[0]
    assert check_fits_bytes(b"") == ["empty file: not FITS"]
    path = tmp_path / "error.fits"
    path.write_bytes(HTML * 40)  # longer than one block
    assert "HTML" in check_fits(path)[0]


# -- sniffing ----------------------------------------------------------------------------------


def test_looks_like_fits_and_html() -> None:
    assert looks_like_fits(lc_body()[:100])
    assert not looks_like_fits(HTML)
    assert looks_like_html(HTML)
    assert looks_like_html(b"  \r\n<HTML>\n<body>oops</body></HTML>")
    assert looks_like_html(
        b'<?xml version="1.0"?>\n<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Strict//EN">'
    )
    assert not looks_like_html(b'<?xml version="1.0" encoding="UTF-8"?>\n<dv:dvTargetResults>')
    assert not looks_like_html(lc_body()[:BLOCK])
    assert not looks_like_html(b"%PDF-1.4\n")


# -- digests and verify_file -------------------------------------------------------------------


def test_stream_verifier_matches_hashlib_over_uneven_chunks() -> None:
    data = lc_body(blocks=20)
    verifier = StreamVerifier()
    rng = np.random.default_rng(3)
    pos = 0
    while pos < len(data):
        step = int(rng.integers(1, 9000))
        verifier.update(memoryview(data)[pos : pos + step])
        pos += step
    assert verifier.nbytes == len(data)
    assert verifier.sha256_hex == hashlib.sha256(data).hexdigest()
    assert verifier.head == data[:BLOCK]
    assert looks_like_fits(verifier.head)


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    data = np.random.default_rng(4).bytes(3 * (1 << 20) + 17)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_file(path, chunk=1000) == hashlib.sha256(data).hexdigest()


def test_verify_file_reports_every_kind_of_problem(tmp_path: Path) -> None:
    body = lc_body()
    digest = hashlib.sha256(body).hexdigest()
    path = tmp_path / LC
    path.write_bytes(body)
    assert verify_file(path, size=len(body), sha256=digest) == []
    assert verify_file(path, size=len(body), sha256=digest.upper()) == []

    assert verify_file(tmp_path / "nope.fits") == [f"missing: {tmp_path / 'nope.fits'}"]

    (size_problem,) = verify_file(path, size=len(body) + 1)
    assert "size mismatch" in size_problem and str(len(body)) in size_problem

    (digest_problem,) = verify_file(path, sha256="0" * 64)
    assert "sha256 mismatch" in digest_problem and digest in digest_problem

    damaged = bytearray(body)
    damaged[len(body) // 2] ^= 0x10
    path.write_bytes(damaged)
    problems = verify_file(path, size=len(body), sha256=digest)
    assert any("sha256 mismatch" in p for p in problems)
    assert any("CHECKSUM mismatch" in p and LC in p for p in problems)
    assert not any("size mismatch" in p for p in problems)
    # fits=False: only the checks asked for.
    assert verify_file(path, size=len(body), fits=False) == []


def test_verify_file_decides_fits_from_name_or_magic(tmp_path: Path) -> None:
    damaged = bytearray(lc_body())
    damaged[-100] ^= 0x01
    odd_name = tmp_path / "download.bin"  # FITS content under a non-FITS name
    odd_name.write_bytes(damaged)
    assert any("CHECKSUM mismatch" in p for p in verify_file(odd_name))

    pdf = product_body(ProductInfo("mast:x/" + PDF, PDF, 9000, "DVR", 1, True), 0)
    pdf_path = tmp_path / PDF
    pdf_path.write_bytes(pdf)
    assert verify_file(pdf_path, size=9000) == []
    assert "not FITS" in verify_file(pdf_path, fits=True)[0]

    html_as_pdf = tmp_path / "report.pdf"
    html_as_pdf.write_bytes(HTML)
    assert any("HTML page" in p for p in verify_file(html_as_pdf))
    html_as_fits = tmp_path / "lc.fits"
    html_as_fits.write_bytes(HTML)
    assert any("HTML page" in p for p in verify_file(html_as_fits))


def test_check_cost_per_gigabyte(tmp_path: Path) -> None:
    """CPU for check_fits + sha256 of 2 MB light curves (one read each), the engine's per-file
    work. Measured ~1 s/GB on the 2-core dev box (sha256 ~0.8, FITS walk ~0.2); the bound is
    loose so a busy CI machine does not fail it, but a per-byte Python loop would (>100 s/GB).
    """
    paths = []
    for i in range(8):
        body = lc_body(blocks=700, seed=i)
        path = tmp_path / f"{i}_{LC}"
        path.write_bytes(body)
        paths.append((path, hashlib.sha256(body).hexdigest(), len(body)))
    t0 = time.process_time()
    for path, digest, size in paths:
        assert verify_file(path, size=size, sha256=digest) == []
    cpu = time.process_time() - t0
    per_gb = cpu / (sum(size for _, _, size in paths) / 1e9)
    assert per_gb < 10.0, f"{per_gb:.2f} CPU s/GB"


def test_datasum_that_disagrees_with_the_data_is_reported(tmp_path: Path) -> None:
    """astropy wrote a correct DATASUM; change one digit and the checker names that keyword."""
    body = bytearray(astropy_file(tmp_path).read_bytes())
    hdr, _dat, _end = hdu_offsets(bytes(body))[1]
    digit = body.find(b"DATASUM = '", hdr) + 11
    body[digit] = ord("0") + (body[digit] - ord("0") + 1) % 10
    problems = check_fits_bytes(body)
    assert any(p.startswith("HDU 1 (TAB): DATASUM mismatch") for p in problems)
    assert any(p.startswith("HDU 1 (TAB): CHECKSUM mismatch") for p in problems)


def _header(*cards: str, end: bool = True) -> bytes:
    text = "".join(c.ljust(80) for c in cards) + ("END".ljust(80) if end else "")
    return (text + " " * (-len(text) % BLOCK)).encode()


def test_hand_made_headers_with_broken_structure_are_reported() -> None:
    simple = "SIMPLE  =                    T"
    no_end = _header(
        simple, "BITPIX  =                    8", "NAXIS   =                    0", end=False
    )
    assert check_fits_bytes(no_end) == [
        "HDU 0 (PRIMARY): header has no END card (it runs to the end of the file)"
    ]
    bad_bitpix = _header(simple, "BITPIX  =                   12", "NAXIS   =                    0")
    assert check_fits_bytes(bad_bitpix) == [
        "HDU 0 (PRIMARY): BITPIX '12' is not a valid FITS BITPIX"
    ]
    missing_axis = _header(
        simple, "BITPIX  =                   16", "NAXIS   =                    2"
    )
    assert check_fits_bytes(missing_axis) == ["HDU 0 (PRIMARY): NAXIS1 is missing or invalid"]
    not_simple = _header("SIMPLE  =                    F", "BITPIX  =                    8")
    assert check_fits_bytes(not_simple) == ["HDU 0 (PRIMARY): SIMPLE is 'F', not T"]
    # A well-formed image without checksums: 3 x 5 int16 = 30 bytes, padded to one block.
    image = _header(
        simple,
        "BITPIX  =                   16",
        "NAXIS   =                    2",
        "NAXIS1  =                    3",
        "NAXIS2  =                    5",
    )
    assert check_fits_bytes(image + b"\x01" * BLOCK) == []
    assert "truncated" in check_fits_bytes(image + b"\x01" * 28)[0]
