"""python3 -m apppot.snap, and the zipapp images carry as /usr/sbin/apppot-snap."""

import sys

from apppot.snap.cli import run

if __name__ == "__main__":
    sys.exit(run())
