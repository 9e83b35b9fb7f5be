"""Integrity checks of downloaded files: size, SHA-256 and the FITS per-HDU checksums.

MAST publishes no digests for TESS products, so the strongest check available for a FITS file is
the one inside it: each HDU of a SPOC product carries a ``CHECKSUM`` keyword (and, in all but the
earliest sectors, a ``DATASUM``), defined by the FITS checksum convention as a 32-bit ones'
complement sum. A file that was truncated, padded, flipped in transit or replaced by an HTML
error page fails these checks, so the fetch engine runs them before it renames a ``.part`` file
to its final name.

Everything here is pure (no network) and streaming: a file is read in chunks, never loaded whole,
so checking a 50 MB target-pixel file costs a few MB of memory. The ones' complement sum is
vectorised with numpy (several GB/s), so the checks cost less CPU than the SHA-256 next to them.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

log = logging.getLogger("bulkfetch")

#: Size of a FITS logical record; every header and every data unit is a multiple of it.
BLOCK = 2880
#: Size of one header card.
CARD = 80
#: The ones' complement of zero that a correct CHECKSUM makes the whole HDU sum to.
ALL_ONES = 0xFFFFFFFF
_MASK32 = 0xFFFFFFFF
#: Read size while summing data units: a multiple of 2880 (and so of 4), about 4 MiB.
_READ_CHUNK = BLOCK * 1456
#: Words summed in one numpy reduction; 2**28 words of at most 2**32-1 cannot overflow uint64.
_MAX_WORDS = 1 << 28
#: A header longer than this many blocks is taken as garbage rather than read to the end.
_MAX_HEADER_BLOCKS = 10_000

_VALID_BITPIX = {8, 16, 32, 64, -32, -64}


# -- the ones' complement sum ------------------------------------------------------------------


def _fold(value: int) -> int:
    """Fold the carries above bit 31 back into the low 32 bits (the end-around carry)."""
    while value > _MASK32:
        value = (value & _MASK32) + (value >> 32)
    return value


def _as_bytes_view(data: bytes | bytearray | memoryview | np.ndarray) -> memoryview:
    """A flat, byte-wise view of ``data`` without copying when it is already contiguous."""
    if isinstance(data, np.ndarray):
        return memoryview(np.ascontiguousarray(data)).cast("B")
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    return view


def ones_complement_sum(data: bytes | bytearray | memoryview | np.ndarray, initial: int = 0) -> int:
    """The 32-bit ones' complement sum of ``data`` read as big-endian 32-bit words.

    This is the sum the FITS checksum convention is built on. Pass the result of one call as
    ``initial`` of the next to sum a stream chunk by chunk: the result equals the sum of the
    concatenation as long as every chunk but the last is a multiple of 4 bytes (FITS headers and
    data units are multiples of 2880, so HDU-sized or block-sized chunks always qualify).

    The length must be a multiple of 4; anything else is a caller bug (a FITS unit never is),
    so it raises ``ValueError`` instead of guessing a padding.

    numpy sums the words into a uint64 accumulator in one pass (no byte-swapped copy), and the
    carries are folded back once at the end, which is the same as folding after every addition
    because ones' complement addition is associative.
    """
    view = _as_bytes_view(data)
    if len(view) % 4:
        raise ValueError(f"ones' complement sum needs a multiple of 4 bytes, got {len(view)}")
    words = np.frombuffer(view, dtype=">u4")
    total = int(initial) & _MASK32
    for start in range(0, len(words), _MAX_WORDS):
        part = words[start : start + _MAX_WORDS]
        total += int(np.add.reduce(part, dtype=np.uint64))
    return _fold(total)


def encode_checksum(value: int, complement: bool = True) -> str:
    """The 16-character ASCII encoding of a 32-bit checksum, as the FITS convention defines it.

    Each byte is spread over four printable characters (offset from ``'0'``, avoiding the
    punctuation between digits and letters) whose sum restores the byte, and the result is
    rotated right by one character because the value starts at column 12 of its card, one byte
    before a word boundary. Writing the encoding of the complement of an HDU's sum (computed with
    ``CHECKSUM = '0000000000000000'`` in place) makes the whole HDU sum to -0.
    """
    if complement:
        value = ~value & _MASK32
    excluded = set(range(0x3A, 0x41)) | set(range(0x5B, 0x61))
    chars = [0] * 16
    for i in range(4):
        byte = (value >> (24 - 8 * i)) & 0xFF
        quotient, remainder = divmod(byte, 4)
        ch = [quotient + 0x30] * 4
        ch[0] += remainder
        changed = True
        while changed:
            changed = False
            for j in (0, 2):
                if ch[j] in excluded or ch[j + 1] in excluded:
                    ch[j] += 1
                    ch[j + 1] -= 1
                    changed = True
        for j in range(4):
            chars[4 * j + i] = ch[j]
    rotated = chars[15:] + chars[:15]
    return bytes(rotated).decode("ascii")


# -- sniffing the first bytes ------------------------------------------------------------------


def looks_like_fits(first_bytes: bytes) -> bool:
    """True if ``first_bytes`` start the way every FITS file must: ``SIMPLE  =``."""
    return bytes(first_bytes[:9]) == b"SIMPLE  ="


def looks_like_html(first_bytes: bytes) -> bool:
    """True if ``first_bytes`` are an HTML page, e.g. an error page served with status 200.

    Archives and proxies answer an overloaded or failed request with an HTML page more often than
    one would hope, sometimes with status 200; a file that should be FITS, PDF or XML but starts
    like HTML is such a page. XHTML (``<?xml`` then ``<!DOCTYPE html``) counts as HTML; a plain
    XML document does not.
    """
    head = bytes(first_bytes[:1024]).lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return True
    if head.startswith((b"<?xml", b"<!--")):
        return b"<!doctype html" in head or b"<html" in head
    return head.startswith((b"<head", b"<body", b"<title"))


# -- header parsing ----------------------------------------------------------------------------


#: A FITS string value: from the opening quote to the next single (not doubled) quote.
_STRING_RE = re.compile(r"'((?:[^']|'')*)'")


def _card_value(card: bytes) -> str | None:
    """The raw value of a ``KEYWORD = value / comment`` card, quotes removed; None if no value."""
    if card[8:10] != b"= ":
        return None
    text = card[10:].decode("ascii", errors="replace").strip()
    if text.startswith("'"):
        match = _STRING_RE.match(text)
        # An unterminated string runs to the end of the card, as before.
        inner = match.group(1) if match else text[1:]
        return inner.replace("''", "'").rstrip()
    return text.split("/", 1)[0].strip()


@dataclass
class _Header:
    """The handful of keywords needed to size an HDU and check its sums."""

    first_keyword: str
    values: dict[str, str]
    nbytes: int
    end_found: bool
    #: Ones' complement sum of the header blocks (valid when ``end_found``).
    header_sum: int = 0
    #: The first bytes of the header, to tell an HTML page from other garbage.
    head: bytes = b""

    def int_value(self, key: str, default: int | None = None) -> int | None:
        raw = self.values.get(key)
        if raw is None:
            return default
        try:
            return int(raw)
        except ValueError:
            return None

    @property
    def name(self) -> str:
        return self.values.get("EXTNAME", "PRIMARY" if self.first_keyword == "SIMPLE" else "")


_WANTED = {"SIMPLE", "XTENSION", "BITPIX", "NAXIS", "PCOUNT", "GCOUNT", "GROUPS", "EXTNAME"}
_WANTED |= {"CHECKSUM", "DATASUM"}


#: The wanted keywords as the 8-byte, space-padded key fields of their cards: comparing bytes
#: skips a decode and an rstrip for each of the 36 cards of a block (the hot loop of small files).
_WANTED8 = frozenset(key.encode("ascii").ljust(8) for key in _WANTED)
_END8 = b"END     "


def _parse_block(block: bytes, values: dict[str, str]) -> bool:
    """Collect the wanted keywords of one header block; True if it holds the END card."""
    keys = [block[off : off + 8] for off in range(0, BLOCK, CARD)]
    try:
        n_cards = keys.index(_END8)  # a C-speed scan: most blocks hold no END card
        end_found = True
    except ValueError:
        n_cards = len(keys)
        end_found = False
    for index in range(n_cards):
        key8 = keys[index]
        if key8 in _WANTED8 or (key8[:5] == b"NAXIS" and key8[5:].rstrip().isdigit()):
            key = key8.rstrip().decode("ascii")
            if key not in values:
                off = index * CARD
                value = _card_value(block[off : off + CARD])
                if value is not None:
                    values[key] = value
    return end_found


def _data_size(header: _Header, primary: bool) -> tuple[int | None, str | None]:
    """Bytes of the data unit (without padding) from BITPIX/NAXISn/PCOUNT/GCOUNT, or a problem."""
    bitpix = header.int_value("BITPIX")
    if bitpix not in _VALID_BITPIX:
        return None, f"BITPIX {header.values.get('BITPIX')!r} is not a valid FITS BITPIX"
    naxis = header.int_value("NAXIS")
    if naxis is None or not 0 <= naxis <= 999:
        return None, f"NAXIS {header.values.get('NAXIS')!r} is missing or invalid"
    if naxis == 0:
        return 0, None
    dims = []
    for n in range(1, naxis + 1):
        dim = header.int_value(f"NAXIS{n}")
        if dim is None or dim < 0:
            return None, f"NAXIS{n} is missing or invalid"
        dims.append(dim)
    pcount = header.int_value("PCOUNT", 0)
    gcount = header.int_value("GCOUNT", 1)
    if pcount is None or gcount is None or pcount < 0 or gcount < 0:
        return None, "PCOUNT or GCOUNT is invalid"
    # Random groups: NAXIS1 = 0 marks that the first axis does not count.
    if primary and dims[0] == 0 and header.values.get("GROUPS") == "T":
        dims = dims[1:]
    elements = 1
    for dim in dims:
        elements *= dim
    return abs(bitpix) // 8 * gcount * (pcount + elements), None


# -- walking a stream of HDUs ------------------------------------------------------------------


class _Reader:
    """Reads a binary stream in exact amounts and feeds every byte read to an optional hasher."""

    def __init__(self, stream: BinaryIO, hasher: hashlib._Hash | None = None) -> None:
        self._stream = stream
        self._hasher = hasher
        self.offset = 0
        # Allocated on first use, no bigger than asked for: a 4 MiB buffer per call cost more
        # than checking a whole 30 KB file.
        self._view = memoryview(bytearray(0))

    def read(self, n: int) -> bytes:
        data = self._stream.read(n)
        self.offset += len(data)
        if self._hasher is not None and data:
            self._hasher.update(data)
        return data

    def chunks(self, n: int) -> Iterator[memoryview]:
        """Yield up to ``n`` bytes in reused-buffer chunks; stops early at end of stream.

        Each chunk is filled completely (short reads are retried), so every chunk but one cut
        by the end of the stream has the full, 4-byte-aligned length the sum needs.
        """
        remaining = n
        while remaining > 0:
            want = min(remaining, _READ_CHUNK)
            if len(self._view) < want:
                self._view = memoryview(bytearray(want))
            got = 0
            while got < want:
                step = self._stream.readinto(self._view[got:want])  # type: ignore[attr-defined]
                if not step:
                    break
                got += step
            if not got:
                return
            chunk = self._view[:got]
            self.offset += got
            if self._hasher is not None:
                self._hasher.update(chunk)
            remaining -= got
            yield chunk
            if got < want:
                return

    def drain(self) -> int:
        """Consume the rest of the stream; return how many bytes there were."""
        total = 0
        for chunk in self.chunks(1 << 62):
            total += len(chunk)
        return total


def _read_header(reader: _Reader) -> _Header | None:
    """Read header blocks up to and including the one with END; None at a clean end of file."""
    header = _Header("", {}, 0, end_found=False)
    for index in range(_MAX_HEADER_BLOCKS):
        block = reader.read(BLOCK)
        if not block and index == 0:
            return None
        header.nbytes += len(block)
        if index == 0:
            header.head = block[:1024]
            header.first_keyword = block[:8].rstrip().decode("ascii", errors="replace")
        if len(block) < BLOCK:
            return header
        header.header_sum = ones_complement_sum(block, header.header_sum)
        if _parse_block(block, header.values):
            header.end_found = True
            return header
    return header


def _walk(reader: _Reader) -> list[str]:
    """Check every HDU of the stream behind ``reader``; return the problems found.

    Stops at the first structural problem, because after it the HDU boundaries are unknown.
    """
    problems: list[str] = []
    index = 0
    while True:
        start = reader.offset
        header = _read_header(reader)
        if header is None:
            if index == 0:
                problems.append("empty file: not FITS")
            return problems
        label = f"HDU {index}" + (f" ({header.name})" if header.name else "")
        if index == 0 and header.first_keyword != "SIMPLE":
            if looks_like_html(header.head):
                problems.append("not FITS: the file is an HTML page (an error page?)")
            else:
                shown = header.head[:20].decode("ascii", errors="replace")
                problems.append(f"not FITS: the file starts with {shown!r}, not 'SIMPLE  =  T'")
            return problems
        if index > 0 and header.first_keyword != "XTENSION":
            extra = header.nbytes + reader.drain()
            problems.append(
                f"{extra} extra bytes after the last HDU (from offset {start}; "
                "they do not start a FITS extension)"
            )
            return problems
        if not header.end_found:
            if header.nbytes % BLOCK:
                why = "file truncated"
            elif header.nbytes >= _MAX_HEADER_BLOCKS * BLOCK:
                why = f"none in the first {_MAX_HEADER_BLOCKS} blocks"
            else:
                why = "it runs to the end of the file"
            problems.append(f"{label}: header has no END card ({why})")
            return problems
        if index == 0 and header.values.get("SIMPLE") != "T":
            problems.append(f"{label}: SIMPLE is {header.values.get('SIMPLE')!r}, not T")
            return problems
        size, why = _data_size(header, primary=index == 0)
        if size is None:
            problems.append(f"{label}: {why}")
            return problems
        padded = -(-size // BLOCK) * BLOCK
        data_sum = 0
        got = 0
        for chunk in reader.chunks(padded):
            got += len(chunk)
            # Only a chunk cut short by the end of the file can be unaligned; it is reported
            # as truncated below, so its last partial word may be left out of the sum.
            data_sum = ones_complement_sum(chunk[: len(chunk) & ~3], data_sum)
        if got < padded:
            problems.append(
                f"truncated: {label} needs {padded} data bytes from offset "
                f"{start + header.nbytes}, only {got} remain"
            )
            return problems
        problems.extend(_check_sums(label, header, data_sum))
        index += 1


def _check_sums(label: str, header: _Header, data_sum: int) -> list[str]:
    """Compare CHECKSUM and DATASUM of one HDU with the sums actually computed."""
    problems: list[str] = []
    header_sum = header.header_sum
    datasum_text = header.values.get("DATASUM")
    if datasum_text is not None:
        try:
            declared = int(datasum_text)
        except ValueError:
            problems.append(f"{label}: DATASUM {datasum_text!r} is not a number")
        else:
            if declared != data_sum:
                problems.append(
                    f"{label}: DATASUM mismatch (header says {declared}, data sums to {data_sum})"
                )
    if "CHECKSUM" in header.values:
        hdu_sum = _fold(header_sum + data_sum)
        if hdu_sum != ALL_ONES:
            problems.append(
                f"{label}: CHECKSUM mismatch (HDU sums to {hdu_sum:#010x}, not -0 = 0xffffffff)"
            )
    return problems


def _check_stream(stream: BinaryIO, hasher: hashlib._Hash | None = None) -> list[str]:
    """Walk the FITS HDUs of ``stream``; feed every byte of it to ``hasher`` if given."""
    reader = _Reader(stream, hasher)
    problems = _walk(reader)
    if hasher is not None:
        reader.drain()
    return problems


def check_fits(path: str | os.PathLike[str]) -> list[str]:
    """Every structural and checksum problem of the FITS file at ``path``; empty means OK.

    The file is walked HDU by HDU, parsing each header ourselves (2880-byte blocks up to the END
    card; BITPIX, NAXISn, PCOUNT and GCOUNT give the data size) and streaming the data through the
    ones' complement sum, so memory stays small whatever the file size. Reported: a file that is
    not FITS (or is an HTML page), a header without END, an invalid size keyword, a truncated
    data unit, bytes after the last HDU, and per HDU a ``CHECKSUM`` under which the HDU does not
    sum to -0 or a ``DATASUM`` that differs from the data's sum.

    An HDU without ``CHECKSUM`` is accepted (the convention is optional); an HDU with
    ``CHECKSUM`` but no ``DATASUM`` is checked on ``CHECKSUM`` alone, which is what the early
    TESS sectors ship and what ``astropy.io.fits.open(checksum=True)`` wrongly reports as bad.
    """
    with open(path, "rb") as stream:
        problems = _check_stream(stream)
    if problems:
        log.debug("FITS check of %s: %s", os.fspath(path), "; ".join(problems))
    return problems


def check_fits_bytes(data: bytes | bytearray | memoryview) -> list[str]:
    """:func:`check_fits` for a file already in memory (e.g. a body just received)."""
    return _check_stream(io.BytesIO(data))


# -- digests -----------------------------------------------------------------------------------


class StreamVerifier:
    """Digest and count a body as its chunks arrive, so no second read of the file is needed.

    The engine feeds every chunk it writes to ``update``; the first ``HEAD_BYTES`` are kept in
    ``head`` so an HTML error page can be recognised without reopening the file. FITS checks
    need the complete body and run afterwards (in a thread) with :func:`check_fits`.
    """

    HEAD_BYTES = BLOCK

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._nbytes = 0
        self._head = bytearray()

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        """Account for the next chunk of the body."""
        self._hash.update(chunk)
        n = len(chunk)
        if len(self._head) < self.HEAD_BYTES:
            self._head += bytes(chunk[: self.HEAD_BYTES - len(self._head)])
        self._nbytes += n

    @property
    def sha256_hex(self) -> str:
        """Hex SHA-256 of all bytes fed so far."""
        return self._hash.hexdigest()

    @property
    def nbytes(self) -> int:
        """Number of bytes fed so far."""
        return self._nbytes

    @property
    def head(self) -> bytes:
        """The first bytes of the body (up to one FITS block), for sniffing its type."""
        return bytes(self._head)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of the file at ``path``, read in ``chunk``-sized pieces."""
    digest = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb") as stream:
        while True:
            got = stream.readinto(view)
            if not got:
                break
            digest.update(view[:got])
    return digest.hexdigest()


def verify_file(
    path: str | os.PathLike[str],
    *,
    size: int | None = None,
    sha256: str | None = None,
    fits: bool | None = None,
) -> list[str]:
    """All problems of the file at ``path``; an empty list means it is good.

    Checks, in order: the file exists; its size equals ``size`` (if given); its SHA-256 equals
    ``sha256`` (if given); and its FITS structure and checksums (:func:`check_fits`) when
    ``fits`` is True, or when ``fits`` is None and the name ends in ``.fits`` or the content
    starts like FITS. With ``fits`` None a non-FITS file that is an HTML page is reported too,
    since no archive product is one. The SHA-256 and the FITS checks share one read of the file.
    """
    name = os.fspath(path)
    try:
        actual_size = os.path.getsize(name)
    except FileNotFoundError:
        return [f"missing: {name}"]
    except OSError as exc:
        return [f"unreadable: {name}: {exc}"]
    problems: list[str] = []
    if size is not None and actual_size != size:
        problems.append(f"size mismatch: {name} has {actual_size} bytes, expected {size}")
    with open(name, "rb") as stream:
        head = stream.read(BLOCK)
        stream.seek(0)
        do_fits = fits
        if do_fits is None:
            do_fits = name.lower().endswith((".fits", ".fit", ".fts")) or looks_like_fits(head)
            if (
                not do_fits
                and looks_like_html(head)
                and not name.lower().endswith((".html", ".htm"))
            ):
                problems.append(f"{name} is an HTML page (an error page?), not the product")
        hasher = hashlib.sha256() if sha256 is not None else None
        if do_fits:
            problems.extend(f"{name}: {p}" for p in _check_stream(stream, hasher))
        elif hasher is not None:
            _Reader(stream, hasher).drain()
    if sha256 is not None and hasher is not None:
        actual = hasher.hexdigest()
        if actual.lower() != sha256.lower():
            problems.append(f"sha256 mismatch: {name} is {actual}, expected {sha256.lower()}")
    return problems
