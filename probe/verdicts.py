"""Verdicts during a run: gather each measurement's controls, then judge it.

Control targets are measured first; other measurements wait for them so that an
offline vantage point is known before anything is called blocked. When a control
helper is configured it is asked about each target as the measurement starts, in
parallel with it. The judging itself is ``probe.analysis`` (pure); this module only
does the waiting and the asking.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from probe.analysis import Controls, judge, offline
from probe.analysis.fingerprints import FingerprintDB
from probe.control import ControlResult, ask_control
from probe.geoip import GeoIP, annotate_answers
from schema.model import Measurement, Target


class Analyser:
    """Judges measurements as they finish. One per run."""

    def __init__(
        self,
        targets: Sequence[Target],
        control_url: str = "",
        token: str = "",
        timeout: float = 30.0,
        geo: GeoIP | None = None,
        fingerprints: FingerprintDB | None = None,
    ) -> None:
        self.expected_controls = sum(1 for t in targets if t.control)
        self.controls: list[Measurement] = []
        self.controls_done = asyncio.Event()
        self._offline: bool | None = None
        if self.expected_controls == 0:
            self.controls_done.set()
        self._stopped = asyncio.Event()
        self.control_url, self.token, self.timeout = control_url, token or None, timeout
        self.fingerprints = fingerprints if fingerprints is not None else FingerprintDB.builtin()
        #: Places the control helper's answers in their networks, as the probe's own
        #: are (the helper may run without a database); None: no ASN database.
        self.geo = geo if geo is not None and geo.has_asn else None
        self._asked: dict[tuple[str, str], asyncio.Task[ControlResult]] = {}

    @property
    def offline(self) -> bool | None:
        """Whether the control targets failed: fixed once they are all in."""
        return self._offline

    def _controls_in(self) -> None:
        if not self.controls_done.is_set():
            self._offline = offline(self.controls)
            self.controls_done.set()

    def start(self, target: Target) -> None:
        """A measurement starts: ask the control helper now, in parallel with it."""
        if self.control_url and not target.control:
            ask = ask_control(self.control_url, target, token=self.token, timeout=self.timeout)
            self._asked[(target.service, target.id)] = asyncio.create_task(ask)

    async def analyse(self, m: Measurement) -> None:
        """Set ``m.verdict``. Called for every finished measurement, controls first."""
        if m.target.control:
            m.verdict = judge(
                m, Controls(fingerprints=self.fingerprints, asn_db=self.geo is not None)
            )
            self.controls.append(m)
            if len(self.controls) >= self.expected_controls:
                self._controls_in()
            return
        asked = self._asked.pop((m.target.service, m.target.id), None)
        await self.controls_done.wait()
        helper, error = None, None
        if asked is not None and self.offline:
            asked.cancel()  # offline: nothing will be called blocked, no need to wait
        elif asked is not None:
            stopped = asyncio.ensure_future(self._stopped.wait())
            done, _ = await asyncio.wait({asked, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if asked in done:
                helper, error = asked.result().measurement, asked.result().error
            else:
                asked.cancel()
                error = "the run was stopped before the control helper answered"
        if helper is not None:
            annotate_answers(helper.queries, self.geo)
        m.verdict = judge(
            m,
            Controls(self.offline, helper, error, self.fingerprints, asn_db=self.geo is not None),
        )

    def stop(self) -> None:
        """The run is ending: judge with the control targets that came in, and stop
        waiting for the control helper."""
        self._controls_in()
        self._stopped.set()

    async def aclose(self) -> None:
        """Cancel helper requests nobody will read (targets never finished)."""
        tasks = list(self._asked.values())
        self._asked.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
