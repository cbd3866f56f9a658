"""The instance process: its server, the redo stream to replicas, and the replica.
"""
