"""Vantage's server side: the control helper (and, later, ingest and query APIs).

May import ``schema`` and ``probe``'s engine; ``probe`` never imports this package.
FastAPI and uvicorn are optional (``pip install 'vantage-probe[collector]'``), so
nothing here imports them at package import time.
"""
