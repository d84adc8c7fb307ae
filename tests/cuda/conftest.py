"""tests/cuda calls the check functions of benchmarks/gpu_check.py itself: put benchmarks/ on sys.path."""

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
