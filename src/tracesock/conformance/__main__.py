"""``python -m tracesock.conformance``: see :mod:`tracesock.conformance`."""

import sys

from tracesock.conformance import main

if __name__ == "__main__":
    sys.exit(main())
