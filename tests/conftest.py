"""Shared pytest setup: the simulated MAST archive fixtures (mast_sim, astroquery_mast)."""

from __future__ import annotations

pytest_plugins = ["bulkfetch.testing.fixtures"]
