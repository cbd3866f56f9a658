"""The mirrored page-writing baseline and the write-amplification benchmark's engine side.
"""
