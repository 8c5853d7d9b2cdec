"""sdistdep: parses its arguments with docopt (an sdist-only dependency).

Usage: sdistdep [--name NAME]
"""

import docopt


def main() -> None:
    args = docopt.docopt(__doc__)
    print(f"hello {args['--name'] or 'world'}")
