"""How much does AppPot cost? Start-up and CPU-bound job, in the guest and natively, side by side.

Run it from the project directory:

    .venv/bin/python benchmarks/bench_start.py [--runs N] [--json]

It measures (median of N timed runs, after one warm-up run of each):

- `apppot start -- true` against `true` run natively;
- a bare boot-and-halt of the same UML kernel, image and memory size, without AppPot
  (init is busybox `poweroff -f`), so that "AppPot overhead" = apppot true - bare boot;
- checksumming 200 MB in the guest against the same busybox pipeline natively, also with
  the `apppot start -- true` time subtracted (the compute-only ratio); busybox moves the data
  in 4 KiB reads and writes, so this also measures UML's cost per system call;
- a pure computation (a busybox awk loop) in the guest against the same natively.

Everything AppPot caches (the tiny image, console logs) goes to a private XDG_CACHE_HOME
in a temporary directory, so the user's cache is not touched.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

APPPOT = Path(sys.executable).parent / "apppot"
SHA_GUEST = "head -c 200000000 /dev/zero | sha256sum"
SHA_NATIVE = "busybox head -c 200000000 /dev/zero | busybox sha256sum"
# Pure computation, no system calls in the loop: the same busybox awk on both sides.
AWK_LOOP = "BEGIN { s = 0; for (i = 0; i < 4000000; i++) s += i % 7; print s }"
TIMEOUT = 600.0
START_TARGET = 0.2  # seconds of AppPot overhead on top of a bare boot
CPU_TARGET = 1.10  # guest / native wall time of a CPU-bound job


class BenchError(Exception):
    pass


@dataclass
class Row:
    name: str
    median: float
    times: list[float]


@dataclass
class Metric:
    name: str
    value: float
    unit: str
    target: str
    ok: bool | None


def measure(argv: list[str], runs: int, *, setup: Callable[[], None] | None = None, **kw: Any) -> list[float]:
    """Wall times of `runs` runs of argv, after one untimed warm-up run; fails on a non-zero exit."""
    times = []
    for i in range(runs + 1):
        if setup is not None:
            setup()
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=TIMEOUT, **kw
            )
        except subprocess.TimeoutExpired as e:
            raise BenchError(f"{shlex.join(argv)}: no exit after {TIMEOUT:.0f} s") from e
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            tail = proc.stderr.decode(errors="replace").strip()[-2000:]
            raise BenchError(f"{shlex.join(argv)}: exit status {proc.returncode}" + (f"\n{tail}" if tail else ""))
        if i:
            times.append(elapsed)
    return times


def row(name: str, times: list[float]) -> Row:
    return Row(name, statistics.median(times), times)


def check(argv: list[str], **kw: Any) -> str:
    """Run argv once; its stdout, stderr included in the error if it fails."""
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT, **kw)
    if proc.returncode != 0:
        raise BenchError(f"{shlex.join(argv)}: exit status {proc.returncode}\n{proc.stderr.strip()}")
    output: str = proc.stdout + proc.stderr
    return output


def uml_launch(verbose_output: str) -> tuple[str, str]:
    """(kernel on the host, mem= parameter) of the UML command line `apppot start -v` says it ran."""
    for line in verbose_output.splitlines():
        if line.startswith("apppot: running: ") and " mem=" in line:
            argv = shlex.split(line.removeprefix("apppot: running: "))
            kernel = argv[next(i for i, a in enumerate(argv) if a.startswith("ubd0=")) - 1]
            binds = {argv[i + 2]: argv[i + 1] for i, a in enumerate(argv[:-2]) if a == "--ro-bind"}  # bwrap sandbox
            return binds.get(kernel, kernel), next(a for a in argv if a.startswith("mem="))
    raise BenchError("`apppot start -v -- true` did not show the UML command line")


def bench(runs: int, tmp: Path) -> tuple[list[Row], list[Metric], str]:
    env = os.environ | {"XDG_CACHE_HOME": str(tmp / "cache")}
    job = tmp / "job"
    job.mkdir()
    image = json.loads(check([str(APPPOT), "image", "build-tiny", "--json"], env=env))["path"]
    kernel, mem = uml_launch(check([str(APPPOT), "start", "-v", "--", "true"], cwd=job, env=env))

    cow = tmp / "bare.cow"
    bare = [kernel, f"ubd0={cow},{image}", "root=/dev/ubda", "rw", mem, "init=/sbin/poweroff", "quiet"]
    bare += [f"uml_dir={tmp}", "con=null", "ssl=null", "con0=null,fd:1", "--", "-f"]  # `-f`: argument of init
    apppot = [str(APPPOT), "start", "--"]

    native_true = row("native: true", measure(["true"], runs))
    apppot_true = row("apppot start -- true", measure([*apppot, "true"], runs, cwd=job, env=env))
    # A fresh COW file each run (UML creates it), and UML's environment as AppPot sets it: without
    # TMPDIR, UML keeps the guest's memory on /dev/shm (tmpfs, as /tmp in AppPot's sandbox is).
    fresh_cow = functools.partial(cow.unlink, missing_ok=True)
    bare_boot = row("bare UML boot + halt", measure(bare, runs, setup=fresh_cow, env={"PATH": "/usr/bin:/bin"}))
    native_sha = row("native: busybox sha256sum 200 MB", measure(["busybox", "sh", "-c", SHA_NATIVE], runs))
    guest_sha = row("apppot: sha256sum 200 MB", measure([*apppot, "sh", "-c", SHA_GUEST], runs, cwd=job, env=env))
    native_awk = row("native: busybox awk loop", measure(["busybox", "awk", AWK_LOOP], runs))
    guest_awk = row("apppot: awk loop", measure([*apppot, "awk", AWK_LOOP], runs, cwd=job, env=env))

    overhead = apppot_true.median - bare_boot.median
    cpu = guest_sha.median / native_sha.median
    compute = (guest_sha.median - apppot_true.median) / native_sha.median
    awk = (guest_awk.median - apppot_true.median) / native_awk.median
    within = f"<= {CPU_TARGET:.2f}"
    metrics = [
        Metric("start ratio (apppot true / native true)", apppot_true.median / native_true.median, "x", "", None),
        Metric("AppPot overhead (apppot true - bare boot)", overhead, "s", f"< {START_TARGET} s", overhead < START_TARGET),
        Metric("CPU job ratio (guest / native)", cpu, "x", within, cpu <= CPU_TARGET),
        Metric("CPU job, compute only ((guest - apppot true) / native)", compute, "x", within, compute <= CPU_TARGET),
        Metric("awk loop, compute only ((guest - apppot true) / native)", awk, "x", within, awk <= CPU_TARGET),
    ]
    rows = [native_true, apppot_true, bare_boot, native_sha, guest_sha, native_awk, guest_awk]
    return rows, metrics, f"{kernel} {mem}"


def table(rows: list[Row], metrics: list[Metric], runs: int, launch: str) -> str:
    lines = [f"{runs} runs each, medians; UML: {launch}", ""]
    lines.append(f"{'measurement':<60} {'median':>9} {'min':>9} {'max':>9}")
    lines += [f"{r.name:<60} {r.median:>8.3f}s {min(r.times):>8.3f}s {max(r.times):>8.3f}s" for r in rows]
    lines += ["", f"{'metric':<60} {'value':>9} {'target':>9}  ok"]
    for m in metrics:
        ok = "" if m.ok is None else ("yes" if m.ok else "NO")
        lines.append(f"{m.name:<60} {m.value:>8.3f}{m.unit} {m.target:>9}  {ok}".rstrip())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7, help="timed runs of each measurement (default: 7)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    try:
        with tempfile.TemporaryDirectory(prefix="apppot-bench-") as tmp:
            rows, metrics, launch = bench(args.runs, Path(tmp))
    except (BenchError, OSError, subprocess.SubprocessError, ValueError) as e:
        print(f"bench_start: failed: {e}", file=sys.stderr)
        return 1
    if args.json:
        report = {"runs": args.runs, "uml": launch, "rows": [asdict(r) for r in rows], "metrics": [asdict(m) for m in metrics]}
        print(json.dumps(report))
    else:
        print(table(rows, metrics, args.runs, launch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
