"""imgbuild: reproducible container images for Python projects, driven by lockfiles."""

__version__ = "0.1.0"
