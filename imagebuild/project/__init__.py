"""The project.

Pyproject.toml, [tool.imgbuild] settings and uv workspaces, read and validated once.
"""
