#!/usr/bin/env bash
# Fetch the ENTIRE TESS 2-minute light-curve set from MAST (~2 M files, ~4 TB) into DIR.
#
#   scripts/fetch_all_tess_lc.sh /data/tess-lc            # the real archive
#   scripts/fetch_all_tess_lc.sh /tmp/demo --simulate     # the same job, offline, simulated
#
# Safe to interrupt (Ctrl-C, SIGTERM, even kill -9 or a reboot) and to rerun: planned sectors are
# not queried again and finished files are never downloaded again. Extra arguments are passed to
# `bulkfetch tess` (e.g. --sectors 1-13 or --concurrency 32).
#
# The knobs, and why:
#   --products lc        2-min light curves only (productSubGroupDescription LC).
#   --concurrency 16     twice the polite default of 8: with ~0.3 s to the first byte, per-file
#                        latency, not bandwidth, bounds a few connections; adaptive concurrency
#                        backs off by itself if MAST answers 429/503.
#   --retries 10         a multi-day run meets every transient fault MAST has; 10 attempts with
#                        exponential backoff ride out outages of several minutes per file.
#   --stall-timeout 120  a connection silent for 2 minutes is dropped and resumed by Range.
#   --verify fits        size + SHA-256 + the FITS CHECKSUM of every HDU (the default).
#   --progress-interval 60  one progress line a minute when run under nohup/cron/a batch system.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 DIR [bulkfetch tess options...]" >&2
    exit 2
fi
dir=$1
shift
exec bulkfetch tess "$dir" \
    --products lc \
    --concurrency 16 \
    --retries 10 \
    --stall-timeout 120 \
    --verify fits \
    --progress-interval 60 \
    "$@"
