"""Entry point for ``python -m imagebuild``."""

from imagebuild.cli import app

app()
