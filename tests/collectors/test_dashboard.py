"""The dashboard in a real browser: headless Chromium loads ``/`` from a real uvicorn
server on loopback and the test reads what the page shows.

The chart's series and points, the open event's row and the probes' rows must match
the seeded data; a hostile service name must stay text; the page fetches nothing
from anywhere but its own collector (Chromium runs with networking features off, and
the server's access log lists every request the page made).
"""

from __future__ import annotations

import datetime as dt
import html.parser
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import uvicorn
from fastapi import FastAPI, Request

from collectors import dashboard, query
from probe.export.pseudonym import Pseudonymizer
from probe.store import Store
from schema import tables
from tests.collectors.test_query import PROBES, make_measurement, seed_probes, store_runs, vantage

CHROMIUM = "/usr/bin/chromium"
UTC = dt.UTC
HOSTILE_SERVICE = '<img src=x onerror="document.title=1">'


def app_with_both_routers(engine: sa.Engine, key_file: Path) -> FastAPI:
    """The read API and the dashboard, as the public sees them: probes by pseudonym."""
    app = FastAPI()
    app.state.engine = engine
    app.state.settings = SimpleNamespace(pseudonym_key_file=str(key_file), operator_token_file="")
    app.include_router(query.router)
    app.include_router(dashboard.router)
    return app


class Requests:
    """Every path the server was asked for, recorded by a middleware."""

    def __init__(self, app: FastAPI) -> None:
        self.paths: list[str] = []

        @app.middleware("http")
        async def record(request: Request, call_next: Any) -> Any:
            self.paths.append(request.url.path)
            return await call_next(request)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, dict[str, Any], Requests]]:
    """A collector database with a week of data, served on loopback."""
    store = Store.open(f"sqlite:///{tmp_path / 'collector.db'}", outbox=False)
    today = dt.datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    a, b = vantage(*PROBES[0]), vantage(*PROBES[2])
    runs = []
    plan = {  # days ago -> (whatsapp verdicts on A, signal verdicts on B)
        3: ([False, False, False, False], ["dns", False]),
        2: (["tcp_ip", False, False, False], ["dns", "dns"]),
        1: (["tcp_ip", "tcp_ip", False, None], ["dns", "dns"]),
        0: (["tcp_ip", "tcp_ip", "tcp_ip", "unanalysed"], [False, False]),
    }
    for ago, (wa, sig) in plan.items():
        day = today - dt.timedelta(days=ago)
        for v, service, verdicts in ((a, "whatsapp", wa), (b, "signal", sig)):
            run_id = str(uuid.uuid4())
            ms = [make_measurement(str(uuid.uuid4()), run_id, v, service,
                                   day + dt.timedelta(minutes=k), verdict, target_id=f"t{k}")
                  for k, verdict in enumerate(verdicts)]  # fmt: skip
            runs.append((run_id, v, day, ms))
    # A hostile name, blocked, so it is drawn: it must show as text, never as markup.
    rid = str(uuid.uuid4())
    runs.append((rid, b, today, [make_measurement(str(uuid.uuid4()), rid, b, HOSTILE_SERVICE,
                                                  today, "dns")]))  # fmt: skip
    store_runs(store, runs)
    now = dt.datetime.now(UTC).replace(microsecond=0)
    seed_probes(store.engine, now)
    with store.engine.begin() as conn:
        conn.execute(tables.events.insert(), [
            {"probe_id": b.probe_id, "asn": b.asn, "cc": b.cc, "service": "signal",
             "status": "blocked", "blocking": ["dns"], "started_at": today - dt.timedelta(days=2),
             "ended_at": None, "runs": ["r1", "r2"]},
            {"probe_id": a.probe_id, "asn": a.asn, "cc": a.cc, "service": "telegram",
             "status": "blocked", "blocking": ["tls"], "started_at": today - dt.timedelta(days=9),
             "ended_at": today - dt.timedelta(days=8), "runs": ["r3", "r4", "r5"]},
        ])  # fmt: skip
    key = tmp_path / "pseudonym.key"
    expected = {"today": today, "a": a, "b": b, "plan": plan,
                "shown": Pseudonymizer.from_key_file(key)}  # fmt: skip

    app = app_with_both_routers(store.engine, key)
    requests = Requests(app)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", expected, requests
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        store.close()


def dump_dom(url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran, as headless Chromium serialises it."""
    if not os.access(CHROMIUM, os.X_OK) and shutil.which("chromium") is None:
        pytest.skip(f"no Chromium at {CHROMIUM}: the dashboard is tested in a real browser")
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-extensions", "--disable-dev-shm-usage",
            f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom", url]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class Page(html.parser.HTMLParser):
    """The parts of the page a reader looks at: every element's attributes, the text
    of table rows, and the chart's series and points."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.stack: list[tuple[str, dict[str, str]]] = []
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.rows: dict[str, list[list[str]]] = {}
        self.cells: list[str] | None = None
        self.table: str | None = None
        self.series: dict[str, list[dict[str, str]]] = {}
        self.text: dict[str, str] = {}
        self.raw = text
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.append((tag, a))
        if tag not in ("img", "meta", "link", "br", "hr", "input", "col", "wbr", "source"):
            self.stack.append((tag, a))
        if tag == "table":
            self.table = a.get("id", "")
            self.rows.setdefault(self.table, [])
        elif tag == "tr" and self.table is not None:
            self.cells = []
        elif tag in ("td", "th") and self.cells is not None:
            self.cells.append("")
        elif tag == "circle":
            group = next(
                (s for t, s in reversed(self.stack) if t == "g" and "data-series" in s), None
            )
            if group is not None:
                self.series.setdefault(group["data-series"], []).append(a)
        elif tag == "g" and "data-series" in a:
            self.series.setdefault(a["data-series"], [])
        if "id" in a:
            self.text[a["id"]] = ""

    def handle_endtag(self, tag: str) -> None:
        while self.stack and self.stack[-1][0] != tag:
            self.stack.pop()
        if self.stack:
            self.stack.pop()
        if tag == "tr" and self.cells is not None and self.table is not None:
            self.rows[self.table].append([c.strip() for c in self.cells])
            self.cells = None
        elif tag == "table":
            self.table = None

    def handle_data(self, data: str) -> None:
        if self.cells:
            self.cells[-1] += data
        for _, a in self.stack:
            if "id" in a:
                self.text[a["id"]] = self.text.get(a["id"], "") + data


def test_the_dashboard_shows_blocking_events_and_the_fleet(
    served: tuple[str, dict[str, Any], Requests], tmp_path: Path
) -> None:
    url, expected, requests = served
    page = Page(dump_dom(url + "/", tmp_path / "profile"))
    today: dt.datetime = expected["today"]
    day = lambda ago: (today - dt.timedelta(days=ago)).strftime("%Y-%m-%d")  # noqa: E731
    assert ("body", {"data-loaded": "yes"}) in page.tags, page.text.get("status")

    # The chart: one series per service and network that saw blocking, a point per day
    # with measurements, carrying the blocked and measured counts.
    wa, sig = "whatsapp on AS64500 (DE)", "signal on AS64502 (IR)"
    assert set(page.series) == {wa, sig, f"{HOSTILE_SERVICE} on AS64502 (IR)"}
    points = {name: [(p["data-day"], int(p["data-blocked"]), int(p["data-total"])) for p in pts]
              for name, pts in page.series.items()}  # fmt: skip
    plan = expected["plan"]

    def blocked(verdicts: list[Any]) -> int:
        return sum(1 for v in verdicts if v not in (False, None, "unanalysed"))

    assert points[wa] == [
        (day(ago), blocked(plan[ago][0]), len(plan[ago][0])) for ago in (3, 2, 1, 0)
    ]
    assert points[sig] == [
        (day(ago), blocked(plan[ago][1]), len(plan[ago][1])) for ago in (3, 2, 1, 0)
    ]
    assert points[wa][-1] == (day(0), 3, 4)
    # Its text equivalent: the chart's description and the table of the same numbers.
    assert (
        "whatsapp on AS64500 (DE): 6 of 16 measurements blocked, at most 75% on " + day(0)
        in page.text["chart-desc"]
    )
    table = page.rows["series-table"]
    assert ["whatsapp", "AS64500 (DE)", day(1), "2", "4", "50%"] in table
    assert ["signal", "AS64502 (IR)", day(2), "2", "2", "100%"] in table

    # The open event (not the ended one), with its network and probe.
    (header, *events) = page.rows["events"]
    assert header == ["Service", "Status", "How it is blocked", "Network", "Probe", "Since"]
    assert len(events) == 1
    service, status, how, network, probe, since = events[0]
    assert (service, status, how, network) == ("signal", "blocked", "DNS", "AS64502 (IR)")
    shown = expected["shown"]  # the public sees pseudonyms (collectors.access)
    assert probe == shown(PROBES[2][0])[:8] and since.startswith(day(2) + " 00:00 UTC")

    # The fleet: last seen and backlog, and the state an operator acts on.
    (header, *probes) = page.rows["probes"]
    assert header == ["Probe", "Network", "Last seen", "Backlog", "State"]
    by_probe = {row[0]: row for row in probes}
    assert len(probes) == 4
    first = by_probe[shown(PROBES[0][0])[:8]]
    assert (
        first[1] == "AS64500 (DE)"
        and first[2].endswith("(2 min ago)")
        and first[3:] == ["0", "active"]
    )
    assert by_probe[shown(PROBES[1][0])[:8]][3:] == ["1234", "silent for over a day"]
    assert by_probe[shown(PROBES[2][0])[:8]][4] == "revoked"
    assert by_probe[shown("44444444-4444-4444-8444-444444444444")[:8]][1:] == [
        "unknown",
        "never",
        "unknown",
        "never seen",
    ]
    assert "1 blocking event open: signal on AS64502 (IR)" in page.text["status"]

    # The hostile name is text: no element came out of it, and the title is untouched.
    assert not [a for t, a in page.tags if t == "img"]
    assert "<title>Vantage: blocking of messaging services</title>" in page.raw
    assert [HOSTILE_SERVICE, "AS64502 (IR)", day(0), "1", "1", "100%"] in table
    # The page asked its own collector only: for itself, its three files and three APIs.
    asked = sorted({p.split("?")[0] for p in requests.paths})
    assert asked == ["/", "/api/v1/aggregates", "/api/v1/events", "/api/v1/probes",
                     "/static/dashboard.css", "/static/dashboard.js", "/static/favicon.svg"]  # fmt: skip


def test_the_page_and_its_files_are_served_with_a_strict_policy(
    served: tuple[str, dict[str, Any], Requests],
) -> None:
    url, _, _ = served
    with httpx.Client(base_url=url) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "default-src 'none'" in policy
        assert "<h1>Blocking of messaging services</h1>" in page.text
        assert "<caption>" in page.text and 'role="img"' in page.text
        assert "http://" not in page.text.replace('xmlns="http://www.w3.org/2000/svg"', "")
        js = client.get("/static/dashboard.js")
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
        assert "innerHTML" not in js.text and 'fetch("http' not in js.text
        assert client.get("/static/dashboard.css").status_code == 200
        for name in ("../query.py", "index.html", "..%2Fquery.py", "nope.js"):
            assert client.get(f"/static/{name}").status_code == 404, name
