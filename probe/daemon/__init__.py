"""The volunteer's daemon: measure on a schedule for months, unattended.

Modules, by role:

- ``commands``: ``vantage daemon``, ``vantage consent``, ``vantage status``;
- ``consent``: the risk notice and the volunteer's recorded acceptance;
- ``schedule``: each suite on its own randomised schedule (APScheduler), kept in the
  database across restarts;
- ``lifecycle``: the process: signals, reload, systemd notification, crash-loop
  back-off, the uploader beside the scheduler;
- ``runs``: what happens when a suite is due (consent, disk, residual gap, the run);
- ``retention``: pruning old rows and keeping SQLite compact;
- ``disk``: the low-disk guard;
- ``state``: the small state file ``vantage status`` reads while the daemon runs;
- ``notify``: the systemd notification socket;
- ``status``: what ``vantage status`` shows.

Importing this package imports nothing heavy: the daemon's memory is a budget
(idle under 60 MB on a Raspberry Pi).
"""
