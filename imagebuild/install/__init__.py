"""Install.

Wheels fetched into the cache, layers planned, the venv staged and its bytecode compiled.
"""
