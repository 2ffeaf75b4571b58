"""Wall-clock time of the demo (the main job) on the embedded data, step by step.

    python bench/demo.py [--data data/fashion-mnist] [--out /tmp/logitguard-demo]

Target: the whole demo in at most 3 minutes on a 2-core machine. Figures only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from logitguard.report.demo import run_demo  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "data" / "fashion-mnist"))
    parser.add_argument("--out", default=None, help="Report directory (default: a temporary one).")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="logitguard-demo-"))
    start = time.perf_counter()
    run_demo(args.data, out, overwrite=True, log=print)
    total = time.perf_counter() - start
    print(f"\ndemo: {total:.1f} s in all (target <= 180 s); report in {out}")


if __name__ == "__main__":
    main()
