"""What does a Debian appliance cost? `true`, and building and testing GNU hello, against the host.

Run it from the project directory, as root (building the appliance needs root):

    .venv/bin/python benchmarks/bench_appliance.py [--runs N] [--json]

It builds examples/debian-dev.toml into a private XDG cache (untimed), fetches GNU hello's release
tarball from Debian's source package (untimed), then measures, interleaved round after round:

- `true`: `apppot start --image debian-dev -- true` against `true` on the host; the issue's target
  is a median under 1.0 s;
- `hello`: examples/validate/apppot-run (unpack, configure, make, make check) with the hello tarball,
  inside the appliance through `apppot start --image debian-dev`, and the same script run directly
  on the host (which has the same compilers). The guest has one CPU; the host script may use all.

Each cell is the median of N timed runs after one warm-up run, with its ratio to native.
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
from typing import NamedTuple

from apppot.kernel_build import PrivateApt

ROOT = Path(__file__).resolve().parent.parent
APPPOT = Path(sys.executable).parent / "apppot"
TRUE_TARGET = 1.0  # seconds, median of `apppot start --image debian-dev -- true`


class BenchError(Exception):
    pass


def check(argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=cwd, env=env, check=False)
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)}: exit status {proc.returncode}\n{proc.stderr.strip()[-2000:]}")
    return proc


def timed(argv: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).decode(errors="replace").strip()[-2000:]
        raise BenchError(f"{' '.join(argv)} in {cwd}: exit status {proc.returncode}\n{tail}")
    return elapsed


def fresh_validate_job(base: Path, name: str, tarball: Path) -> Path:
    job = base / name
    if job.exists():
        shutil.rmtree(job)
    job.mkdir()
    shutil.copy2(ROOT / "examples" / "validate" / "apppot-run", job)
    shutil.copy2(tarball, job)
    return job


class Row(NamedTuple):
    workload: str
    label: str
    native: float
    appliance: float
    ratio: float
    times: dict[str, list[float]]


class Report(NamedTuple):
    runs: int
    kernel: str
    image: str
    build_seconds: float
    rows: list[Row]
    true_target_met: bool

    def as_json(self) -> dict[str, object]:
        return {**self._asdict(), "rows": [r._asdict() for r in self.rows], "true_target": f"< {TRUE_TARGET} s"}


def bench(runs: int, tmp: Path, progress: Callable[[str], None]) -> Report:
    # The kernel apppot start would use with the user's own cache (AppPot's, once built); the rest
    # of the cache is private to this run.
    kernel = json.loads(check([str(APPPOT), "kernel", "info", "--json"]).stdout)["path"]
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp / "cache"), "APPPOT_KERNEL": kernel}
    env.pop("APPPOT_IMAGE", None)
    progress("building the debian-dev appliance and fetching GNU hello (untimed) ...")
    record = json.loads(
        check([str(APPPOT), "image", "build", "--json", str(ROOT / "examples" / "debian-dev.toml")], env=env).stdout
    )
    tarball = PrivateApt(tmp / "apt", "bookworm").upstream_tarball("hello", tmp)
    job = tmp / "job"
    job.mkdir()
    native_tmp = tmp / "native-tmp"  # where the host run of the validate script builds
    native_tmp.mkdir()
    cells: dict[tuple[str, str], list[float]] = {}

    def cell(workload: str, config: str, elapsed: float, keep: bool) -> None:
        if keep:
            cells.setdefault((workload, config), []).append(elapsed)

    for round_ in range(runs + 1):
        progress("warm-up round ..." if round_ == 0 else f"round {round_}/{runs} ...")
        keep = round_ > 0
        cell("true", "native", timed(["true"], job, env), keep)
        cell("true", "appliance", timed([str(APPPOT), "start", "--image", "debian-dev", "--", "true"], job, env), keep)
        native_job = fresh_validate_job(tmp, "hello-native", tarball)
        cell("hello", "native", timed(["./apppot-run"], native_job, {**env, "TMPDIR": str(native_tmp)}), keep)
        guest_job = fresh_validate_job(tmp, "hello-guest", tarball)
        cell("hello", "appliance", timed([str(APPPOT), "start", "--image", "debian-dev"], guest_job, env), keep)

    rows = []
    for workload, label in (("true", "true"), ("hello", "GNU hello: configure, make, make check")):
        native = statistics.median(cells[(workload, "native")])
        guest = statistics.median(cells[(workload, "appliance")])
        times = {"native": cells[(workload, "native")], "appliance": cells[(workload, "appliance")]}
        rows.append(Row(workload, label, native, guest, guest / native, times))
    return Report(runs, kernel, record["path"], record["build_seconds"], rows, rows[0].appliance < TRUE_TARGET)


def table(report: Report) -> str:
    lines = [
        f"{report.runs} timed run(s) per cell after one warm-up; medians",
        f"debian-dev appliance built in {report.build_seconds} s (untimed): {report.image}",
        f"kernel: {report.kernel}",
        "",
        f"{'workload':<42}{'native':>10}{'appliance':>12}{'ratio':>9}",
    ]
    for r in report.rows:
        lines.append(f"{r.label:<42}{r.native:>9.3f}s{r.appliance:>11.3f}s{r.ratio:>8.2f}x")
    verdict = "met" if report.true_target_met else "NOT met"
    lines += [
        "",
        f"apppot start --image debian-dev -- true: {report.rows[0].appliance:.3f} s, target < {TRUE_TARGET} s: {verdict}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each cell (default: 3)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if os.geteuid() != 0:
        print("bench_appliance: building the appliance needs root; run it as root", file=sys.stderr)
        return 1

    def progress(message: str) -> None:
        if sys.stderr.isatty():
            print(f"bench_appliance: {message}", file=sys.stderr, flush=True)

    try:
        with tempfile.TemporaryDirectory(prefix="apppot-bench-appliance-") as tmp:
            report = bench(args.runs, Path(tmp), progress)
    except (BenchError, OSError, ValueError) as e:
        print(f"bench_appliance: failed: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report.as_json()) if args.json else table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
