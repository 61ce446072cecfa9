"""Render a run's report.html (or a sweep directory's sweep.html) in headless Chromium and save a PNG,
to look at what a person sees.

    python scripts/screenshot_report.py runs/quickstart [out.png]
    python scripts/screenshot_report.py runs/quickstart-rank-sweep [out.png]

Needs Chromium (Debian: apt-get install chromium). The page loads nothing from the network.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> int:
    run = Path(sys.argv[1])
    page = run / "report.html" if (run / "report.html").exists() else run / "sweep.html"
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else page.with_suffix(".png")
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        print("no Chromium found: apt-get install chromium", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
             f"--screenshot={out.resolve()}", "--window-size=1400,1100", page.resolve().as_uri()],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
