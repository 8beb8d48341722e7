"""Render a run's report.html in headless Chromium and fail on any page error.

    python scripts/check_report.py runs/exp1/report.html [--png report.png] [--chromium /usr/bin/chromium]

Chromium comes from the distribution (`apt-get install chromium`); nothing is downloaded. The report is
self-contained, so it renders from `file://` with the network off. Exit status 0 when the page loaded,
rendered to PNG and logged no JavaScript or resource error.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("report", type=Path)
    ap.add_argument("--png", type=Path, default=None)
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    ap.add_argument("--size", default="1280,4000")
    args = ap.parse_args()
    png = args.png or args.report.with_suffix(".png")
    if not args.report.is_file():
        print(f"report check: {args.report} does not exist (run `slidemil report RUN` first)")
        return 2
    if shutil.which(args.chromium) is None and not Path(args.chromium).is_file():
        print(f"report check: no Chromium found ({args.chromium}); install it (`apt-get install chromium`) or pass "
              f"--chromium /path/to/chromium")
        return 2
    with tempfile.TemporaryDirectory() as profile:
        cmd = [args.chromium, *FLAGS, f"--user-data-dir={profile}", f"--window-size={args.size}",
               f"--screenshot={png.resolve()}", args.report.resolve().as_uri()]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    errors = [line for line in res.stderr.splitlines()
              if "CONSOLE" in line or "Failed to load resource" in line or "Uncaught" in line]
    if res.returncode != 0 or not png.exists() or png.stat().st_size < 10_000 or errors:
        print(f"report check FAILED (exit {res.returncode})", *errors, sep="\n")
        return 1
    print(f"report rendered without errors -> {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
