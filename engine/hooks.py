"""TEMPORARY shim until the hooks module lands (branch store): fault-file state."""
from engine.chaos.faults import FaultState, state_for  # noqa: F401
