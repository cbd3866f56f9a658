"""aurora-lite compute side: formats, materialiser, B+tree engine, storage driver, client."""

__version__ = "0.1.0"
