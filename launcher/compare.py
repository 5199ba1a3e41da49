"""Moved to :mod:`evidence.compare` (``python -m evidence.compare``); this alias stays for one release."""
import sys

from evidence.compare import main

if __name__ == "__main__":
    sys.exit(main())
