"""The local cluster: the data dir, ports and processes (launcher.py, ports.py) and the
control plane (control_plane.py, put together from state.py, supervision.py, failover.py,
endpoints.py, its gRPC service service.py and its client helper rpc.py).
"""
