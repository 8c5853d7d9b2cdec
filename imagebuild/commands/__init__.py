"""The command line's parts beside ``cli.py``: the console reporter and the smaller commands.

Modules here sit at the CLI's stage: they may print, and ``cli.py`` imports them lazily.
"""
