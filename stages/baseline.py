"""DVC stage `baseline@<name>`: trains and evaluates one classic baseline on the split."""

import sys

from ttds_core.cli import run_stage

if __name__ == "__main__":
    run_stage("baseline", name=sys.argv[1])
