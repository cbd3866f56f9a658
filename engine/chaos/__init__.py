"""Reliability tooling: fault injection, the nemesis, and the chaos workload checkers.
"""
