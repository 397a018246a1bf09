"""Analysis: verdicts, service status and blocking events from observations.

Pure functions (ARCHITECTURE.md principle 2): no I/O here, so every rule is tested
with literal data. ``probe.verdicts`` gathers the controls during a run and calls these.
"""

from probe.analysis.events import Decision, RunStatus, decide
from probe.analysis.service import ServiceStatus, offline, service_status
from probe.analysis.verdict import Controls, judge

__all__ = [
    "Controls",
    "Decision",
    "RunStatus",
    "ServiceStatus",
    "decide",
    "judge",
    "offline",
    "service_status",
]
