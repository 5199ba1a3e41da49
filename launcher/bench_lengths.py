"""Moved to :mod:`evidence.bench_lengths` (``python -m evidence.bench_lengths``); this alias stays for one release."""
import sys

from evidence.bench_lengths import main

if __name__ == "__main__":
    sys.exit(main())
