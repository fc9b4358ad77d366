#!/usr/bin/env python3
"""Measures cryo start-up, VMM memory, and stream save/restore for filled guests.

Usage: resources/bench/stream-save-restore.py [--sizes 256,2048] [--dir DIR]

For each guest size it boots the test kernel in fill mode (every vCPU fills
its share of RAM with incompressible data, then halts), saves it to a stream
file, and restores it, reporting wall times, file size and device-state size.
It also reports the host wall time from `cryo run` to the first guest line
and the VMM's resident memory outside guest RAM. Uses target/release/cryo.
"""
import argparse, json, os, re, socket, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CRYO = os.path.join(ROOT, "target/release/cryo")


def kernel():
    return subprocess.check_output(["cargo", "run", "--release", "-q", "-p", "cryo-test-kernel"], cwd=ROOT, text=True).strip()


def wait_socket(path, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        try:
            s = socket.socket(socket.AF_UNIX); s.connect(path); s.close(); return
        except OSError:
            time.sleep(0.01)
    raise SystemExit("no API socket at " + path)


def rss_outside(pid, guest_bytes):
    """Resident KiB of every mapping except the guest RAM mappings."""
    total = 0
    cur_size = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            m = re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line)
            if m:
                a, b = line.split()[0].split("-")
                cur_size = int(b, 16) - int(a, 16)
                continue
            if line.startswith("Rss:") and cur_size is not None:
                if cur_size < min(guest_bytes, 1 << 30) and cur_size != guest_bytes:
                    total += int(line.split()[1])
    return total


def startup(k):
    t0 = time.time()
    p = subprocess.Popen([CRYO, "run", "--kernel", k, "--vcpus", "2", "--mem-mib", "256",
                          "--cmdline", "console=ttyS0 cryo.mem=1 cryo.hb_ms=1000"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    first = p.stdout.readline()
    dt = time.time() - t0
    # Let it settle, then measure memory outside guest RAM.
    for _ in range(4):
        p.stdout.readline()
    rss = rss_outside(p.pid, 256 << 20)
    p.terminate(); p.wait()
    return dt, first.decode().strip(), rss


def save_restore(k, mib, d):
    api = os.path.join(d, f"bench-{mib}.sock")
    img = os.path.join(d, f"bench-{mib}.cryo")
    for f in (api, img):
        if os.path.exists(f):
            os.unlink(f)
    p = subprocess.Popen([CRYO, "run", "--kernel", k, "--vcpus", "2", "--mem-mib", str(mib), "--api", api,
                          "--cmdline", "console=ttyS0 cryo.mode=fill cryo.mem=0"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    filled = 0
    while filled < 2:
        line = p.stdout.readline()
        if not line:
            raise SystemExit("guest ended early")
        if line.startswith("FILLED"):
            filled += 1
    wait_socket(api)
    subprocess.run(["sync"])
    t0 = time.time()
    out = subprocess.check_output([CRYO, "save", "--api", api, "--to", img, "--format", "stream"], text=True)
    save_s = time.time() - t0
    stats = json.loads(out)
    p.wait()
    size = os.path.getsize(img)
    # Restore: time until the API answers (the VM is running by then).
    api2 = api + "2"
    t0 = time.time()
    r = subprocess.Popen([CRYO, "restore", "--from", img, "--api", api2], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_socket(api2)
    restore_s = time.time() - t0
    subprocess.run([CRYO, "quit", "--api", api2], stdout=subprocess.DEVNULL)
    r.wait()
    os.unlink(img)
    return {"mem_mib": mib, "save_s": save_s, "restore_s": restore_s, "file_bytes": size,
            "device_state_bytes": stats["device_state_bytes"], "ram_pages": stats["ram_pages"],
            "zero_pages": stats["zero_pages"], "paused_ms": stats["paused_ms"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="256,2048")
    ap.add_argument("--dir", default=tempfile.gettempdir())
    a = ap.parse_args()
    subprocess.check_call(["cargo", "build", "--release", "-q", "-p", "cryo"], cwd=ROOT)
    k = kernel()
    dt, first, rss = startup(k)
    print(f"start-up: first guest line after {dt*1000:.1f} ms of host wall time ({first!r})")
    print(f"VMM resident memory outside guest RAM: {rss} KiB")
    for mib in [int(x) for x in a.sizes.split(",")]:
        r = save_restore(k, mib, a.dir)
        mb = r["ram_pages"] * 4096 / 1e6
        print(f"{mib} MiB guest: save {r['save_s']:.2f} s ({mb/r['save_s']:.0f} MB/s of RAM data), "
              f"restore to running {r['restore_s']:.2f} s, file {r['file_bytes']/2**20:.1f} MiB "
              f"({r['ram_pages']} pages stored, {r['zero_pages']} zero), device state {r['device_state_bytes']} bytes")


if __name__ == "__main__":
    main()
