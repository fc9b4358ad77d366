#!/usr/bin/env python3
"""Fixed-ram save and restore of a large guest: save time, eager restore time,
lazy time to resume, and how long the guest takes to get back to its normal
work rate after each kind of restore (with and without prefetch).

Usage: resources/bench/fixed-ram-restore.py [--mem-mib 2048] [--fill-mib 1536] [--dir DIR] [--no-drop-caches]

The guest is the test kernel in verify mode: each vCPU fills its share, then
rewrites random pages and verifies pages continuously, printing a heartbeat
every 200 ms with its running counts. Its "rate" is pages verified per
heartbeat interval. Page caches are dropped before each restore (as root), so
restores read from the disk. Uses target/release/cryo.
"""
import argparse, json, os, re, socket, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CRYO = os.path.join(ROOT, "target/release/cryo")
HB_MS = 200


def kernel():
    return subprocess.check_output(["cargo", "run", "--release", "-q", "-p", "cryo-test-kernel"], cwd=ROOT, text=True).strip()


def wait_socket(path, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        try:
            s = socket.socket(socket.AF_UNIX); s.connect(path); s.close(); return
        except OSError:
            time.sleep(0.005)
    raise SystemExit("no API socket at " + path)


def num(line, key):
    m = re.search(r"\b%s=(\d+)" % key, line)
    return int(m.group(1)) if m else None


class Console:
    """Reads heartbeat lines and turns them into per-interval verify rates."""

    def __init__(self, proc, vcpus):
        self.p, self.vcpus, self.last = proc, vcpus, {}

    def beats(self, n_intervals, timeout=300):
        """Returns a list of (time, summed rate over vCPUs) per heartbeat round."""
        rates, pending, end = [], {}, time.time() + timeout
        while len(rates) < n_intervals and time.time() < end:
            line = self.p.stdout.readline()
            if not line:
                break
            if "MISMATCH" in line:
                raise SystemExit("guest reported " + line)
            if not line.startswith("HB ") or "errors=" not in line:
                continue
            cpu, verified = num(line, "cpu"), num(line, "verified")
            if cpu in self.last:
                pending[cpu] = verified - self.last[cpu]
            self.last[cpu] = verified
            if len(pending) == self.vcpus:
                rates.append((time.time(), sum(pending.values())))
                pending = {}
        return rates


def drop_caches(enabled):
    if enabled and os.geteuid() == 0:
        subprocess.run(["sync"])
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")


def restore(img, extra, normal, vcpus, drop):
    drop_caches(drop)
    api = img + ".r.sock"
    t0 = time.time()
    p = subprocess.Popen([CRYO, "restore", "--from", img, "--api", api] + extra,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    resumed_ms = None
    # The first stderr line reports the time to resume.
    line = p.stderr.readline()
    m = re.search(r"resumed after ([\d.]+) ms", line)
    if m:
        resumed_ms = float(m.group(1))
    con = Console(p, vcpus)
    back = None
    rates = con.beats(200, timeout=120)
    for t, r in rates[1:]:
        if r >= 0.9 * normal:
            back = (t - t0) * 1000
            break
    wait_socket(api)
    subprocess.run([CRYO, "quit", "--api", api], stdout=subprocess.DEVNULL)
    rest = p.communicate()[1]
    prefetch = re.search(r"prefetch done: (\d+) pages loaded in ([\d.]+) ms", rest)
    return {"resumed_ms": resumed_ms, "normal_rate_after_ms": back,
            "first_rates": [r for _, r in rates[:6]],
            "prefetch_ms": float(prefetch.group(2)) if prefetch else None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mem-mib", type=int, default=2048)
    ap.add_argument("--fill-mib", type=int, default=1536)
    ap.add_argument("--vcpus", type=int, default=2)
    ap.add_argument("--dir", default=os.path.join(ROOT, "target"))
    ap.add_argument("--no-drop-caches", action="store_true")
    a = ap.parse_args()
    drop = not a.no_drop_caches
    subprocess.check_call(["cargo", "build", "--release", "-q", "-p", "cryo"], cwd=ROOT)
    k = kernel()
    api = os.path.join(a.dir, "frbench.sock")
    img = os.path.join(a.dir, "frbench.img")
    for f in (api, img):
        if os.path.exists(f):
            os.unlink(f)
    share = a.fill_mib // a.vcpus
    p = subprocess.Popen([CRYO, "run", "--kernel", k, "--vcpus", str(a.vcpus), "--mem-mib", str(a.mem_mib),
                          "--api", api, "--cmdline", f"console=ttyS0 cryo.mem={share} cryo.hb_ms={HB_MS}"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    con = Console(p, a.vcpus)
    # Wait for the fill (heartbeats with sweeps > 0), then measure the steady rate.
    print(f"guest: {a.mem_mib} MiB, {a.vcpus} vCPUs, {a.fill_mib} MiB in use; filling...", file=sys.stderr)
    while True:
        line = p.stdout.readline()
        if not line:
            raise SystemExit("guest ended")
        if line.startswith("SWEEP"):
            break
    steady = con.beats(12)[4:]
    normal = sorted(r for _, r in steady)[len(steady) // 2]
    wait_socket(api)
    t0 = time.time()
    out = json.loads(subprocess.check_output([CRYO, "save", "--api", api, "--to", img], text=True))
    save_s = time.time() - t0
    p.wait()
    info = json.loads(subprocess.check_output([CRYO, "inspect", "--json", img], text=True))
    res = {
        "mem_mib": a.mem_mib, "fill_mib": a.fill_mib, "normal_rate": normal,
        "save_s": save_s, "save_paused_ms": out["paused_ms"],
        "apparent_bytes": info["apparent_bytes"], "allocated_bytes": info["allocated_bytes"],
        "present_pages": info["present_pages"],
        "eager": restore(img, [], normal, a.vcpus, drop),
        "lazy": restore(img, ["--lazy"], normal, a.vcpus, drop),
        "lazy_prefetch": restore(img, ["--lazy", "--prefetch"], normal, a.vcpus, drop),
    }
    os.unlink(img)
    print(json.dumps(res, indent=2))
    mb = info["present_pages"] * 4096 / 1e6
    print(f"save: {save_s:.2f} s for {mb:.0f} MB of non-zero pages ({mb/save_s:.0f} MB/s); "
          f"file apparent {info['apparent_bytes']/2**20:.0f} MiB, allocated {info['allocated_bytes']/2**20:.0f} MiB", file=sys.stderr)
    for k2 in ("eager", "lazy", "lazy_prefetch"):
        r = res[k2]
        print(f"{k2}: resumed after {r['resumed_ms']} ms; normal rate back after {r['normal_rate_after_ms']} ms"
              + (f"; prefetch done after {r['prefetch_ms']} ms" if r['prefetch_ms'] else ""), file=sys.stderr)


if __name__ == "__main__":
    main()
