"""Locks.

Their values, uv.lock and pylock.toml read and written, selection, staleness and the resolver.
"""
