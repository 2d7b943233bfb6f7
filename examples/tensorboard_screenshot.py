"""Regenerate docs/tensorboard.png: what RepresentationMonitor shows in TensorBoard after the main job.

    python examples/tensorboard_screenshot.py [--log-dir runs/ssl_digits] [--out docs/tensorboard.png]

Needs Chromium (Debian: ``apt-get install chromium``) and the ``playwright`` Python package (it
drives that Chromium; no browser download). Without an existing ``--log-dir`` it first runs the
main job (``python examples/ssl_digits.py``, about a minute) into it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
TAGS = r"repr/val/(backbone|projector)/(rankme|normalized_std|lid|spectrum)$"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-dir", default="runs/ssl_digits")
    parser.add_argument("--out", default=os.path.join(HERE, "..", "docs", "tensorboard.png"))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--port", type=int, default=6199)
    args = parser.parse_args(argv)

    from playwright.sync_api import sync_playwright

    if not os.path.isdir(args.log_dir):
        subprocess.run([sys.executable, os.path.join(HERE, "ssl_digits.py"), "--log-dir", args.log_dir], check=True)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            args.log_dir,
            "--port",
            str(args.port),
            "--host",
            "127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{args.port}/?tagFilter={urllib.parse.quote(TAGS, safe='')}#timeseries"
    try:
        for _ in range(60):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{args.port}/", timeout=1)
                break
            except OSError:
                time.sleep(1)
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=args.chromium,
                args=[
                    "--no-sandbox",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                ],
            )
            page = browser.new_page(viewport={"width": 1500, "height": 1150})
            page.goto(url)
            page.wait_for_selector("text=Settings")
            close = page.locator("button[aria-label='Close settings']")
            if close.count():
                close.first.click()
            time.sleep(8)  # charts render asynchronously
            page.screenshot(path=args.out)
            browser.close()
    finally:
        server.terminate()
    print(f"wrote {args.out} from {args.log_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
