"""Vantage probe: measures reachability of messaging services and keeps the evidence."""

__version__ = "0.1.0"
