#!/usr/bin/env bash
# The README's main command: build cryo and its test kernel, boot the test
# kernel with 2 vCPUs, show its serial console (heartbeats and verification
# sweeps from both vCPUs) for a few seconds, then stop the VM cleanly.
#
# Usage: resources/demo.sh [SECONDS]   (default 5)
set -euo pipefail
cd "$(dirname "$0")/.."

run_for="${1:-5}"
cargo build --release --quiet -p cryo -p cryo-test-kernel
kernel="$(cargo run --release --quiet -p cryo-test-kernel)"

echo "demo: booting $kernel with 2 vCPUs for ${run_for}s" >&2
./target/release/cryo run --kernel "$kernel" --vcpus 2 --mem-mib 256 \
    --cmdline "console=ttyS0 cryo.mem=32 cryo.hb_ms=500" &
vm=$!
sleep "$run_for"
kill -INT "$vm"
wait "$vm"
echo "demo: VM stopped cleanly (exit status $?)" >&2
