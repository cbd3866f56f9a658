"""The database engine proper: the redo-sink seam, mini-transactions, B+tree tables, the
buffer pool, transactions. It talks to storage only through the RedoSink seam; no grpc.
"""
