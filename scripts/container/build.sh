#!/usr/bin/env bash
# Build the zseg image with podman where no image registry is reachable (this project's CI):
# the base is a Debian bookworm made locally with debootstrap (cached under ~/.cache/zseg),
# imported as localhost/bookworm-base; the Dockerfile then installs Debian's python3 and zseg
# into a venv. Packages come through the registries' TLS proxy, whose CA is the host's bundle.
# Where a registry is reachable, `docker build -t zseg:VERSION .` (or podman build) is all.
#
#   bash scripts/container/build.sh            # -> localhost/zseg:VERSION
#
# Root and Debian's podman, runc and debootstrap are needed (CI installs them with apt-get);
# podman runs through runc-no-rlimits (beside this file), as this sandbox refuses setrlimit.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/pyproject.toml")"
CACHE="${ZSEG_CACHE:-$HOME/.cache/zseg}"
RUNTIME="$HERE/runc-no-rlimits"
CA="${ZSEG_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
podman() { command podman --runtime "$RUNTIME" "$@"; }

if ! podman image exists localhost/bookworm-base; then
    if [ ! -f "$CACHE/bookworm-base.tar" ]; then
        echo "zseg: making a Debian bookworm base with debootstrap (about 1 minute)" >&2
        rm -rf "$CACHE/bookworm-root"
        mkdir -p "$CACHE"
        debootstrap --variant=minbase bookworm "$CACHE/bookworm-root" >"$CACHE/debootstrap.log" 2>&1
        tar -C "$CACHE/bookworm-root" -cf "$CACHE/bookworm-base.tar.tmp" .
        mv "$CACHE/bookworm-base.tar.tmp" "$CACHE/bookworm-base.tar"
        rm -rf "$CACHE/bookworm-root"
    fi
    podman import "$CACHE/bookworm-base.tar" localhost/bookworm-base >/dev/null
fi

args=()
if [ -f "$CA" ]; then
    args+=(-v "$CA:/host-ca.crt:ro" --build-arg PIP_CERT=/host-ca.crt)
fi
# Earlier builds of this tag are left as dangling images, each as large as the image (~7 GB): a
# few rebuilds fill a CI disk ("no space left on device"). Drop them before building.
podman image prune -f >/dev/null 2>&1 || true
echo "zseg: building localhost/zseg:$VERSION with podman" >&2
podman build --format docker --network host "${args[@]}" --build-arg BASE_IMAGE=localhost/bookworm-base \
    -t "localhost/zseg:$VERSION" "$ROOT"
