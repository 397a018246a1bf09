"""Ask a control helper to measure a target from an uncensored place.

The helper (``vantage control serve``) measures the target with the same engine and
sends back its measurement; analysis compares it with the probe's own to tell
censorship from a target that is simply down. Only the target is sent: no probe id,
no vantage point, no forwarding headers, and no proxy or netrc settings from the
environment (pass ``client=`` to route through a proxy deliberately). The helper
learns the probe's address from the TCP connection and nothing else.

Asking never raises: every failure comes back as :attr:`ControlResult.error`, so a
missing control is data for analysis, like any other failed step.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx

from probe import __version__
from schema import wire
from schema.model import Measurement, Target

API_CONTROL = "/api/v1/control"
#: The most a helper's answer may be: a measurement with every body kept is far less.
MAX_RESPONSE = 16 * 1024 * 1024


@dataclass(frozen=True)
class ControlResult:
    """The helper's measurement of the target, or why there is none."""

    measurement: Measurement | None
    error: str | None


def control_endpoint(url: str) -> str:
    """The control API URL for a helper's base URL (a full endpoint URL is kept)."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    if not path.endswith(API_CONTROL):
        path += API_CONTROL
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def _detail(body: bytes) -> str:
    """The helper's error text (FastAPI's ``{"detail": ...}``), else the start of the body."""
    try:
        detail = json.loads(body).get("detail")
    except (ValueError, AttributeError, RecursionError):
        detail = None
    text = detail if isinstance(detail, str) else body[:200].decode("utf-8", "replace")
    return text.strip()


async def _post(
    client: httpx.AsyncClient, endpoint: str, payload: bytes, headers: dict[str, str]
) -> tuple[int, bytes]:
    async with client.stream("POST", endpoint, content=payload, headers=headers) as response:
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > MAX_RESPONSE:
                raise ValueError(f"the answer is over {MAX_RESPONSE} bytes")
        return response.status_code, bytes(body)


def _measurement(status: int, body: bytes, target: Target) -> ControlResult:
    if status != 200:
        detail = _detail(body)
        return ControlResult(
            None, f"control helper answered HTTP {status}" + (f": {detail}" if detail else "")
        )
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        return ControlResult(None, f"control helper sent invalid JSON: {exc}")
    if not isinstance(doc, dict) or "measurement" not in doc:
        return ControlResult(None, "control helper sent no measurement")
    try:
        m = wire.from_wire(doc["measurement"])
    except wire.WireError as exc:
        return ControlResult(None, f"control helper sent an invalid measurement: {exc}")
    if wire.target_to_wire(m.target) != wire.target_to_wire(target):
        return ControlResult(None, "control helper measured a different target")
    return ControlResult(m, None)


async def ask_control(
    url: str,
    target: Target,
    *,
    token: str | None = None,
    timeout: float = 30.0,
    client: httpx.AsyncClient | None = None,
) -> ControlResult:
    """Have the helper at ``url`` measure ``target``; never raises (see ``error``).

    ``url`` is the helper's base URL (``https://control.example/``) or its
    ``/api/v1/control`` endpoint. ``timeout`` bounds the whole exchange.
    """
    endpoint = control_endpoint(url)
    payload = json.dumps({"target": wire.target_to_wire(target)}).encode("utf-8")
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json",
        "User-Agent": f"vantage/{__version__}",
    }
    if token:
        headers["Authorization"] = f"Bearer {token}"
    own = client is None
    http = client or httpx.AsyncClient(timeout=timeout, trust_env=False)
    try:
        async with asyncio.timeout(timeout):
            status, body = await _post(http, endpoint, payload, headers)
    except TimeoutError:
        return ControlResult(None, f"control helper timed out after {timeout:g} s")
    except httpx.TimeoutException as exc:
        return ControlResult(None, f"control helper timed out ({type(exc).__name__})")
    except httpx.HTTPError as exc:
        return ControlResult(None, f"control helper unreachable: {type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001 - asking must never raise (module docstring)
        return ControlResult(None, f"asking the control helper failed: {type(exc).__name__}: {exc}")
    finally:
        if own:
            await http.aclose()
    return _measurement(status, body, target)
