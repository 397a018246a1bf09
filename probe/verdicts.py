"""Verdicts during a run: gather each measurement's controls, then judge it.

Control targets are measured first; other measurements wait for them so that an
offline vantage point is known before anything is called blocked. When a control
helper is configured it is asked about every target, concurrently with the run.
The judging itself is ``probe.analysis`` (pure); this module only does the I/O.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from probe.analysis import Controls, judge, offline
from probe.analysis.fingerprints import FingerprintDB
from probe.control import ControlResult, ask_control
from schema.model import Measurement, Target


class Analyser:
    """Judges measurements as they finish. One per run."""

    def __init__(
        self,
        targets: Sequence[Target],
        control_url: str = "",
        token: str = "",
        timeout: float = 30.0,
    ) -> None:
        self.expected_controls = sum(1 for t in targets if t.control)
        self.controls: list[Measurement] = []
        self.controls_done = asyncio.Event()
        if self.expected_controls == 0:
            self.controls_done.set()
        self.control_url, self.token, self.timeout = control_url, token or None, timeout
        self.fingerprints = FingerprintDB.builtin()
        self._asked: dict[tuple[str, str], asyncio.Task[ControlResult]] = {}

    def start(self, target: Target) -> None:
        """A measurement starts: ask the control helper now, in parallel with it."""
        if self.control_url and not target.control:
            ask = ask_control(self.control_url, target, token=self.token, timeout=self.timeout)
            self._asked[(target.service, target.id)] = asyncio.create_task(ask)

    @property
    def offline(self) -> bool | None:
        return offline(self.controls) if self.controls_done.is_set() else None

    async def analyse(self, m: Measurement) -> None:
        """Set ``m.verdict``. Called for every finished measurement, controls first."""
        if m.target.control:
            m.verdict = judge(m, Controls(fingerprints=self.fingerprints))
            self.controls.append(m)
            if len(self.controls) >= self.expected_controls:
                self.controls_done.set()
            return
        helper, error = None, None
        if self.control_url:
            result = await ask_control(
                self.control_url, m.target, token=self.token, timeout=self.timeout
            )
            helper, error = result.measurement, result.error
        await self.controls_done.wait()
        m.verdict = judge(m, Controls(self.offline, helper, error, self.fingerprints))

    def stop(self) -> None:
        """The run is ending: stop waiting for control targets that will not come."""
        self.controls_done.set()
