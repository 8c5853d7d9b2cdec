#!/usr/bin/env bash
# Print the image digest of each example, built from scratch (empty cache) the way
# benchmarks/build.py builds it (debian-slim, Python 3.11, --locked, an OCI layout) and on
# the default base: a change that must not change any image (a refactor) leaves every line
# the same. Needs the test engine and registry up (dev/infra.sh up).
#   bash benchmarks/digests.sh [IMGBUILD]   (default: .venv/bin/imgbuild of this checkout)
set -euo pipefail
cd "$(dirname "$0")/.."
imgbuild=${1:-$PWD/.venv/bin/imgbuild}
set -a; . /run/imgbuild-infra/env; set +a
export DOCKER_HOST=$IMGBUILD_TEST_DOCKER_HOST SOURCE_DATE_EPOCH=0
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
for example in fastapi-service numeric-analysis; do
    for base in debian-slim distroless; do
        cp -r "examples/$example" "$work/$example-$base"
        digest=$(UV_CACHE_DIR="$work/cache-$example-$base/uv" "$imgbuild" build \
            "$work/$example-$base" --base "$base" --python 3.11 --locked -q \
            --cache-dir "$work/cache-$example-$base" --output "oci:$work/oci-$example-$base" \
            | tail -n 1)
        echo "$example $base ${digest#digest: }"
    done
done
