"""Moved to :mod:`evidence.export_hf` (``python -m evidence.export_hf``); this alias stays for one release."""
import sys

from evidence.export_hf import main

if __name__ == "__main__":
    sys.exit(main())
