#!/usr/bin/env python3
"""Generate the NaN/Inf parity fixtures (``nonfinite-*``) from the installed swak
(tch_mix_tools.fixtures).

    gen_nonfinite_fixtures.py [--out DIR] [--seed N]      (default: tests/fixtures, seed 0)
"""
import pathlib
import sys

from tch_mix_tools.fixtures import main_nonfinite

if __name__ == "__main__":
    default = ["--out", str(pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures")]
    main_nonfinite((default if "--out" not in sys.argv else []) + sys.argv[1:])
