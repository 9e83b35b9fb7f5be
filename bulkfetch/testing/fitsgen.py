"""Deterministic product bodies for the simulated archive: valid TESS-like FITS files and others.

The download server must hand out the same bytes for a product on every request (Range resume
depends on it) and the bytes must be checkable the way real ones are: a ``*_lc.fits`` body is a
real FITS file shaped like a SPOC light curve (PRIMARY, LIGHTCURVE table, APERTURE image), with
a correct ``CHECKSUM`` in every HDU and a ``DATASUM`` unless the catalog says the product comes
from an early sector that shipped without one. So a download that arrives flipped, short or long
is caught by :mod:`bulkfetch.verify` exactly as it would be against MAST.

Bodies are derived from ``(seed, uri)`` only, are exactly ``info.size`` bytes, and are built
with numpy column operations (no per-byte Python), so a 2 MB light curve takes a few ms;
:class:`BodyCache` keeps recent bodies so a server can stream hundreds of MB/s without
regenerating them.

Headers are written card by card here rather than with astropy: it is several times faster,
keeps every byte under our control, and lets the checksum be computed exactly once.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from bulkfetch.verify import BLOCK, CARD, encode_checksum, ones_complement_sum

if TYPE_CHECKING:
    from bulkfetch.testing.catalog import ProductInfo

log = logging.getLogger("bulkfetch.testing")

#: FITS bodies need a primary header, a table header and at least one data block.
MIN_FITS_BLOCKS = 3

_MASK32 = 0xFFFFFFFF
_CHECKSUM_PLACEHOLDER = "0" * 16
#: Where a card's string value starts (after ``KEYWORD= '``).
_VALUE_OFFSET = 11


# -- cards and headers -------------------------------------------------------------------------


def _format_value(value: object) -> str:
    """A FITS fixed-format value field: numbers and logicals right-aligned to column 30."""
    if isinstance(value, bool):
        return f"{'T' if value else 'F':>20}"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):>20d}"
    if isinstance(value, (float, np.floating)):
        text = repr(float(value)).upper()
        if len(text) > 20:  # keep the fixed format: at most 20 characters
            text = f"{float(value):.13E}"
        if "." not in text and "E" not in text and "N" not in text:
            text += ".0"
        return f"{text:>20}"
    text = str(value).replace("'", "''")
    return f"'{text:<8}'".ljust(20)


def card(key: str, value: object = None, comment: str = "") -> str:
    """One 80-character header card; ``value`` None makes a commentary card (COMMENT etc.)."""
    if value is None:
        text = f"{key:<8}{comment}"
    else:
        text = f"{key:<8}= {_format_value(value)}"
        if comment:
            text += f" / {comment}"
    if len(text) > CARD:
        text = text[:CARD]
    return text.ljust(CARD)


def header_bytes(cards: Sequence[str]) -> bytes:
    """Cards plus END, padded with spaces to whole 2880-byte blocks."""
    text = "".join(cards) + "END".ljust(CARD)
    text += " " * (-len(text) % BLOCK)
    return text.encode("ascii")


def header_blocks(ncards: int) -> int:
    """Blocks a header of ``ncards`` cards (END not counted) occupies."""
    return -(-(ncards + 1) * CARD // BLOCK)


def _checksum_cards(has_datasum: bool, stamp: str) -> list[str]:
    """The checksum cards every generated HDU ends with (values filled in later)."""
    cards = [card("CHECKSUM", _CHECKSUM_PLACEHOLDER, f"HDU checksum updated {stamp}")]
    if has_datasum:
        cards.append(card("DATASUM", "0", f"data unit checksum updated {stamp}"))
    return cards


def seal_hdu(header: bytearray, data: memoryview | bytes, has_datasum: bool) -> None:
    """Write DATASUM (if the header has one) and then CHECKSUM into ``header`` in place.

    ``header`` must hold the cards from :func:`_checksum_cards`; ``data`` is the padded data
    unit. DATASUM goes first because it is part of the header that CHECKSUM covers.
    """
    data_sum = ones_complement_sum(data)
    if has_datasum:
        pos = _find_card(header, "DATASUM")
        value = _format_value(str(data_sum))
        header[pos + 10 : pos + 10 + len(value)] = value.encode("ascii")
    pos = _find_card(header, "CHECKSUM")
    total = ones_complement_sum(header, data_sum)
    code = encode_checksum(total).encode("ascii")
    header[pos + _VALUE_OFFSET : pos + _VALUE_OFFSET + 16] = code


def _find_card(header: bytearray | bytes, key: str) -> int:
    """Byte offset of the card ``key`` in a header; the generator always puts it there."""
    target = f"{key:<8}=".encode("ascii")
    for off in range(0, len(header), CARD):
        if header[off : off + 9] == target:
            return off
    raise ValueError(f"no {key} card in header")


# -- what kind of product ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Column:
    """One binary-table column: FITS name, TFORM, numpy dtype, unit, display, core flag."""

    name: str
    tform: str
    dtype: str
    unit: str = ""
    disp: str = ""
    core: bool = False
    shape: tuple[int, ...] = ()
    tdim: str = ""


@dataclass
class _Target:
    """Everything about a product that headers and data are derived from."""

    tic: int
    sector: int
    camera: int
    ccd: int
    ra: float
    dec: float
    tmag: float
    teff: float
    flux0: float
    cadence_s: float
    tstart: float
    nx: int
    ny: int
    stamp: str
    date: str


_TIC_RE = re.compile(r"-(\d{16})-")
_SECTOR_RE = re.compile(r"-s(\d{4})-")


def _flavor(filename: str, kind: str) -> str:
    """``lc``, ``tp`` or ``dvt``: which SPOC product this body imitates."""
    name = filename.lower()
    if name.endswith("tp.fits"):
        return "tp"
    if name.endswith("lc.fits"):
        return "lc"
    if name.endswith("dvt.fits"):
        return "dvt"
    upper = (kind or "").upper()
    if "TP" in upper or "PIXEL" in upper:
        return "tp"
    if "DV" in upper:
        return "dvt"
    return "lc"


def _rng(info: ProductInfo, seed: int) -> np.random.Generator:
    """The generator all random choices of one body come from: a function of (seed, uri)."""
    digest = hashlib.sha256(f"{seed}\x00{info.uri}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "big"))


def _target(info: ProductInfo, rng: np.random.Generator) -> _Target:
    """Plausible target and observation parameters, read from the name where it says them."""
    m = _TIC_RE.search(info.filename)
    tic = int(m.group(1)) if m else int(rng.integers(1, 10**9))
    sector = info.sector
    if sector is None:
        ms = _SECTOR_RE.search(info.filename)
        sector = int(ms.group(1)) if ms else 1
    fast = "fast" in info.filename.lower() or "FAST" in (info.kind or "").upper()
    tmag = float(rng.uniform(6.0, 15.0))
    # Sector 1 began 2018-07-25; sectors are ~27.4 days apart (BTJD = BJD - 2457000).
    tstart = 1325.29 + (sector - 1) * 27.4
    year = 2018 + (sector * 27 + 205) // 365
    day = (sector * 27 + 205) % 365
    month, mday = 1 + min(day // 31, 11), 1 + day % 28
    date = f"{year:04d}-{month:02d}-{mday:02d}"
    return _Target(
        tic=tic,
        sector=sector,
        camera=int(rng.integers(1, 5)),
        ccd=int(rng.integers(1, 5)),
        ra=round(float(rng.uniform(0.0, 360.0)), 6),
        dec=round(float(np.degrees(np.arcsin(rng.uniform(-1.0, 1.0)))), 6),
        tmag=round(tmag, 3),
        teff=round(float(rng.uniform(3000.0, 9000.0)), 1),
        flux0=float(15000.0 * 10 ** (-0.4 * (tmag - 10.0))),
        cadence_s=20.0 if fast else 120.0,
        tstart=tstart,
        nx=int(rng.integers(9, 12)),
        ny=int(rng.integers(9, 12)),
        stamp=f"{date}T{int(rng.integers(0, 24)):02d}:{int(rng.integers(0, 60)):02d}:00Z",
        date=date,
    )


def _lc_columns() -> list[_Column]:
    """The 20 columns of a SPOC LIGHTCURVE table, 100 bytes per row like the real ones."""
    c = _Column
    return [
        c("TIME", "D", ">f8", "BJD - 2457000, days", "D14.7", core=True),
        c("TIMECORR", "E", ">f4", "d", "E14.7"),
        c("CADENCENO", "J", ">i4", "", "I10", core=True),
        c("SAP_FLUX", "E", ">f4", "e-/s", "E14.7", core=True),
        c("SAP_FLUX_ERR", "E", ">f4", "e-/s", "E14.7", core=True),
        c("SAP_BKG", "E", ">f4", "e-/s", "E14.7"),
        c("SAP_BKG_ERR", "E", ">f4", "e-/s", "E14.7"),
        c("PDCSAP_FLUX", "E", ">f4", "e-/s", "E14.7", core=True),
        c("PDCSAP_FLUX_ERR", "E", ">f4", "e-/s", "E14.7", core=True),
        c("QUALITY", "J", ">i4", "", "B16.16", core=True),
        c("PSF_CENTR1", "D", ">f8", "pixel", "F10.5"),
        c("PSF_CENTR1_ERR", "E", ">f4", "pixel", "E14.7"),
        c("PSF_CENTR2", "D", ">f8", "pixel", "F10.5"),
        c("PSF_CENTR2_ERR", "E", ">f4", "pixel", "E14.7"),
        c("MOM_CENTR1", "D", ">f8", "pixel", "F10.5"),
        c("MOM_CENTR1_ERR", "E", ">f4", "pixel", "E14.7"),
        c("MOM_CENTR2", "D", ">f8", "pixel", "F10.5"),
        c("MOM_CENTR2_ERR", "E", ">f4", "pixel", "E14.7"),
        c("POS_CORR1", "E", ">f4", "pixels", "E14.7"),
        c("POS_CORR2", "E", ">f4", "pixels", "E14.7"),
    ]


def _tp_columns(nx: int, ny: int) -> list[_Column]:
    """The columns of a SPOC TARGETTABLES table for an ``nx`` x ``ny`` pixel stamp."""
    n = nx * ny
    dim = f"({nx},{ny})"
    shape = (ny, nx)
    c = _Column
    return [
        c("TIME", "D", ">f8", "BJD - 2457000, days", "D14.7", core=True),
        c("TIMECORR", "E", ">f4", "d", "E14.7"),
        c("CADENCENO", "J", ">i4", "", "I10", core=True),
        c("RAW_CNTS", f"{n}J", ">i4", "count", "I8", shape=shape, tdim=dim),
        c("FLUX", f"{n}E", ">f4", "e-/s", "E14.7", core=True, shape=shape, tdim=dim),
        c("FLUX_ERR", f"{n}E", ">f4", "e-/s", "E14.7", shape=shape, tdim=dim),
        c("FLUX_BKG", f"{n}E", ">f4", "e-/s", "E14.7", shape=shape, tdim=dim),
        c("FLUX_BKG_ERR", f"{n}E", ">f4", "e-/s", "E14.7", shape=shape, tdim=dim),
        c("QUALITY", "J", ">i4", "", "B16.16", core=True),
        c("POS_CORR1", "E", ">f4", "pixel", "E14.7"),
        c("POS_CORR2", "E", ">f4", "pixel", "E14.7"),
    ]


def _dvt_columns() -> list[_Column]:
    """The columns of a DV time-series (TCE_1) table."""
    c = _Column
    return [
        c("TIME", "D", ">f8", "BJD - 2457000, days", "D14.7", core=True),
        c("TIMECORR", "E", ">f4", "d", "E13.6"),
        c("CADENCENO", "J", ">i4", "", "I10", core=True),
        c("PHASE", "E", ">f4", "days", "E14.7", core=True),
        c("LC_INIT", "E", ">f4", "dimensionless", "E14.7", core=True),
        c("LC_INIT_ERR", "E", ">f4", "dimensionless", "E14.7", core=True),
        c("LC_WHITENED", "E", ">f4", "dimensionless", "E14.7"),
        c("LC_DETREND", "E", ">f4", "dimensionless", "E14.7"),
        c("MODEL_INIT", "E", ">f4", "dimensionless", "E14.7"),
        c("MODEL_WHITENED", "E", ">f4", "dimensionless", "E14.7"),
    ]


def _columns(flavor: str, tgt: _Target, compact: bool) -> list[_Column]:
    """The table columns for a flavor; ``compact`` keeps only the core ones (tiny files)."""
    if flavor == "tp":
        cols = _tp_columns(tgt.nx, tgt.ny)
    elif flavor == "dvt":
        cols = _dvt_columns()
    else:
        cols = _lc_columns()
    return [col for col in cols if col.core] if compact else cols


def _row_dtype(cols: Sequence[_Column]) -> np.dtype:
    """Packed big-endian record dtype matching the table's TFORMs."""
    return np.dtype([(col.name, col.dtype, col.shape) for col in cols])


# -- headers -----------------------------------------------------------------------------------


#: CREATOR values of real SPOC products per flavor (lightkurve's ``detect_filetype`` reads them).
_CREATORS = {
    "lc": "5331 LightCurveExporterPipelineModule",
    "tp": "4885 TargetPixelExporterPipelineModule",
    "dvt": "11337 DvTimeSeriesExporter",
}


def _primary_cards(info: ProductInfo, tgt: _Target, flavor: str, compact: bool) -> list[str]:
    """A SPOC-like primary header (no data), full or cut to one block."""
    cards = [
        card("SIMPLE", True, "conforms to FITS standards"),
        card("BITPIX", 8, "array data type"),
        card("NAXIS", 0, "number of array dimensions"),
        card("EXTEND", True, "file contains extensions"),
    ]
    if not compact:
        cards += [
            card("NEXTEND", 2, "number of standard extensions"),
            card("EXTNAME", "PRIMARY", "name of extension"),
            card("EXTVER", 1, "extension version number (not format version)"),
            card("SIMDATA", False, "file is based on simulated data"),
        ]
    cards += [
        card("ORIGIN", "NASA/Ames", "institution responsible for creating this file"),
        card("DATE", tgt.date, "file creation date."),
    ]
    # SPOC's exporter names, even in compact headers: lightkurve recognises a file by this card.
    cards.append(
        card("CREATOR", _CREATORS.get(flavor, "bulkfetch"), "pipeline job and program used")
    )
    if not compact:
        cards += [
            card("PROCVER", "spoc-4.0.14-20180810", "SW version"),
            card("FILEVER", "1.0", "file format version"),
            card("TIMVERSN", "OGIP/93-003", "OGIP memo number for file format"),
        ]
    cards += [
        card("TELESCOP", "TESS", "telescope"),
        card("INSTRUME", "TESS Photometer", "detector type"),
    ]
    if not compact:
        cards.append(card("DATA_REL", max(1, tgt.sector + 1), "data release version number"))
    cards += [
        card("OBJECT", f"TIC {tgt.tic}", "string version of target id"),
        card("TICID", tgt.tic, "unique tess target identifier"),
        card("SECTOR", tgt.sector, "Observing sector"),
        card("CAMERA", tgt.camera, "Camera number"),
        card("CCD", tgt.ccd, "CCD chip number"),
    ]
    if not compact:
        cards += [
            card("PXTABLE", 129, "pixel table id"),
            card("RADESYS", "ICRS", "reference frame of celestial coordinates"),
            card("RA_OBJ", tgt.ra, "[deg] right ascension"),
            card("DEC_OBJ", tgt.dec, "[deg] declination"),
            card("EQUINOX", 2000.0, "equinox of celestial coordinate system"),
            card("PMRA", 0.0, "[mas/yr] RA proper motion"),
            card("PMDEC", 0.0, "[mas/yr] Dec proper motion"),
            card("PMTOTAL", 0.0, "[mas/yr] total proper motion"),
            card("TESSMAG", tgt.tmag, "[mag] TESS magnitude"),
            card("TEFF", tgt.teff, "[K] Effective temperature"),
            card("LOGG", 4.4, "[cm/s2] log10 surface gravity"),
            card("MH", 0.0, "[log10([M/H])] metallicity"),
            card("RADIUS", 1.0, "[solar radii] stellar radius"),
            card("TICVER", 7, "TICVER"),
            card("CRMITEN", True, "spacecraft cosmic ray mitigation enabled"),
            card("CRBLKSZ", 10, "[exposures] s/c cosmic ray mitigation block siz"),
            card("CRSPOC", False, "SPOC cosmic ray cleaning enabled"),
        ]
        if flavor == "dvt":
            cards.append(card("COMMENT", None, "Data validation time series (simulated)"))
    return cards + _checksum_cards(info.has_datasum, tgt.stamp)


def _table_cards(
    info: ProductInfo,
    tgt: _Target,
    flavor: str,
    cols: Sequence[_Column],
    rows: int,
    compact: bool,
) -> list[str]:
    """A BINTABLE header for ``rows`` rows of ``cols``; ``compact`` fits in one block."""
    width = _row_dtype(cols).itemsize
    extname = {"lc": "LIGHTCURVE", "tp": "TARGETTABLES", "dvt": "TCE_1"}[flavor]
    cards = [
        card("XTENSION", "BINTABLE", "binary table extension"),
        card("BITPIX", 8, "array data type"),
        card("NAXIS", 2, "number of array dimensions"),
        card("NAXIS1", width, "length of dimension 1"),
        card("NAXIS2", rows, "length of dimension 2"),
        card("PCOUNT", 0, "number of group parameters"),
        card("GCOUNT", 1, "number of groups"),
        card("TFIELDS", len(cols), "number of table fields"),
    ]
    for i, col in enumerate(cols, start=1):
        cards.append(card(f"TTYPE{i}", col.name, "column title"))
        cards.append(card(f"TFORM{i}", col.tform, "column format"))
        if compact:
            continue
        if col.unit:
            cards.append(card(f"TUNIT{i}", col.unit, "column units"))
        if col.disp:
            cards.append(card(f"TDISP{i}", col.disp, "column display format"))
        if col.tdim:
            cards.append(card(f"TDIM{i}", col.tdim, "column dimensions"))
    cards += [
        card("EXTNAME", extname, "name of extension"),
        card("TICID", tgt.tic, "unique tess target identifier"),
    ]
    if not compact:
        days = rows * tgt.cadence_s / 86400.0
        cards += [
            card("EXTVER", 1, "extension version number (not format version)"),
            card("TELESCOP", "TESS", "telescope"),
            card("INSTRUME", "TESS Photometer", "detector type"),
            card("OBJECT", f"TIC {tgt.tic}", "string version of target id"),
            card("RADESYS", "ICRS", "reference frame of celestial coordinates"),
            card("RA_OBJ", tgt.ra, "[deg] right ascension"),
            card("DEC_OBJ", tgt.dec, "[deg] declination"),
            card("EQUINOX", 2000.0, "equinox of celestial coordinate system"),
            card("EXPOSURE", round(days * 0.8, 6), "[d] time on source"),
            card("TIMEREF", "SOLARSYSTEM", "barycentric correction applied to times"),
            card("TASSIGN", "SPACECRAFT", "where time is assigned"),
            card("TIMESYS", "TDB", "time system is Barycentric Dynamical Time (TDB)"),
            card("BJDREFI", 2457000, "integer part of BTJD reference date"),
            card("BJDREFF", 0.0, "fraction of the day in BTJD reference date"),
            card("TIMEUNIT", "d", "time unit for TIME, TSTART and TSTOP"),
            card("TELAPSE", round(days, 6), "[d] TSTOP - TSTART"),
            card("LIVETIME", round(days * 0.8, 6), "[d] TELAPSE multiplied by DEADC"),
            card("TSTART", tgt.tstart, "observation start time in BTJD"),
            card("TSTOP", round(tgt.tstart + days, 6), "observation stop time in BTJD"),
            card("DATE-OBS", f"{tgt.date}T00:00:00.000Z", "TSTART as UTC calendar date"),
            card("DEADC", 0.792, "deadtime correction"),
            card("TIMEPIXR", 0.5, "bin time beginning=0 middle=0.5 end=1"),
            card("TIERRELA", 1.16e-05, "[d] relative time error"),
            card("INT_TIME", 1.98, "[s] photon accumulation time per frame"),
            card("READTIME", 0.02, "[s] readout time per frame"),
            card("FRAMETIM", 2.0, "[s] frame time (INT_TIME + READTIME)"),
            card("NUM_FRM", int(tgt.cadence_s / 2), "number of frames per time stamp"),
            card("TIMEDEL", tgt.cadence_s / 86400.0, "[d] time resolution of data"),
            card("BACKAPP", True, "background is subtracted"),
            card("DEADAPP", True, "deadtime applied"),
            card("VIGNAPP", True, "vignetting or collimator correction applied"),
            card("GAINA", 5.22, "[electrons/count] CCD output A gain"),
            card("GAINB", 5.21, "[electrons/count] CCD output B gain"),
            card("GAINC", 5.21, "[electrons/count] CCD output C gain"),
            card("GAIND", 5.26, "[electrons/count] CCD output D gain"),
            card("READNOIA", 9.96, "[electrons] read noise CCD output A"),
            card("READNOIB", 7.57, "[electrons] read noise CCD output B"),
            card("READNOIC", 7.62, "[electrons] read noise CCD output C"),
            card("READNOID", 9.76, "[electrons] read noise CCD output D"),
            card("NREADOUT", 48, "number of read per cadence"),
            card("FXDOFF", 209715200, "compression fixed offset"),
            card("CDPP0_5", 100.0, "RMS CDPP on 0.5-hr time scales"),
            card("CDPP1_0", 80.0, "RMS CDPP on 1.0-hr time scales"),
            card("CDPP2_0", 60.0, "RMS CDPP on 2.0-hr time scales"),
            card("CROWDSAP", 0.99, "Ratio of target flux to total flux in op. ap."),
            card("FLFRCSAP", 0.9, "Frac. of target flux w/in the op. aperture"),
            card("PDCMETHD", "msMAP", "PDC algorithm used for target"),
        ]
    return cards + _checksum_cards(info.has_datasum, tgt.stamp)


def _aperture_cards(info: ProductInfo, tgt: _Target, npix_sap: int) -> list[str]:
    """Header of the APERTURE image (int32 bit mask of the pixel stamp)."""
    cards = [
        card("XTENSION", "IMAGE", "marks the beginning of a new HDU"),
        card("BITPIX", 32, "array data type"),
        card("NAXIS", 2, "number of array dimensions"),
        card("NAXIS1", tgt.nx, "length of first array dimension"),
        card("NAXIS2", tgt.ny, "length of second array dimension"),
        card("PCOUNT", 0, "group parameter count (not used)"),
        card("GCOUNT", 1, "group count (not used)"),
        card("INHERIT", True, "inherit the primary header"),
        card("EXTNAME", "APERTURE", "extension name"),
        card("EXTVER", 1, "extension version number (not format version)"),
        card("TELESCOP", "TESS", "telescope"),
        card("INSTRUME", "TESS Photometer", "detector type"),
        card("OBJECT", f"TIC {tgt.tic}", "string version of target id"),
        card("TICID", tgt.tic, "unique tess target identifier"),
        card("RADESYS", "ICRS", "reference frame of celestial coordinates"),
        card("EQUINOX", 2000.0, "equinox of celestial coordinate system"),
        card("NPIXSAP", npix_sap, "Number of pixels in optimal aperture"),
        card("NPIXMISS", 0, "Number of op. aperture pixels not collected"),
    ]
    return cards + _checksum_cards(info.has_datasum, tgt.stamp)


# -- data --------------------------------------------------------------------------------------


#: Rows of a target-pixel table filled per numpy operation.
_SLAB_ROWS = 4096


def _fill_table(table: np.ndarray, tgt: _Target, rng: np.random.Generator) -> None:
    """Write plausible, deterministic values into every column present in ``table``.

    One noise vector per row feeds several columns (scaled differently), which keeps a 2 MB
    light curve to a handful of vector operations.
    """
    n = len(table)
    if n == 0:
        return
    names = set(table.dtype.names or ())
    idx = np.arange(n, dtype=np.float64)
    dt = tgt.cadence_s / 86400.0
    time = tgt.tstart + dt * idx
    noise = rng.standard_normal(n, dtype=np.float32)
    noise2 = rng.standard_normal(n, dtype=np.float32)
    period = float(rng.uniform(0.5, 10.0))
    signal = (1.0 + 2e-3 * np.sin((2 * np.pi / period) * time)).astype(np.float32)
    rel = signal + np.float32(1e-3) * noise
    # The orbit gap in the middle of a sector: no flux, flagged in QUALITY.
    gap = slice(n // 2 - n // 40, n // 2 + n // 40) if n >= 40 else slice(0, 0)
    f0 = np.float32(tgt.flux0)

    def put(name: str, value: np.ndarray | float) -> None:
        if name in names:
            table[name] = value

    put("TIME", time)
    put("TIMECORR", np.float32(0.003) + np.float32(1e-5) * noise2)
    put("CADENCENO", np.arange(n, dtype=np.int32) + tgt.sector * 20000)
    put("QUALITY", np.where(np.abs(noise2) > 3.0, 128, 0).astype(np.int32))
    if "QUALITY" in names:
        table["QUALITY"][gap] = 32
    put("SAP_FLUX", f0 * rel)
    put("SAP_FLUX_ERR", np.float32(np.sqrt(tgt.flux0)) * (1 + np.float32(0.01) * noise2))
    put("SAP_BKG", np.float32(200.0) + np.float32(5.0) * noise2)
    put("SAP_BKG_ERR", np.float32(2.0))
    put("PDCSAP_FLUX", f0 * np.float32(1.01) * (rel - np.float32(1e-4) * noise2))
    put("PDCSAP_FLUX_ERR", np.float32(1.1 * np.sqrt(tgt.flux0)))
    col, row = float(rng.uniform(50, 2000)), float(rng.uniform(50, 2000))
    for axis, base in (("1", col), ("2", row)):
        put(f"PSF_CENTR{axis}", base + 1e-3 * noise2)
        put(f"PSF_CENTR{axis}_ERR", np.float32(1e-3))
        put(f"MOM_CENTR{axis}", base + 1e-3 * noise)
        put(f"MOM_CENTR{axis}_ERR", np.float32(2e-3))
        put(f"POS_CORR{axis}", np.float32(1e-2) * noise2)
    if "PHASE" in names:
        table["PHASE"] = ((time % period) - period / 2).astype(np.float32)
        put("LC_INIT", rel - np.float32(1.0))
        put("LC_INIT_ERR", np.float32(1e-3))
        put("LC_WHITENED", np.float32(1e-3) * noise)
        put("LC_DETREND", rel - signal)
        put("MODEL_INIT", signal - np.float32(1.0))
        put("MODEL_WHITENED", np.float32(0.0))
    if "FLUX" in names:
        # Pixel columns are most of a target-pixel file: fill them in slabs of rows so the
        # temporaries stay a few MB even for a 200 MB 20-s TP file.
        image = _stamp_image(tgt)
        err = np.sqrt(image)
        for lo in range(0, n, _SLAB_ROWS):
            part = table[lo : lo + _SLAB_ROWS]
            flux = np.multiply.outer(rel[lo : lo + _SLAB_ROWS], image)
            part["FLUX"] = flux
            if "RAW_CNTS" in names:  # absent from the compact layout of tiny files
                part["RAW_CNTS"] = (flux * np.float32(2.0)).astype(np.int32) + 6000
                part["FLUX_ERR"] = err
                part["FLUX_BKG"] = np.float32(20.0)
                part["FLUX_BKG_ERR"] = np.float32(1.5)
    for name in ("SAP_FLUX", "PDCSAP_FLUX", "LC_INIT", "FLUX"):
        if name in names:
            table[name][gap] = np.nan


def _stamp_image(tgt: _Target) -> np.ndarray:
    """The target's pixel stamp: a Gaussian star on a flat background, float32 (ny, nx)."""
    y, x = np.mgrid[0 : tgt.ny, 0 : tgt.nx].astype(np.float32)
    cy, cx = (tgt.ny - 1) / 2.0, (tgt.nx - 1) / 2.0
    r2 = (x - cx) ** 2 + (y - cy) ** 2
    star = np.exp(-r2 / np.float32(2.0 * 1.2**2)) * np.float32(tgt.flux0 / (2 * np.pi * 1.44))
    return (star + np.float32(20.0)).astype(np.float32)


def _aperture_image(tgt: _Target) -> np.ndarray:
    """TESS aperture bit mask: 1 collected, 2 optimal aperture, 4 background, 8 centroid."""
    y, x = np.mgrid[0 : tgt.ny, 0 : tgt.nx]
    r2 = (x - (tgt.nx - 1) / 2.0) ** 2 + (y - (tgt.ny - 1) / 2.0) ** 2
    mask = np.ones((tgt.ny, tgt.nx), dtype=">i4")
    mask[r2 <= 4.0] |= 2 | 8
    mask[r2 >= 16.0] |= 4
    return mask


# -- assembling a FITS body ---------------------------------------------------------------------


#: Header blocks per layout: they depend on which cards are written, never on their values.
_BLOCK_COUNTS: dict[tuple[str, bool, bool, bool], tuple[int, int, int]] = {}


def _layout_blocks(
    info: ProductInfo, tgt: _Target, flavor: str, compact: bool, aperture: bool
) -> tuple[int, int, int]:
    """Blocks of (primary header, table header, whole aperture HDU) for one layout, memoised.

    Formatting headers is the slowest part of a small body, so the layout search counts cards
    once per layout instead of building every candidate's headers for every body.
    """
    key = (flavor, compact, aperture, info.has_datasum)
    counts = _BLOCK_COUNTS.get(key)
    if counts is None:
        cols = _columns(flavor, tgt, compact)
        counts = (
            header_blocks(len(_primary_cards(info, tgt, flavor, compact))),
            header_blocks(len(_table_cards(info, tgt, flavor, cols, 0, compact))),
            header_blocks(len(_aperture_cards(info, tgt, 0))) + 1 if aperture else 0,
        )
        _BLOCK_COUNTS[key] = counts
    return counts


def _fits_body(info: ProductInfo, seed: int) -> bytes:
    """A valid SPOC-like FITS file of exactly ``info.size`` bytes."""
    size = info.size
    if size % BLOCK or size < MIN_FITS_BLOCKS * BLOCK:
        raise ValueError(
            f"{info.filename}: FITS size {size} must be a multiple of {BLOCK} and at least "
            f"{MIN_FITS_BLOCKS} blocks"
        )
    rng = _rng(info, seed)
    tgt = _target(info, rng)
    flavor = _flavor(info.filename, info.kind)
    nblocks = size // BLOCK
    with_aperture = flavor in ("lc", "tp")

    # Richest layout that still leaves at least one block of table data.
    for compact, aperture in ((False, with_aperture), (False, False), (True, False)):
        prim_blocks, table_blocks, ap_blocks = _layout_blocks(info, tgt, flavor, compact, aperture)
        if prim_blocks + table_blocks + ap_blocks + 1 <= nblocks:
            break
    else:  # cannot happen for >= 3 blocks (the compact layout needs 2 header blocks)
        raise ValueError(f"{info.filename}: {size} bytes is too small for a FITS body")

    cols = _columns(flavor, tgt, compact)
    dtype = _row_dtype(cols)
    # Every row width is below one block, so floor(rows) fills the data blocks exactly.
    assert dtype.itemsize <= BLOCK
    prim_len = prim_blocks * BLOCK
    table_hdr_len = table_blocks * BLOCK
    ap_len = ap_blocks * BLOCK
    data_len = size - prim_len - table_hdr_len - ap_len
    rows = data_len // dtype.itemsize
    primary = _primary_cards(info, tgt, flavor, compact)

    body = bytearray(size)
    view = memoryview(body)

    # Primary: header only, data sum 0.
    head = bytearray(header_bytes(primary))
    seal_hdu(head, b"", info.has_datasum)
    body[:prim_len] = head

    # Table.
    start = prim_len + table_hdr_len
    table = np.ndarray(shape=(rows,), dtype=dtype, buffer=body, offset=start)
    _fill_table(table, tgt, rng)
    data_view = view[start : start + data_len]
    head = bytearray(header_bytes(_table_cards(info, tgt, flavor, cols, rows, compact)))
    seal_hdu(head, data_view, info.has_datasum)
    body[prim_len:start] = head

    # Aperture image.
    if aperture:
        mask = _aperture_image(tgt)
        npix_sap = int(np.count_nonzero(mask & 2))
        ap_start = start + data_len
        ap_hdr = bytearray(header_bytes(_aperture_cards(info, tgt, npix_sap)))
        data_start = ap_start + len(ap_hdr)
        raw = mask.tobytes()
        body[data_start : data_start + len(raw)] = raw
        seal_hdu(ap_hdr, view[data_start:size], info.has_datasum)
        body[ap_start:data_start] = ap_hdr
    del table, data_view, view
    return bytes(body)


# -- other products ----------------------------------------------------------------------------

_PRINTABLE = np.frombuffer(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/", dtype=np.uint8
)


def _text_filler(rng: np.random.Generator, n: int) -> bytes:
    """``n`` printable bytes (base64 alphabet, a newline every 77), cheap to make."""
    chars = _PRINTABLE[np.frombuffer(rng.bytes(n), dtype=np.uint8) & 63]
    chars[76::77] = ord("\n")
    return chars.tobytes()


def _framed(prefix: bytes, filler: Callable[[int], bytes], suffix: bytes, size: int) -> bytes:
    """``prefix + filler + suffix`` of exactly ``size`` bytes (cut short if size is tiny)."""
    room = size - len(prefix) - len(suffix)
    if room < 0:
        return (prefix + suffix)[:size]
    return prefix + filler(room) + suffix


def _other_body(info: ProductInfo, seed: int) -> bytes:
    """Deterministic non-FITS bytes with the magic a reader of such a file expects."""
    rng = _rng(info, seed)
    size = info.size
    name = info.filename.lower()
    tic = _TIC_RE.search(info.filename)
    tic_text = str(int(tic.group(1))) if tic else "0"
    if name.endswith(".pdf"):
        prefix = (
            b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Length "
            + f"{max(size - 80, 0):010d}".encode()
            + b" >>\nstream\n"
        )
        suffix = b"\nendstream\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n"
        return _framed(prefix, rng.bytes, suffix, size)
    if name.endswith(".xml"):
        prefix = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<dv:dvTargetResults xmlns:dv="http://www.nasa.gov/2018/TESS/DV" '
            f'ticId="{tic_text}">\n<dv:payload encoding="base64">\n'
        ).encode()
        suffix = b"\n</dv:payload>\n</dv:dvTargetResults>\n"
        return _framed(prefix, lambda n: _text_filler(rng, n), suffix, size)
    if name.endswith((".txt", ".csv", ".sh", ".json")):
        return _framed(f"# TIC {tic_text}\n".encode(), lambda n: _text_filler(rng, n), b"", size)
    return rng.bytes(size)


# -- public API --------------------------------------------------------------------------------


def product_body(info: ProductInfo, seed: int) -> bytes:
    """The bytes the simulated archive serves for ``info``: deterministic, exactly info.size.

    ``.fits`` names get a valid FITS file (see the module docstring) and raise ``ValueError`` if
    the catalog size is not a multiple of 2880 of at least three blocks; other names get
    plausible bytes (``%PDF-1.4``, ``<?xml``, ...). The same ``(info, seed)`` always gives the
    same bytes, different URIs or seeds give different ones.
    """
    if info.size < 0:
        raise ValueError(f"{info.filename}: negative size {info.size}")
    if info.filename.lower().endswith(".fits"):
        return _fits_body(info, seed)
    return _other_body(info, seed)


class BodyCache:
    """Recently served bodies, evicted least-recently-used by total bytes; thread-safe.

    Generating a light curve costs milliseconds, which would cap a server at a few hundred MB/s
    on one core; a download run asks for each body once or a few times (retries, resumes), so
    caching recent ones lets the server stream from memory. Concurrent requests for the same
    body wait for one generation instead of each making their own. A body larger than
    ``max_bytes`` is generated and returned but not kept.
    """

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[object, ...], bytes] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()
        self._pending: dict[tuple[object, ...], threading.Event] = {}
        #: Requests answered from the cache / by generating the body.
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _key(info: ProductInfo, seed: int) -> tuple[object, ...]:
        return (info.uri, info.filename, info.size, info.kind, info.sector, info.has_datasum, seed)

    @property
    def nbytes(self) -> int:
        """Bytes currently held."""
        return self._nbytes

    def __len__(self) -> int:
        return len(self._items)

    def get(self, info: ProductInfo, seed: int) -> bytes:
        """The body of ``info`` under ``seed``, from the cache or freshly generated."""
        key = self._key(info, seed)
        while True:
            with self._lock:
                body = self._items.get(key)
                if body is not None:
                    self._items.move_to_end(key)
                    self.hits += 1
                    return body
                event = self._pending.get(key)
                owner = event is None
                if event is None:
                    event = threading.Event()
                    self._pending[key] = event
                    self.misses += 1
            if owner:
                break
            # Another thread is generating this body: wait, then look again. If it was not
            # kept (too big, or generation failed) the pending mark is gone and we generate.
            event.wait()
        try:
            body = product_body(info, seed)
            self._store(key, body)
        finally:
            with self._lock:
                self._pending.pop(key, None)
            event.set()
        return body

    def _store(self, key: tuple[object, ...], body: bytes) -> None:
        """Keep ``body`` and evict the least recently used until under ``max_bytes``."""
        if len(body) > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = body
            self._nbytes += len(body)
            while self._nbytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._nbytes -= len(old)
