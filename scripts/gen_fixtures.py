#!/usr/bin/env python3
"""Generate the grid of parity fixtures from the installed swak (tch_mix_tools.fixtures).

    gen_fixtures.py [--out DIR] [--seed N]      (default: tests/fixtures, seed 0)
"""
import pathlib
import sys

from tch_mix_tools.fixtures import main_grid

if __name__ == "__main__":
    default = ["--out", str(pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures")]
    main_grid((default if "--out" not in sys.argv else []) + sys.argv[1:])
