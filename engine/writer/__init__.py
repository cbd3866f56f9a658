"""The writer's storage side: the quorum core (no I/O), the storage driver, recovery,
backtrack and time travel.
"""
