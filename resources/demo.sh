#!/usr/bin/env bash
# The README's main command: build cryo and its test kernel, boot the test
# kernel with 2 vCPUs, let it run, save the whole VM to a file (which ends
# that VM process), restore the file in a new process and show the guest
# carrying on from where it was saved: its heartbeat numbers continue, its
# memory still verifies, it did not reboot.
#
# Usage: resources/demo.sh [SECONDS]   (seconds to run before and after; default 3)
set -euo pipefail
cd "$(dirname "$0")/.."

run_for="${1:-3}"
cargo build --release --quiet -p cryo -p cryo-test-kernel
kernel="$(cargo run --release --quiet -p cryo-test-kernel)"
cryo=./target/release/cryo

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
api="$work/api.sock"
image="$work/vm.img"

say() { printf '\n\033[1mdemo: %s\033[0m\n' "$*" >&2; }

say "booting the test kernel with 2 vCPUs (serial console below)"
"$cryo" run --kernel "$kernel" --vcpus 2 --mem-mib 256 \
    --cmdline "console=ttyS0 cryo.mem=64 cryo.hb_ms=500" --api "$api" &
vm=$!
sleep "$run_for"

say "saving the VM to $image"
"$cryo" save --api "$api" --to "$image"
wait "$vm"
"$cryo" inspect "$image" >&2

say "restoring it in a new process: heartbeats continue from the saved numbers"
"$cryo" restore --from "$image" --api "$api" &
vm=$!
sleep "$run_for"
"$cryo" quit --api "$api" >/dev/null
wait "$vm"
say "done: the restored VM ran and stopped cleanly"
