"""pytest fixtures for the simulated MAST archive (load with ``pytest_plugins``).

``mast_sim(**knobs)`` starts a fresh simulator on 127.0.0.1 (a free port) and stops it at
teardown; ``astroquery_mast(**knobs)`` does the same and points the imported, unmodified
astroquery at it. :func:`use_simulator` is the context manager behind the latter, for scripts.

Test defaults keep files tiny (``scale=0.01``: a light curve is about 20 KB) and the catalog
small (4 sectors of 20 targets), so a test that downloads a sector stays well under a second.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from .config import SimConfig
from .mast import MastSimulator

#: Catalog and size knobs every fixture-made simulator starts from (overridable per call).
DEFAULT_TEST_KNOBS: dict[str, Any] = {"scale": 0.01, "n_sectors": 4, "targets_per_sector": 20}

SimFactory = Callable[..., MastSimulator]


def default_config(**knobs: Any) -> SimConfig:
    """The SimConfig a fixture uses for ``knobs``: the test defaults, overridden by ``knobs``."""
    return SimConfig(**{**DEFAULT_TEST_KNOBS, **knobs})


@contextmanager
def use_simulator(target: MastSimulator | str) -> Iterator[None]:
    """Point astroquery at a simulator (or base URL) for the block; restore everything after.

    astroquery freezes its URLs into ``PortalAPI`` class attributes at import, so leaving them
    pointed at a stopped simulator would break every later test. Its column-config cache is
    per process and its request cache is on disk: both are isolated here so nothing one test
    learned from one simulator leaks into another. (In 0.4.11 ``PortalAPI._request`` already
    passes ``cache=False``; switching ``cache_active`` off also covers other services.)
    """
    from astroquery import cache_conf
    from astroquery.mast import conf
    from astroquery.mast.discovery_portal import PortalAPI

    from ..sources import point_astroquery_at

    url = target.url if isinstance(target, MastSimulator) else target
    names = ("MAST_REQUEST_URL", "COLUMNS_CONFIG_URL", "MAST_DOWNLOAD_URL", "MAST_BUNDLE_URL")
    saved_urls = {name: getattr(PortalAPI, name) for name in names}
    saved_configs = PortalAPI._column_configs
    saved_server = conf.server
    saved_cache_active = cache_conf.cache_active
    try:
        cache_conf.cache_active = False
        point_astroquery_at(url)
        yield
    finally:
        for name, value in saved_urls.items():
            setattr(PortalAPI, name, value)
        PortalAPI._column_configs = saved_configs
        conf.server = saved_server
        cache_conf.cache_active = saved_cache_active


@pytest.fixture
def mast_sim() -> Iterator[SimFactory]:
    """Factory: ``mast_sim(**knobs)`` -> a started :class:`MastSimulator`, stopped at teardown.

    Pass ``config=SimConfig(...)`` to bypass the test defaults entirely.
    """
    started: list[MastSimulator] = []

    def factory(config: SimConfig | None = None, **knobs: Any) -> MastSimulator:
        if config is None:
            config = default_config()
        sim = MastSimulator(config, **knobs).start()
        started.append(sim)
        return sim

    yield factory
    for sim in reversed(started):
        sim.stop()


@pytest.fixture
def astroquery_mast(mast_sim: SimFactory) -> Iterator[SimFactory]:
    """Factory like ``mast_sim`` that also points astroquery at the simulator it starts.

    Only one simulator can own astroquery's URLs at a time; the last call wins, and teardown
    restores whatever astroquery pointed at before the test.
    """
    stack: list[Any] = []

    def factory(config: SimConfig | None = None, **knobs: Any) -> MastSimulator:
        sim = mast_sim(config, **knobs)
        ctx = use_simulator(sim)
        ctx.__enter__()
        stack.append(ctx)
        return sim

    yield factory
    for ctx in reversed(stack):
        ctx.__exit__(None, None, None)
