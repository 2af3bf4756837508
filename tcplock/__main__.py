"""``python -m tcplock``: the same as the ``tcplock`` command."""

import sys

from tcplock.cli import main

if __name__ == "__main__":
    sys.exit(main())
