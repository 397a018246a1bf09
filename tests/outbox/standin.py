"""A loopback stand-in for the collector's probe API, for answers a real collector never
gives (non-JSON, wrong shape, results for other uids, huge or endless bodies, 413, 429).

By default it behaves as collectors/API.md says: it checks the bearer credential,
decompresses the gzip body, keeps each measurement by uid and answers accepted or
duplicate (or rejected, for uids in :attr:`StandIn.reject`). A test programs a hostile
answer with :attr:`StandIn.on_upload`: a function of the request (:class:`Received`)
that returns a Starlette response, or None for the default behaviour.

It runs uvicorn in a thread on 127.0.0.1 and can be stopped and started again on the
same port (the collector going down and coming back).
"""

from __future__ import annotations

import asyncio
import gzip
import inspect
import json
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
import uvicorn
from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response


@dataclass
class Received:
    headers: dict[str, str]
    uids: list[str]
    docs: list[dict[str, Any]] = field(repr=False)


Handler = Callable[[Received], Response | None | Awaitable[Response | None]]


class StandIn:
    def __init__(self, *, keep: bool = True, tls: trustme.LeafCert | None = None) -> None:
        self.keep = keep  # False: remember uids only (benchmarks of large backlogs)
        self.tls = tls  # serve HTTPS with this certificate
        self.credential = "cred-" + uuid.uuid4().hex
        self.token = "token-" + uuid.uuid4().hex
        self.stored: dict[str, dict[str, Any]] = {}
        self.received: list[Received] = []
        self.enrolled: set[str] = set()
        self.reject: dict[str, str] = {}  # uid -> reason
        self.on_upload: Handler | None = None
        self.on_enroll: Callable[[dict[str, Any]], Response | None] | None = None
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.app = self._make_app()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def _make_app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/api/v1/enroll")
        async def enroll(request: Request) -> Response:
            body = await request.json()
            if self.on_enroll is not None:
                answer = self.on_enroll(body)
                if answer is not None:
                    return answer
            if body.get("token") != self.token:
                return JSONResponse({"error": "unknown token"}, status_code=401)
            if body["probe_id"] in self.enrolled:
                return JSONResponse({"error": "enrolled already"}, status_code=409)
            self.enrolled.add(body["probe_id"])
            return JSONResponse(
                {"probe_id": body["probe_id"], "credential": self.credential}, status_code=201
            )

        @app.post("/api/v1/measurements")
        async def measurements(request: Request) -> Response:
            raw = await request.body()
            if request.headers.get("content-encoding") == "gzip":
                raw = gzip.decompress(raw)
            docs = json.loads(raw)["measurements"]
            rec = Received(dict(request.headers), [d["measurement_uid"] for d in docs], docs)
            self.received.append(rec if self.keep else Received(rec.headers, rec.uids, []))
            if self.on_upload is not None:
                answer = self.on_upload(rec)
                if inspect.isawaitable(answer):
                    answer = await answer
                if answer is not None:
                    return answer
            return self.answer(rec)

        return app

    def answer(self, rec: Received) -> Response:
        """What a correct collector answers."""
        if rec.headers.get("authorization") != f"Bearer {self.credential}":
            return JSONResponse({"error": "unknown credential"}, status_code=401)
        results = []
        for doc in rec.docs:
            uid = doc["measurement_uid"]
            if uid in self.reject:
                results.append({"measurement_uid": uid, "status": "rejected",
                                "reason": self.reject[uid]})  # fmt: skip
            elif uid in self.stored:
                results.append({"measurement_uid": uid, "status": "duplicate"})
            else:
                self.stored[uid] = doc if self.keep else {}
                results.append({"measurement_uid": uid, "status": "accepted"})
        counts = {s: sum(r["status"] == s for r in results) for s in ("accepted", "duplicate")}
        counts["rejected"] = len(results) - sum(counts.values())
        return JSONResponse({**counts, "results": results})

    # -- running -------------------------------------------------------------------

    def start(self) -> StandIn:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        tls: dict[str, Any] = {}
        if self.tls is not None:
            pem = Path(tempfile.mkdtemp(prefix="standin-")) / "server.pem"
            self.tls.private_key_and_cert_chain_pem.write_to_path(str(pem))
            tls = {"ssl_certfile": str(pem)}
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", **tls)
        server = uvicorn.Server(config)
        self._server = server

        def run() -> None:
            asyncio.run(server.serve(sockets=[sock]))
            sock.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the stand-in collector did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._server.force_exit = True
            self._thread.join(10)
            self._server = self._thread = None

    def __enter__(self) -> StandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
