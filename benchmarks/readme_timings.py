"""The timings README.md quotes, measured: each README figure names the key of this script's line.

    .venv/bin/python benchmarks/readme_timings.py [--runs N] [--json] [--debian-dev IMG] [--services IMG]

Each timed figure is the median of N runs (after one warm-up) of an `apppot` command, run as the
caller with the caller's cache (the tiny appliance, AppPot's kernel, Debian's guest kernel):

- `true`: `apppot start -- true` (the tiny appliance; network on, pinned to one CPU: the defaults);
  `true-cpu-all`: the same with `--cpu all` (not pinned); `true-no-net`: with `--no-net` (the
  difference is the NAT helper's start); `true-calibrate`: with `--extra lpj=0` (the guest kernel
  calibrates its delay loop instead of taking AppPot's cached lpj=);
- `syscall` and `syscall-cpu-all`: the cost of one guest system call, from `dd bs=1` copying
  200000 bytes in the guest (two system calls a byte), less `true`, pinned and not;
- `debian-dev-true`: `apppot start --image debian-dev -- true` (the image given as a file: not verified);
- `debian-dev-verify-warm` and `debian-dev-verify-cold`: the same with `--verify` (its content id checked
  against its record), with the id in the cache of verified ids, and with that cache emptied before each run;
- `full-boot`: `apppot start --image debian-services --full-boot -- true` (systemd boots first);
- `export-tiny`: `apppot image export tiny -o FILE.qcow2`.

Build times are measured by the builds themselves and read from their records (rebuilding takes
minutes of every core): `debian-dev-build` is the debian-dev image's `build_seconds` (with
downloads), `kernel-build` the `build_seconds` of AppPot's own kernel `apppot start` uses.
A figure that cannot be measured here (an image not built) is left out with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

APPPOT = str(Path(sys.executable).parent / "apppot")
SYSCALL_BYTES = 200000


def apppot(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([APPPOT, *args], cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)


def median_seconds(args: list[str], cwd: Path, runs: int, before: Callable[[], None] = lambda: None) -> float:
    """Median wall time of `apppot ARGS`, after one warm-up run (``before`` runs untimed before each);
    a failing run stops the benchmark."""
    times = []
    for i in range(runs + 1):
        before()
        started = time.perf_counter()
        r = apppot(*args, cwd=cwd)
        elapsed = time.perf_counter() - started
        if r.returncode != 0:
            raise SystemExit(f"readme_timings: apppot {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        if i:
            times.append(elapsed)
    return statistics.median(times)


def image_record(image: str, cwd: Path) -> dict[str, object] | None:
    r = apppot("image", "info", image, "--json", cwd=cwd)
    if r.returncode != 0:
        return None
    info: dict[str, object] = json.loads(r.stdout)
    beside = Path(str(info["path"])).with_suffix(".json")  # an image given as a file: its record is beside it
    if "build_seconds" not in info and beside.is_file():
        info |= json.loads(beside.read_text())
    return info


def forget_content_ids() -> None:
    """Empty the cache of verified content ids (apppot.images.verify), so that the next check hashes the image."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    host = Path(base if os.path.isabs(base) else Path.home() / ".cache") / "apppot" / "host"
    for entry in host.glob("content-id-*.json"):
        entry.unlink(missing_ok=True)


def measure(runs: int, debian_dev: str, services: str, tmp: Path, progress: bool) -> dict[str, object]:
    figures: dict[str, float] = {}
    missing: dict[str, str] = {}

    def timed(key: str, args: list[str]) -> None:
        if progress:
            print(f"measuring {key}: apppot {' '.join(args)}", file=sys.stderr)
        figures[key] = median_seconds(args, tmp, runs)

    timed("true", ["start", "--", "true"])
    timed("true-cpu-all", ["start", "--cpu", "all", "--", "true"])
    timed("true-no-net", ["start", "--no-net", "--", "true"])
    timed("true-calibrate", ["start", "--extra", "lpj=0", "--", "true"])
    dd = ["--", "dd", "if=/dev/zero", "of=/dev/null", "bs=1", f"count={SYSCALL_BYTES}"]
    timed("dd", ["start", *dd])
    timed("dd-cpu-all", ["start", "--cpu", "all", *dd])
    figures["syscall"] = (figures["dd"] - figures["true"]) / (2 * SYSCALL_BYTES)
    figures["syscall-cpu-all"] = (figures["dd-cpu-all"] - figures["true-cpu-all"]) / (2 * SYSCALL_BYTES)
    dev = image_record(debian_dev, tmp)
    if dev is None:
        why = f"no image {debian_dev} (apppot image build examples/debian-dev.toml)"
        missing["debian-dev-true"] = missing["debian-dev-build"] = why
    else:
        timed("debian-dev-true", ["start", "--image", str(dev["path"]), "--", "true"])
        verified = ["start", "--verify", "--image", str(dev["path"]), "--", "true"]
        timed("debian-dev-verify-warm", verified)
        if progress:
            print("measuring debian-dev-verify-cold: the same, each run with no content id cached", file=sys.stderr)
        figures["debian-dev-verify-cold"] = median_seconds(verified, tmp, runs, forget_content_ids)
        if isinstance(dev.get("build_seconds"), int | float):
            figures["debian-dev-build"] = float(dev["build_seconds"])  # type: ignore[arg-type]
    svc = image_record(services, tmp)
    if svc is None:
        missing["full-boot"] = f"no image {services} (apppot image build examples/debian-services.toml)"
    else:
        timed("full-boot", ["start", "--image", str(svc["path"]), "--full-boot", "--", "true"])
    if progress:
        print("measuring export-tiny", file=sys.stderr)
    times = []
    for i in range(runs + 1):
        out = tmp / f"tiny-{i}.qcow2"
        started = time.perf_counter()
        r = apppot("image", "export", "tiny", "-o", str(out), cwd=tmp)
        if r.returncode != 0:
            raise SystemExit(f"readme_timings: apppot image export failed ({r.returncode}): {r.stderr.strip()}")
        if i:
            times.append(time.perf_counter() - started)
    figures["export-tiny"] = statistics.median(times)
    kernel = json.loads(apppot("kernel", "info", "--json", cwd=tmp).stdout or "{}")
    if isinstance(kernel.get("build_seconds"), int | float):
        figures["kernel-build"] = float(kernel["build_seconds"])
    else:
        missing["kernel-build"] = "apppot start uses no kernel of AppPot's own build here (apppot kernel build)"
    return {"runs": runs, "cpus": os.cpu_count(), "load": os.getloadavg()[0], "seconds": figures, "missing": missing}


def shown(key: str, value: float) -> str:
    if key.startswith("syscall"):
        return f"{value * 1e6:.1f} µs"
    return f"{value:.0f} s" if value >= 10 else f"{value:.3f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each figure (default: 5)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--debian-dev", default="debian-dev", help="the debian-dev image (name or file)")
    parser.add_argument("--services", default="debian-services", help="an image with systemd, for --full-boot")
    ns = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="readme-timings-"))
    try:
        report = measure(ns.runs, ns.debian_dev, ns.services, tmp, progress=not ns.json)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if ns.json:
        print(json.dumps(report))
        return 0
    print(f"median of {report['runs']} runs; {report['cpus']} CPUs, load {report['load']:.1f} at the end")
    seconds = report["seconds"]
    assert isinstance(seconds, dict)
    for key, value in seconds.items():
        print(f"{key:23} {shown(key, value)}")
    for key, why in dict(report["missing"]).items():  # type: ignore[call-overload]
        print(f"{key:23} not measured: {why}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
