"""The collector's dashboard: one page an operator or a journalist reads at a glance.

``GET /`` serves ``static/index.html``; its script (``static/dashboard.js``, plain
JavaScript, no library) reads the JSON read API (:mod:`collectors.query`) of the same
collector and draws blocking over time per service and network (an SVG chart with a
table of the same numbers), the open blocking events and the probe fleet's health.
Nothing is fetched from anywhere else, so the page works offline, and a strict
Content-Security-Policy forbids anything else (no inline script, no other origin).

The page's links are relative (``static/...``, ``api/v1/...``): it also works behind
a reverse proxy that serves the collector under a path prefix.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter, HTTPException, Response

router = APIRouter(tags=["dashboard"])

#: The files the page is made of, and their media types; nothing else is served.
STATIC = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@cache
def _read(name: str) -> bytes:
    return resources.files("collectors").joinpath("static", name).read_bytes()


@router.get("/", include_in_schema=False)
def index() -> Response:
    return Response(_read("index.html"), media_type="text/html; charset=utf-8",
                    headers=SECURITY_HEADERS)  # fmt: skip


@router.get("/static/{name}", include_in_schema=False)
def static(name: str) -> Response:
    media_type = STATIC.get(name)
    if media_type is None:
        raise HTTPException(status_code=404, detail=f"no such file: {name}")
    return Response(_read(name), media_type=media_type, headers=SECURITY_HEADERS)
