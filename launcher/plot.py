"""Moved to :mod:`evidence.plot` (``python -m evidence.plot``); this alias stays for one release."""
import sys

from evidence.plot import main

if __name__ == "__main__":
    sys.exit(main())
