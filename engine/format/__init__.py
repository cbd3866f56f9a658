"""Formats shared by the writer and storage: redo records, pages, the volume layout and
quorum constants, cluster.json, and the materialiser's twins. Imports no grpc, lmdb or asyncio.
"""
