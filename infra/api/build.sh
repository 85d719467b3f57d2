#!/usr/bin/env bash
# Build the API function's zip: this handler, the sdworker package (for its job model) and the
# two libraries the model needs, pydantic and pluggy, as wheels for the Lambda runtime
# (python3.12 on arm64, as pipeline.yaml declares). No boto3: the runtime provides it.
#
#   infra/api/build.sh [OUT.zip]        # default: build/sdworker-api.zip
#
# Run from anywhere with python3 and pip (network access to PyPI). Then upload the zip and give
# its bucket and key to pipeline.yaml (LambdaCodeBucket, LambdaCodeKey): see docs/deploy.md.
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
out="$(realpath -m "${1:-$root/build/sdworker-api.zip}")"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT

python3 -m pip install --quiet --target "$stage" \
    --platform manylinux2014_aarch64 --implementation cp --python-version 3.12 \
    --only-binary=:all: 'pydantic>=2.7,<3' 'pluggy>=1.5,<2'
python3 -m pip install --quiet --target "$stage" --no-deps "$root"
cp "$root/infra/api/sdworker_api.py" "$stage/"
# The wheel also carries the backend plugins and console scripts; the API needs neither.
rm -rf "$stage"/sdworker_a1111 "$stage"/sdworker_comfyui "$stage"/sdworker_diffusers "$stage/bin"
find "$stage" -name '__pycache__' -type d -prune -exec rm -rf {} +

mkdir -p "$(dirname "$out")"
rm -f "$out"
(cd "$stage" && python3 -m zipfile -c "$out" .)
echo "$out"
