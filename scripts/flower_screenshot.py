"""Screenshot Flower's worker page ("Other" tab: the load and memory figures) with headless Chromium.

    python scripts/flower_screenshot.py http://127.0.0.1:5555 user:password docs/flower-worker-stats.png

Needs Debian's chromium and the playwright package (it drives /usr/bin/chromium; no browser download).
"""

from __future__ import annotations

import sys

from playwright.sync_api import sync_playwright


def main(url: str, auth: str, out: str) -> None:
    user, _, password = auth.partition(":")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"],
        )
        page = browser.new_page(http_credentials={"username": user, "password": password},
                                viewport={"width": 1400, "height": 1000})
        page.goto(f"{url}/workers")
        worker = page.locator("a[href^='/worker/']").first.get_attribute("href")
        page.goto(url + worker)
        page.locator("a[href='#tab-other']").click()
        page.wait_for_timeout(500)
        page.screenshot(path=out, full_page=True)
        browser.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
