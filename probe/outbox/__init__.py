"""The probe's outbox: measurements wait here until a collector has acknowledged them.

Every measurement the store writes is queued (``outbox`` table, same transaction).
The daemon runs :func:`upload_loop` beside its scheduler; ``vantage upload`` runs one
pass now; ``vantage enroll`` registers the probe with a collector first. An item
leaves the outbox only after the collector acknowledged its uid (accepted, or a
duplicate of what it has): a crash, a power cut or weeks without a network lose
nothing and duplicate nothing.

>>> e = enrollment(cfg)                # None until `vantage enroll`
>>> backlog(store)                     # measurements waiting
>>> sum(rejected_counts(store).values())  # rejected by the collector, kept here
>>> await upload_loop(cfg, store, stop)   # the daemon's uploader, until stop is set
"""

from probe.outbox.enrollment import (
    Enrollment,
    EnrollmentError,
    enroll,
    enrollment,
    enrollment_path,
)
from probe.outbox.queue import backlog, rejected_counts
from probe.outbox.upload import Outcome, UploadReport, upload_loop, upload_now

__all__ = [
    "Enrollment",
    "EnrollmentError",
    "Outcome",
    "UploadReport",
    "backlog",
    "enroll",
    "enrollment",
    "enrollment_path",
    "rejected_counts",
    "upload_loop",
    "upload_now",
]
