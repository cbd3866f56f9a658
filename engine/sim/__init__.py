"""The deterministic simulation (step 11): the whole cluster in one process, on a virtual clock.

``aurora-lite sim`` (engine/cli/sim.py) is its only user. See engine/sim/run.py for one
schedule, ARCHITECTURE.md for where it plugs in, docs/reliability.md for what is real,
what is simulated and how to replay a seed. Nothing here imports grpc.
"""
