"""The MAST API token: where it comes from, and the one rule for where it may go.

Proprietary (exclusive-access) TESS products need a MAST token. A token is a password: whoever
sees it can read the owner's data until it is revoked. So bulkfetch follows one rule, decided in
one function (:func:`token_allowed`) that the engine asks before every request, including every
hop of a redirect:

* the token is sent only over **HTTPS**, never in clear text;
* only to the **MAST host** (``mast.stsci.edu``) or a subdomain of it - never to a mirror, a
  proxy target, or a host a redirect points to (the engine also drops it on any redirect that
  leaves the original origin, so a compromised or misconfigured redirect cannot harvest it);
* it is **never stored**: not in the job state, the manifest, the export, nor any log line.
  :class:`~bulkfetch.fetch.FetchOptions` keeps it out of its ``repr`` and :func:`redact`
  scrubs it from any text that might echo a header.

Where the token comes from, in astroquery's order: an explicit value, the ``MAST_API_TOKEN``
environment variable (astroquery's own name), or the session of an ``Observations.login()``
already done in this process (astroquery keeps it as the ``mast_token`` cookie). The keyring is
not read: a download tool silently pulling secrets from a keyring surprises people.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

#: The real archive's host. A token goes to it or its subdomains, nowhere else.
MAST_HOST = "mast.stsci.edu"
#: astroquery's environment variable for the token (``astroquery.mast.auth``).
TOKEN_ENV = "MAST_API_TOKEN"
#: Name of the cookie in which astroquery keeps the token of a logged-in session.
TOKEN_COOKIE = "mast_token"


def find_token(environ: Mapping[str, str] | None = None) -> str | None:
    """The MAST token to use, or None: ``$MAST_API_TOKEN``, else astroquery's logged-in session.

    astroquery is not imported for this: if the program never imported it, nobody logged in.
    """
    env = os.environ if environ is None else environ
    token = env.get(TOKEN_ENV, "").strip()
    if token:
        return token
    return _astroquery_session_token()


def _astroquery_session_token() -> str | None:
    """The token of ``Observations.login()`` in this process, if any."""
    if "astroquery.mast" not in sys.modules:
        return None
    try:
        from astroquery.mast import Observations

        value = Observations._session.cookies.get(TOKEN_COOKIE)
    except Exception:  # an astroquery that keeps it elsewhere: no token rather than a crash
        return None
    text = str(value).strip() if value else ""
    return text or None


def host_matches(host: str, allowed: str) -> bool:
    """``host`` is ``allowed`` or one of its subdomains (``x.mast.stsci.edu``), case-insensitive.

    A plain suffix test would accept ``evilmast.stsci.edu`` or ``mast.stsci.edu.evil.com``;
    the dot boundary and the exact end rule both out.
    """
    host = host.lower().rstrip(".")
    allowed = allowed.lower().rstrip(".")
    return bool(host) and (host == allowed or host.endswith("." + allowed))


def token_allowed(url: str, hosts: Sequence[str] = (MAST_HOST,)) -> bool:
    """Whether a request to ``url`` may carry the MAST token: HTTPS to a MAST host only.

    URLs with credentials in them (``https://user@host``) are refused too: they are a classic
    way to make a URL look like it goes to one host while it goes to another.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        return False
    if parts.scheme.lower() != "https" or parts.username is not None:
        return False
    return any(host_matches(host, allowed) for allowed in hosts)


def auth_headers(
    url: str, token: str | None, hosts: Sequence[str] = (MAST_HOST,)
) -> dict[str, str]:
    """The header carrying ``token`` for a request to ``url``, or nothing when it must not go.

    MAST's download API accepts ``Authorization: token <T>``.
    """
    if not token or not token_allowed(url, hosts):
        return {}
    return {"Authorization": f"token {token}"}


def redact(text: str, token: str | None) -> str:
    """``text`` with every occurrence of ``token`` replaced, for anything that might be logged."""
    if not token:
        return text
    return text.replace(token, "<MAST token>")


__all__ = [
    "MAST_HOST",
    "TOKEN_COOKIE",
    "TOKEN_ENV",
    "auth_headers",
    "find_token",
    "host_matches",
    "redact",
    "token_allowed",
]
