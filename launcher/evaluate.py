"""Moved to :mod:`evidence.evaluate` (``python -m evidence.evaluate``); this alias stays for one release."""
import sys

from evidence.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
