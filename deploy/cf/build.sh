#!/usr/bin/env bash
# Builds the app directory `cf push` uploads: one statically linked brokerage binary, so it
# runs on cflinuxfs4 (glibc 2.35) whatever glibc it was built against.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked \
  --target x86_64-unknown-linux-gnu --target-dir target/static
mkdir -p deploy/cf/app
cp target/static/x86_64-unknown-linux-gnu/release/brokerage deploy/cf/app/brokerage
echo "deploy/cf/app/brokerage is ready for cf push"
