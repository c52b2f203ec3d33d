"""Floors on the ratios the benchmarks print (each ratio is against a baseline measured in the same run).

``--check`` makes a benchmark exit 1 when a ratio is below its floor; without it the verdicts are only printed.
``make bench`` passes ``--check``. Floors marked ``two_core=False`` need more cores than the 2-core CI machine
(they are printed there but not enforced unless ``--strict``).
"""

from __future__ import annotations

import argparse
import os
import sys


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--check", action="store_true", help="exit 1 when a ratio is below its floor")
    ap.add_argument("--strict", action="store_true", help="also enforce the floors that need more than 2 cores")


class Floors:
    def __init__(self, args: argparse.Namespace):
        self.check, self.strict = bool(args.check), bool(getattr(args, "strict", False))
        self.failed: list[str] = []
        self.small = (os.cpu_count() or 1) <= 2

    def ratio(self, name: str, value: float, floor: float, two_core: bool = True) -> bool:
        """Print the verdict of ``value >= floor``; remember a failure that counts on this machine."""
        ok = value >= floor
        counts = two_core or self.strict or not self.small
        note = "" if counts else " (not enforced on <= 2 cores)"
        print(f"floor  {name}: {value:.2f}x vs floor {floor:.2f}x -> {'ok' if ok else 'BELOW'}{note}", flush=True)
        if not ok and counts:
            self.failed.append(name)
        return ok

    def finish(self) -> None:
        if self.failed:
            print(f"below the floor: {', '.join(self.failed)}", flush=True)
            if self.check:
                sys.exit(1)
