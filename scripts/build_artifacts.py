#!/usr/bin/env python
"""Same as the ortlora-build command: python scripts/build_artifacts.py --tiny --out artifacts/tiny"""

import sys

from ortlora._entry import build  # Ctrl-C at any moment is one line, as with the console command

if __name__ == "__main__":
    sys.exit(build())
