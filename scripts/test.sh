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
# The container tests build the image with podman from a local Debian base (no registry is
# reachable in CI): root with apt-get installs podman, runc and debootstrap, then
# scripts/container/build.sh builds localhost/zseg:VERSION (about 6 minutes the first time; a
# code change rebuilds one small layer). Elsewhere the container tests are skipped.
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    if ! command -v podman >/dev/null 2>&1 || ! command -v runc >/dev/null 2>&1 \
            || ! command -v debootstrap >/dev/null 2>&1; then
        echo "zseg: installing podman, runc and debootstrap for the container tests (apt-get)" >&2
        { apt-get update >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y \
            podman runc debootstrap >/dev/null 2>&1; } \
            || echo "zseg: could not install podman; the container tests will fail in CI" >&2
    fi
    if command -v podman >/dev/null 2>&1; then
        mkdir -p "$HOME/.cache/zseg"
        echo "zseg: building the image for the container tests (log: ~/.cache/zseg/image-build.log)" >&2
        bash scripts/container/build.sh >"$HOME/.cache/zseg/image-build.log" 2>&1 \
            || echo "zseg: the image build failed (see ~/.cache/zseg/image-build.log)" >&2
    fi
fi
python -m pytest -n 2 -p no:cacheprovider "$@" tests
