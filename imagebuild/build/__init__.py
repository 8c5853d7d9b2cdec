"""Builds: PEP 517 environments and wheels of the project, local packages and sdists."""
