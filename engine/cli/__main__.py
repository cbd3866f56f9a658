"""`python -m engine.cli`: the same as the `aurora-lite` command."""

from engine.cli import main

raise SystemExit(main())
