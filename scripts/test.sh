#!/usr/bin/env bash
# Install zseg with its test tools and run the whole test suite (slow tests included).
source "$(dirname "$0")/env.sh"
cd "$ROOT"
python -m pytest -n 2 -p no:cacheprovider "$@" tests
