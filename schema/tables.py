"""The SQL tables, as SQLAlchemy Core metadata, shared by probe and collector.

The same tables serve SQLite on the probe and PostgreSQL on the collector; JSON
columns become JSONB on PostgreSQL. Observations are rows of their own (queryable
by kind, address and failure) and keep their full wire record in ``data``; a
measurement row records how many observations it owns so a reader can tell a
complete measurement from a damaged one. Migrations live in ``schema/migrations``
and MUST be updated with any change here.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

metadata = sa.MetaData()

JSONType = sa.JSON().with_variant(JSONB(), "postgresql")

vantage_points = sa.Table(
    "vantage_points",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("fingerprint", sa.String(64), nullable=False, unique=True),
    sa.Column("probe_id", sa.String(36), nullable=False, index=True),
    sa.Column("asn", sa.Integer, nullable=False),
    sa.Column("cc", sa.String(2), nullable=False),
    sa.Column("network_name", sa.Text),
    sa.Column("network_type", sa.String(16)),
    sa.Column("resolver_ip", sa.String(64)),
    sa.Column("resolver_asn", sa.Integer, nullable=False),
    sa.Column("resolver_network_name", sa.Text),
    sa.Column("software_name", sa.String(32), nullable=False),
    sa.Column("software_version", sa.String(32), nullable=False),
    sa.Column("platform", sa.String(64), nullable=False),
    sa.Column("architecture", sa.String(32), nullable=False),
    # The probe's public IP: NULL unless privacy.store_ip (migration 0004).
    sa.Column("public_ip", sa.String(64)),
)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("run_id", sa.String(36), primary_key=True),
    sa.Column("suite", sa.String(64), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    # running | complete | interrupted | deadline
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("vantage_point_id", sa.Integer, sa.ForeignKey("vantage_points.id"), nullable=False),
    sa.Column("measurement_count", sa.Integer, nullable=False, default=0),
)

measurements = sa.Table(
    "measurements",
    metadata,
    sa.Column("measurement_uid", sa.String(36), primary_key=True),
    sa.Column("run_id", sa.String(36), sa.ForeignKey("runs.run_id"), nullable=False, index=True),
    sa.Column("vantage_point_id", sa.Integer, sa.ForeignKey("vantage_points.id"), nullable=False),
    sa.Column("data_format_version", sa.String(16), nullable=False),
    sa.Column("service", sa.String(64), nullable=False),
    sa.Column("target_id", sa.String(128), nullable=False),
    sa.Column("target_kind", sa.String(8), nullable=False),
    sa.Column("input", sa.Text, nullable=False),
    sa.Column("start_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("test_runtime", sa.Float, nullable=False),
    sa.Column("failure", sa.Text),
    sa.Column("observation_count", sa.Integer, nullable=False),
    sa.Column("target", JSONType, nullable=False),
    sa.Column("annotations", JSONType, nullable=False),
    # The verdict: accessible true/false/NULL; blocking "false", a kind, or NULL (cannot
    # tell); verdict the whole analysis (NULL: not analysed).
    sa.Column("accessible", sa.Boolean),
    sa.Column("blocking", sa.String(16)),
    sa.Column("verdict", JSONType),
    sa.Index("ix_measurements_service_time", "service", "start_time"),
    # The keyset order of the collector's query API and of exports.
    sa.Index("ix_measurements_time_uid", "start_time", "measurement_uid"),
)

#: Each service's status in each run: ok | blocked | partial | down | inconclusive.
run_services = sa.Table(
    "run_services",
    metadata,
    sa.Column("run_id", sa.String(36), sa.ForeignKey("runs.run_id"), primary_key=True),
    sa.Column("service", sa.String(64), primary_key=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("blocking", JSONType, nullable=False),  # the kinds of blocking seen
    sa.Column("blocked_targets", JSONType, nullable=False),
    sa.Column("explanation", sa.Text, nullable=False),
)

#: Blocking events: a block declared when it repeats across runs while controls pass,
#: ended when the service is reachable again.
events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("probe_id", sa.String(36), nullable=False),
    sa.Column("asn", sa.Integer, nullable=False),
    sa.Column("cc", sa.String(2), nullable=False),
    sa.Column("service", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # blocked | partial
    sa.Column("blocking", JSONType, nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("ended_at", sa.DateTime(timezone=True)),
    sa.Column("runs", JSONType, nullable=False),  # the run ids behind the start (and end)
    sa.Index("ix_events_open", "probe_id", "service", "ended_at"),
)

observations = sa.Table(
    "observations",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "measurement_uid",
        sa.String(36),
        sa.ForeignKey("measurements.measurement_uid", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("kind", sa.String(8), nullable=False),  # dns | tcp | tls | http
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("hostname", sa.Text),
    sa.Column("address", sa.String(64)),
    sa.Column("port", sa.Integer),
    sa.Column("failure", sa.Text),
    sa.Column("failed_operation", sa.String(16)),
    sa.Column("t0", sa.Float, nullable=False),
    sa.Column("t", sa.Float, nullable=False),
    sa.Column("data", JSONType, nullable=False),
    sa.UniqueConstraint("measurement_uid", "kind", "seq", name="uq_observation_seq"),
)

#: The probe's outbox: every stored measurement waits here until the collector has
#: acknowledged it (then its row goes; the measurement itself stays until retention).
outbox = sa.Table(
    "outbox",
    metadata,
    sa.Column(
        "measurement_uid",
        sa.String(36),
        sa.ForeignKey("measurements.measurement_uid", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("queued_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_error", sa.Text),
)

# -- the collector's own tables (migration 0005) ------------------------------------

#: Operator-issued tokens a volunteer enrolls a probe with. Only the SHA-256 of the
#: token is kept: the token itself is shown once, when it is created.
enroll_tokens = sa.Table(
    "enroll_tokens",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("label", sa.Text, nullable=False, server_default=""),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True)),
    sa.Column("max_uses", sa.Integer),  # NULL: unlimited
    sa.Column("uses", sa.Integer, nullable=False, server_default="0"),
    sa.Column("revoked_at", sa.DateTime(timezone=True)),
)

#: Enrolled probes: the SHA-256 of each probe's credential, and its fleet health
#: (last contact, last upload, outbox backlog, network). Never its address.
probes = sa.Table(
    "probes",
    metadata,
    sa.Column("probe_id", sa.String(36), primary_key=True),
    sa.Column("credential_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("token_id", sa.Integer, sa.ForeignKey("enroll_tokens.id"), nullable=False),
    sa.Column("enrolled_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("revoked_at", sa.DateTime(timezone=True)),
    sa.Column("last_seen_at", sa.DateTime(timezone=True)),
    sa.Column("last_upload_at", sa.DateTime(timezone=True)),
    sa.Column("backlog", sa.Integer),
    sa.Column("asn", sa.Integer),
    sa.Column("cc", sa.String(2)),
)

# -- the probe daemon's schedule (migration 0006) ------------------------------------

#: APScheduler 3's job store (``SQLAlchemyJobStore``, columns as it defines them): one
#: row per suite, its next run time and its pickled job. Kept in the probe's database
#: so that a restart does not reset the schedule. Empty on the collector.
daemon_jobs = sa.Table(
    "daemon_jobs",
    metadata,
    sa.Column("id", sa.Unicode(191), primary_key=True),
    sa.Column("next_run_time", sa.Float(25), index=True),
    sa.Column("job_state", sa.LargeBinary, nullable=False),
)
