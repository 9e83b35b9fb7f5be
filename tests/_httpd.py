"""Small real HTTP(S) servers for the security and bad-input tests.

The simulated MAST archive (``bulkfetch.testing``) covers the archive's behaviour; these cover
what it deliberately does not: recording every request's headers (did a token leak?), answering
with a redirect to another host, serving over HTTPS with a self-signed certificate. Each runs
an aiohttp app in a background thread on 127.0.0.1, like the simulator does.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from aiohttp import web

from bulkfetch.sources import DOWNLOAD_PATH
from bulkfetch.testing.catalog import Catalog, ProductInfo
from bulkfetch.testing.config import SimConfig
from bulkfetch.testing.fitsgen import product_body

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Server:
    """An aiohttp app served from a thread; ``requests`` records method, URL and headers."""

    def __init__(
        self,
        handler: Handler,
        *,
        ssl_context: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
        url_host: str | None = None,
    ) -> None:
        self.handler = handler
        self.ssl_context = ssl_context
        self.host = host
        #: Host name put in :attr:`url` (``localhost`` names the same socket as another host).
        self.url_host = url_host or host
        self.requests: list[dict[str, Any]] = []
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    async def _record(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(
            {"method": request.method, "path_qs": request.path_qs, "headers": dict(request.headers)}
        )
        return await self.handler(request)

    def start(self) -> Server:
        """Serve; returns once listening, with :attr:`url` set."""
        ready: Future[str] = Future()
        loop = asyncio.new_event_loop()
        self._loop = loop

        async def startup() -> str:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._record)
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
            await runner.setup()
            site = web.TCPSite(runner, self.host, 0, ssl_context=self.ssl_context)
            await site.start()
            self._runner = runner
            port = runner.addresses[0][1]
            scheme = "https" if self.ssl_context else "http"
            return f"{scheme}://{self.url_host}:{port}"

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                ready.set_result(loop.run_until_complete(startup()))
            except BaseException as exc:
                ready.set_exception(exc)
                return
            loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        self.url = ready.result(timeout=30)
        return self

    def stop(self) -> None:
        """Stop serving and join the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def header_values(self, name: str) -> list[str | None]:
        """The value of header ``name`` in every recorded request (None where absent)."""
        lowered = name.lower()
        return [
            next((v for k, v in r["headers"].items() if k.lower() == lowered), None)
            for r in self.requests
        ]


# -- what the servers serve ---------------------------------------------------------------------


def sample_products(n: int = 3, seed: int = 0) -> list[tuple[ProductInfo, bytes]]:
    """``n`` light curves of a tiny simulated catalog with their real (FITS) bodies."""
    catalog = Catalog(SimConfig(seed=seed, n_sectors=2, targets_per_sector=max(n, 2), scale=0.01))
    lcs = [p for p in catalog.iter_products(1) if p.kind == "LC"][:n]
    return [(p, product_body(p, seed)) for p in lcs]


def file_handler(bodies: dict[str, bytes]) -> Handler:
    """MAST's download endpoint over a fixed set of bodies (404 for other uris)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path.rstrip("/") != DOWNLOAD_PATH:
            return web.Response(status=404, text="not here\n")
        body = bodies.get(request.query.get("uri", ""))
        if body is None:
            return web.Response(status=404, text="File not found\n")
        return web.Response(body=body, content_type="application/fits")

    return handle


def redirect_handler(target: Callable[[], str]) -> Handler:
    """Answer every request with 302 to the same path and query on ``target()``."""

    async def handle(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(target() + request.path_qs)

    return handle


def product_table_rows(products: list[tuple[ProductInfo, bytes]]) -> dict[str, list[Any]]:
    """Columns of a product table (as ``get_product_list`` gives) for ``products``."""
    return {
        "obs_collection": ["TESS"] * len(products),
        "obs_id": [p.filename.rsplit("_", 1)[0] for p, _ in products],
        "dataURI": [p.uri for p, _ in products],
        "productFilename": [p.filename for p, _ in products],
        "size": [len(body) for _, body in products],
        "productSubGroupDescription": [p.kind for p, _ in products],
    }


# -- TLS ------------------------------------------------------------------------------------------


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost: (cert.pem, key.pem).

    Made with ``cryptography`` (installed with the test environment's dependencies).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bulkfetch test archive")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def server_tls(directory: Path) -> ssl.SSLContext:
    """A server-side TLS context with a fresh self-signed certificate."""
    cert, key = self_signed(directory)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context
