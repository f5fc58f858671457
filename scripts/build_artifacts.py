#!/usr/bin/env python
"""Same as the ortlora-build command: python scripts/build_artifacts.py --tiny --out artifacts/tiny"""

import sys

from ortlora.build.cli import main

if __name__ == "__main__":
    sys.exit(main())
