"""Sinks.

Where a finished image goes (Docker engine, OCI layout and archives, registry, build context).
"""
