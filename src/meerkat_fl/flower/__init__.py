"""Meerkat as a Flower app: thin adapters over ``meerkat_fl.fed`` (the same Server and Client objects).

``server_app`` and ``client_app`` import flwr; ``node``, ``worker``, ``launch`` and ``tls`` do not, so the
core package and the `meerkat` CLI import without the ``[flower]`` extra installed.
The app directory Flower bundles (its pyproject.toml) is ``APP_DIR``.
"""

from __future__ import annotations

from pathlib import Path

APP_DIR = Path(__file__).resolve().parent / "app"
