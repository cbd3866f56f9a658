"""Chooses the materialiser implementation at import time: Cython if built, else Python.

``AURORA_LITE_PURE_PYTHON=1`` forces the pure-Python reference (engine/format/materialise_py.py)
even when the compiled twin (engine/format/_materialise_cy.pyx) is installed. Everything else in
aurora-lite imports the materialiser from here, never one implementation directly, so the
whole test suite runs against whichever is active.
"""

from __future__ import annotations

import logging
import os

from engine.format import materialise_py

log = logging.getLogger(__name__)

FORCE_PURE_PYTHON = os.environ.get("AURORA_LITE_PURE_PYTHON", "") not in ("", "0")

if FORCE_PURE_PYTHON:
    impl = materialise_py
else:
    try:
        from engine.format import _materialise_cy as impl  # type: ignore[attr-defined]
    except ImportError:  # built without a C compiler: the reference is the fallback
        log.debug("Cython materialiser not built; using the pure-Python twin")
        impl = materialise_py

IMPLEMENTATION: str = impl.IMPLEMENTATION
scan_batch = impl.scan_batch
scan_batch_run = impl.scan_batch_run
apply_to_pages = impl.apply_to_pages
apply = impl.apply
