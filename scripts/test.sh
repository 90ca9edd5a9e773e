#!/usr/bin/env bash
# Install zseg with its test tools and run the whole test suite (slow tests included).
source "$(dirname "$0")/env.sh"
cd "$ROOT"
# The QC report test renders qc/report.html in headless Chromium. Install it where we can
# (CI runs as root on a fresh Debian/Ubuntu machine); elsewhere that one test is skipped.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1 \
        && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    echo "zseg: installing chromium for the QC report test (apt-get)" >&2
    if ! { DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 \
            || { apt-get update >/dev/null 2>&1 \
                 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null 2>&1; }; }; then
        echo "zseg: could not install chromium; the QC screenshot test will be skipped" >&2
    fi
fi
python -m pytest -n 2 -p no:cacheprovider "$@" tests
