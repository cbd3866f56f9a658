"""The local cluster: data dir and port plan (launcher) and the control plane.
"""
