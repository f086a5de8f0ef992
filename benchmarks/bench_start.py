"""How much does AppPot cost? Several workloads on several configurations, side by side.

Run it from the project directory:

    .venv/bin/python benchmarks/bench_start.py [--runs N] [--json] [--configs native,debian,...]

Configurations (the table's columns; `--configs` picks a comma-separated subset):

- `native`: the workload run directly on the host, by the host's busybox-static (the same binary
  the tiny appliance carries), in a temporary directory on the same filesystem as the job directory;
- `debian`: `apppot start` on Debian's UML kernel (APPPOT_KERNEL=/usr/bin/linux, ptrace mode);
- `apppot-ptrace`: `apppot start --extra seccomp=off` on AppPot's own kernel (`apppot kernel build`):
  the later seccomp= parameter wins, so the kernel runs in ptrace mode;
- `apppot-seccomp`: `apppot start` on AppPot's own kernel as AppPot runs it by default (seccomp mode
  where the host allows it);
- `qemu-tcg`: `apppot start --backend qemu --no-kvm`: the same image and agent under QEMU, Debian's
  kernel, the CPU emulated (TCG);
- `qemu-kvm`: `apppot start --backend qemu --kvm`, only where a guest boots with KVM (`apppot doctor`
  says); otherwise the column is left out with the probe's reason.

The two AppPot-kernel columns are left out, with a note, when AppPot's own kernel is not built.

Workloads (the rows); both sides run the same binaries (busybox applets, and one static program):

- `true`: start-up cost;
- fork/exec x300: a busybox sh loop running /bin/true 300 times (system calls, process creation);
- two CPU-bound jobs: a busybox awk loop, and `sha256_mem 200 stream` (sha256_mem.c, compiled
  statically by this script with the host's `cc`), which generates 200 MiB in memory, 1 MiB at a
  time, and checksums them;
- the same checksum with all 200 MiB held in memory at once (`sha256_mem 200 whole`): the guest
  kernel maps each page on first touch, at a cost per page fault far above the host's;
- a system-call-bound pipeline, `head -c 200000000 /dev/zero | sha256sum`: busybox moves the data in
  4 KiB reads and writes, each a UML system call, and the guest has one CPU for both programs;
- job-directory I/O: writing 100 MB into the job directory (hostfs in the guest) and reading it back.

Each cell is the median of N timed runs after one warm-up run, with its ratio to native. The runs
are interleaved (round after round over all cells), so that a slow phase of the host spreads over
all configurations instead of hitting one.

For each UML configuration it also computes the start-up and CPU targets:

- "AppPot overhead" = apppot true - a bare boot-and-halt of the same kernel, image and memory size
  without AppPot (init is busybox `poweroff -f`), given the same seccomp= and lpj= parameters as AppPot
  gives that kernel (from `apppot kernel info --json`), pinned to one host CPU as AppPot pins its
  guests; target < 0.2 s;
- compute-only ratios of the CPU-bound jobs, (guest - apppot true) / native; target <= 1.10;
- on AppPot's kernel in seccomp mode, the whole `apppot start -- true`; target <= 0.15 s.

Everything AppPot caches (the tiny image, kernel traits, console logs) goes to a private
XDG_CACHE_HOME in a temporary directory, so the user's cache is not touched. AppPot's own kernel
lives in the user's cache, so its path is found first with the real environment and then passed
as APPPOT_KERNEL; an APPPOT_KERNEL or APPPOT_IMAGE of the caller is ignored.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from apppot.cpu import current_cpu

APPPOT = Path(sys.executable).parent / "apppot"
BUSYBOX = "/bin/busybox"  # what the tiny appliance copies into the image
DEBIAN_KERNEL = "/usr/bin/linux"
SHM = "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"  # where a bare boot keeps the guest's memory
BIN = "@BIN@"  # in a native argv: the directory of busybox applet links
SHA = "head -c 200000000 /dev/zero | sha256sum"
SHA_MEM = "sha256_mem"  # built from sha256_mem.c into the job and native directories
# Pure computation, no system calls in the loop: the same busybox awk on both sides.
AWK_LOOP = "BEGIN { s = 0; for (i = 0; i < 4000000; i++) s += i % 7; print s }"
FORK_LOOP = "i=0; while [ $i -lt 300 ]; do @TRUE@; i=$((i+1)); done"
IO = "dd if=/dev/zero of=io.dat bs=1M count=100 && sha256sum io.dat && rm io.dat"
TIMEOUT = 180.0  # seconds for one run; the slowest cell (sha256 on Debian's kernel) takes ~10 s
OVERHEAD_TARGET = 0.2  # seconds of AppPot overhead on top of a bare boot
CPU_TARGET = 1.10  # compute-only guest / native wall time of a CPU-bound job
START_TARGET = 0.15  # seconds of the whole `apppot start -- true` on AppPot's kernel in seccomp mode

NATIVE = "native"
DEBIAN = "debian"
PTRACE = "apppot-ptrace"
SECCOMP = "apppot-seccomp"
QEMU_TCG = "qemu-tcg"
QEMU_KVM = "qemu-kvm"
CONFIGS = (NATIVE, DEBIAN, PTRACE, SECCOMP, QEMU_TCG, QEMU_KVM)
QEMU_OPTIONS = {QEMU_TCG: ["--backend", "qemu", "--no-kvm"], QEMU_KVM: ["--backend", "qemu", "--kvm"]}
BARE = "bare"


class BenchError(Exception):
    pass


@dataclass(frozen=True)
class Workload:
    name: str
    label: str
    guest: tuple[str, ...]  # after `apppot start --`
    native: tuple[str, ...]  # BIN stands for the directory of busybox applet links
    cpu: bool = False


WORKLOADS = (
    Workload("true", "true (start-up)", ("true",), (f"{BIN}/true",)),
    Workload(
        "fork",
        "fork/exec x300",
        ("sh", "-c", FORK_LOOP.replace("@TRUE@", "/bin/true")),
        (f"{BIN}/sh", "-c", FORK_LOOP.replace("@TRUE@", f"{BIN}/true")),
    ),
    Workload("awk", "awk loop (CPU)", ("awk", AWK_LOOP), (f"{BIN}/awk", AWK_LOOP), cpu=True),
    Workload("sha256", "sha256 200 MiB (CPU)", (f"./{SHA_MEM}", "200", "stream"), (f"./{SHA_MEM}", "200", "stream"), cpu=True),
    Workload("sha256-whole", "sha256, 200 MiB held at once", (f"./{SHA_MEM}", "200", "whole"), (f"./{SHA_MEM}", "200", "whole")),
    Workload("pipe", "head | sha256sum (syscalls)", ("sh", "-c", SHA), (f"{BIN}/sh", "-c", SHA)),
    Workload("io", "job-dir I/O 100 MB", ("sh", "-c", IO), (f"{BIN}/sh", "-c", IO)),
)
LABELS = {w.name: w.label for w in WORKLOADS} | {BARE: "bare boot + halt (no AppPot)"}


@dataclass
class Uml:
    """One UML configuration: how `apppot start` is run, and the matching bare boot."""

    name: str
    env: dict[str, str]
    extra: list[str]  # options of `apppot start`
    seccomp: bool  # the guest runs in seccomp mode
    kernel: str = ""
    mem: str = ""
    bare_params: list[str] = field(default_factory=list)


@dataclass
class Cell:
    config: str
    workload: str
    argv: list[str]
    cwd: Path
    env: dict[str, str]
    setup: Callable[[], None] | None = None
    pin: bool = False  # run on the one host CPU the process starts on, as AppPot runs its guests
    times: list[float] = field(default_factory=list)


@dataclass
class Result:
    config: str
    workload: str
    median: float
    min: float
    max: float
    ratio: float | None  # median / native median
    times: list[float]


@dataclass
class Metric:
    config: str
    name: str
    value: float
    unit: str
    target: str
    ok: bool | None


@dataclass
class Report:
    runs: int
    configs: list[str]
    umls: list[Uml]
    results: list[Result]
    metrics: list[Metric]
    notes: list[str]

    def result(self, config: str, workload: str) -> Result | None:
        return next((r for r in self.results if r.config == config and r.workload == workload), None)

    def as_json(self) -> dict[str, Any]:
        umls = [{k: v for k, v in asdict(u).items() if k != "env"} for u in self.umls]
        return {
            "runs": self.runs,
            "configs": self.configs,
            "workloads": {w.name: w.label for w in WORKLOADS},
            "uml": umls,
            "results": [asdict(r) for r in self.results],
            "metrics": [asdict(m) for m in self.metrics],
            "targets_met": all(m.ok for m in self.metrics if m.ok is not None),
            "notes": self.notes,
        }


def timed(cell: Cell) -> float:
    """Wall time of one run of the cell's command; fails on a non-zero exit."""
    if cell.setup is not None:
        cell.setup()
    argv = cell.argv
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=TIMEOUT,
            cwd=cell.cwd,
            env=cell.env,
            preexec_fn=pin_here if cell.pin else None,
        )
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{cell.config}: {shlex.join(argv)}: no exit after {TIMEOUT:.0f} s") from e
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip()[-2000:]
        raise BenchError(f"{cell.config}: {shlex.join(argv)}: exit status {proc.returncode}" + (f"\n{tail}" if tail else ""))
    return elapsed


def pin_here() -> None:
    """Keep this process and its children on the CPU it runs on now (as AppPot pins its guests)."""
    cpu = current_cpu()
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def build_sha_mem(dirs: list[Path], notes: list[str]) -> bool:
    """Compile sha256_mem.c statically into each directory; False (with a note) without a compiler."""
    source = Path(__file__).with_name("sha256_mem.c")
    out = dirs[0] / SHA_MEM
    try:
        check(["cc", "-O2", "-static", "-o", str(out), str(source)])
    except (BenchError, OSError) as e:
        notes.append(f"sha256_mem rows skipped: cannot compile {source.name} with cc -static: {e}")
        return False
    for d in dirs[1:]:
        shutil.copy2(out, d / SHA_MEM)
    return True


def check(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run argv once, capturing its output; fails with its stderr if it fails."""
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT, **kw)
    if proc.returncode != 0:
        raise BenchError(f"{shlex.join(argv)}: exit status {proc.returncode}\n{proc.stderr.strip()}")
    return proc


def uml_launch(verbose_output: str) -> tuple[str, str]:
    """(kernel on the host, mem= parameter) of the UML command line `apppot start -v` says it ran."""
    for line in verbose_output.splitlines():
        if line.startswith("apppot: running: ") and " mem=" in line:
            argv = shlex.split(line.removeprefix("apppot: running: "))
            kernel = argv[next(i for i, a in enumerate(argv) if a.startswith("ubd0=")) - 1]
            binds = {argv[i + 2]: argv[i + 1] for i, a in enumerate(argv[:-2]) if a == "--ro-bind"}  # bwrap sandbox
            return binds.get(kernel, kernel), next(a for a in argv if a.startswith("mem="))
    raise BenchError("`apppot start -v -- true` did not show the UML command line")


def own_kernel(env: dict[str, str], notes: list[str]) -> str | None:
    """The path of AppPot's own kernel as the user's real environment finds it, or None (with a note)."""
    proc = subprocess.run(
        [str(APPPOT), "kernel", "info", "--json"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
    )
    if proc.returncode != 0:
        notes.append(f"AppPot's kernel columns skipped: `apppot kernel info` failed: {proc.stderr.strip()}")
        return None
    info = json.loads(proc.stdout)
    if info.get("chosen_by") != "apppot":
        notes.append(
            f"AppPot's kernel columns skipped: `apppot kernel info` chose {info.get('path')} by {info.get('chosen_by')}, "
            "not AppPot's own kernel (build it with `apppot kernel build`)"
        )
        return None
    path: str = info["path"]
    return path


def prepare_uml(name: str, kernel: str, private_env: dict[str, str], job: Path, notes: list[str]) -> Uml:
    """Measure the kernel's traits into the private cache (one calibration boot) and find its UML command line."""
    env = private_env | {"APPPOT_KERNEL": kernel}
    info = json.loads(check([str(APPPOT), "kernel", "info", "--json"], env=env).stdout)
    forced_ptrace = name == PTRACE
    seccomp = bool(info.get("seccomp_on_this_host")) and not forced_ptrace
    if name == SECCOMP and not seccomp:
        notes.append(f"{SECCOMP}: seccomp mode is not available on this host; the column runs in ptrace mode")
    uml = Uml(name, env, ["--extra", "seccomp=off"] if forced_ptrace else [], seccomp)
    uml.kernel, uml.mem = uml_launch(check([str(APPPOT), "start", "-v", *uml.extra, "--", "true"], cwd=job, env=env).stderr)
    lpj = info.get("lpj")
    uml.bare_params = (["seccomp=on"] if seccomp else []) + ([f"lpj={lpj}"] if lpj else [])
    return uml


def prepare_qemu(
    wanted: list[str], real_env: dict[str, str], private_env: dict[str, str], job: Path, notes: list[str]
) -> list[str]:
    """The QEMU columns that can run here: the user's guest kernel copied into the private cache (else
    fetched there), KVM's column only where the probe boots a guest with it."""
    user_cache = Path(real_env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "apppot" / "guest-kernel"
    private = Path(private_env["XDG_CACHE_HOME"]) / "apppot" / "guest-kernel"
    if (user_cache / "current").exists() and not private.exists():
        shutil.copytree(user_cache, private, ignore=shutil.ignore_patterns("apt", "*.tmp"))
    try:
        check([str(APPPOT), "start", *QEMU_OPTIONS[QEMU_TCG], "--", "true"], cwd=job, env=private_env)
    except BenchError as e:
        notes.append(f"QEMU columns skipped: {e}")
        return []
    if QEMU_KVM in wanted:
        try:  # in the private cache too: the probe boots a guest there, once
            doctor = json.loads(check([str(APPPOT), "doctor", "--json"], env=private_env).stdout)
            kvm = next(c for c in doctor if c["name"] == "kvm")
            works, why = bool(kvm["ok"]), str(kvm["detail"])
        except (BenchError, ValueError, StopIteration) as e:
            works, why = False, f"apppot doctor failed: {e}"
        if not works:
            notes.append(f"{QEMU_KVM} column skipped: {why}")
            wanted = [c for c in wanted if c != QEMU_KVM]
    return wanted


def bench(runs: int, configs: list[str], tmp: Path, progress: Callable[[str], None]) -> Report:
    notes: list[str] = []
    real_env = {k: v for k, v in os.environ.items() if k not in ("APPPOT_KERNEL", "APPPOT_IMAGE")}
    private_env = real_env | {"XDG_CACHE_HOME": str(tmp / "cache")}
    job = tmp / "job"
    native_dir = tmp / "native"  # the same filesystem as the job directory
    bindir = tmp / "bin"
    for d in (job, native_dir, bindir):
        d.mkdir()

    kernels: dict[str, str] = {}
    if DEBIAN in configs:
        if os.access(DEBIAN_KERNEL, os.X_OK):
            kernels[DEBIAN] = DEBIAN_KERNEL
        else:
            notes.append(f"{DEBIAN} column skipped: {DEBIAN_KERNEL} is missing (sudo apt-get install user-mode-linux)")
    if PTRACE in configs or SECCOMP in configs:
        own = own_kernel(real_env, notes)
        if own is not None:
            kernels |= {c: own for c in (PTRACE, SECCOMP) if c in configs}
    qemus = [c for c in configs if c in QEMU_OPTIONS]
    if qemus:
        qemus = prepare_qemu(qemus, real_env, private_env, job, notes)
    configs = [c for c in configs if c == NATIVE or c in kernels or c in qemus]
    workloads: tuple[Workload, ...] = WORKLOADS
    if not build_sha_mem([job, native_dir], notes):
        workloads = tuple(w for w in WORKLOADS if w.guest[0] != f"./{SHA_MEM}")

    cells: list[Cell] = []
    if NATIVE in configs:
        if not os.access(BUSYBOX, os.X_OK):
            raise BenchError(f"{BUSYBOX} is missing: sudo apt-get install busybox-static")
        for applet in check([BUSYBOX, "--list"]).stdout.split():
            (bindir / applet).symlink_to(BUSYBOX)
        native_env = real_env | {"PATH": str(bindir)}
        for w in workloads:
            argv = [a.replace(BIN, str(bindir)) for a in w.native]
            cells.append(Cell(NATIVE, w.name, argv, native_dir, native_env))

    umls: list[Uml] = []
    image = ""
    if kernels:
        progress("building the tiny image and measuring the kernels (untimed) ...")
        image = json.loads(check([str(APPPOT), "image", "build-tiny", "--json"], env=private_env).stdout)["path"]
    for name in qemus:
        for w in workloads:
            cells.append(Cell(name, w.name, [str(APPPOT), "start", *QEMU_OPTIONS[name], "--", *w.guest], job, private_env))
    for name in configs:
        if name == NATIVE or name in qemus:
            continue
        uml = prepare_uml(name, kernels[name], private_env, job, notes)
        umls.append(uml)
        for w in workloads:
            cells.append(Cell(name, w.name, [str(APPPOT), "start", *uml.extra, "--", *w.guest], job, uml.env))
        cow = tmp / f"bare-{name}.cow"
        bare = [uml.kernel, f"ubd0={cow},{image}", "root=/dev/ubda", "rw", uml.mem, "init=/sbin/poweroff", "quiet"]
        bare += [*uml.bare_params, f"uml_dir={tmp}", "con=null", "ssl=null", "con0=null,fd:1", "--", "-f"]  # `-f`: for init
        # A fresh COW file each run (UML creates it), and UML's environment as AppPot's sandbox sets it:
        # the guest's memory in a file on a tmpfs (/tmp in the sandbox, /dev/shm here). TMPDIR must be
        # set: without it, AppPot's 7.x kernel fails to start init ("start_userspace: expected SIGSTOP").
        fresh_cow = functools.partial(cow.unlink, missing_ok=True)
        cells.append(Cell(name, BARE, bare, tmp, {"PATH": "/usr/bin:/bin", "TMPDIR": SHM}, fresh_cow, pin=True))

    # Round 0 is the warm-up; rounds interleave all cells so that the host's slow phases hit them alike.
    for round_ in range(runs + 1):
        progress("warm-up round ..." if round_ == 0 else f"round {round_}/{runs} ...")
        for cell in cells:
            elapsed = timed(cell)
            if round_:
                cell.times.append(elapsed)

    medians = {(c.config, c.workload): statistics.median(c.times) for c in cells}
    results = []
    for c in cells:
        native = medians.get((NATIVE, c.workload))
        median = medians[(c.config, c.workload)]
        ratio = median / native if native and c.config != NATIVE else None
        results.append(Result(c.config, c.workload, median, min(c.times), max(c.times), ratio, c.times))
    report = Report(runs, configs, umls, results, metrics(umls, medians), notes)
    return report


def metrics(umls: list[Uml], medians: dict[tuple[str, str], float]) -> list[Metric]:
    """The start-up and CPU metrics with their targets, per UML configuration."""
    out = []
    for uml in umls:
        true = medians[(uml.name, "true")]
        overhead = true - medians[(uml.name, BARE)]
        out.append(
            Metric(
                uml.name,
                "AppPot overhead (apppot true - bare boot)",
                overhead,
                "s",
                f"< {OVERHEAD_TARGET} s",
                overhead < OVERHEAD_TARGET,
            )
        )
        for w in WORKLOADS:
            native = medians.get((NATIVE, w.name))
            if w.cpu and native and (uml.name, w.name) in medians:
                compute = (medians[(uml.name, w.name)] - true) / native
                name = f"{w.label}, compute only"
                out.append(Metric(uml.name, name, compute, "x", f"<= {CPU_TARGET:.2f}", compute <= CPU_TARGET))
        if uml.name == SECCOMP:
            out.append(
                Metric(
                    uml.name,
                    "apppot start -- true (AppPot's kernel, seccomp)",
                    true,
                    "s",
                    f"<= {START_TARGET} s",
                    true <= START_TARGET,
                )
            )
    return out


def seconds(value: float) -> str:
    return f"{value:.3f}s"


def times_x(value: float) -> str:
    return f"{value:.2f}x" if value < 100 else f"{value:.0f}x"


def table(report: Report) -> str:
    lines = [f"{report.runs} timed run(s) per cell after one warm-up; medians, (ratio to native)"]
    for uml in report.umls:
        mode = "seccomp" if uml.seccomp else "ptrace"
        start = shlex.join(["apppot", "start", *uml.extra])
        bare = " ".join(uml.bare_params) or "-"
        lines.append(f"  {uml.name}: {uml.kernel} ({mode} mode, {uml.mem}); `{start}`; bare boot adds {bare}")
    lines += [f"note: {n}" for n in report.notes]
    width, col = 30, 20
    lines += ["", f"{'workload':<{width}}" + "".join(f"{c:>{col}}" for c in report.configs)]
    for workload in [*(w.name for w in WORKLOADS), BARE]:
        cells = []
        for config in report.configs:
            r = report.result(config, workload)
            text = "-" if r is None else seconds(r.median) + (f" ({times_x(r.ratio)})" if r.ratio is not None else "")
            cells.append(f"{text:>{col}}")
        lines.append(f"{LABELS[workload]:<{width}}" + "".join(cells))

    if report.metrics:
        umls = [u.name for u in report.umls]
        names = list(dict.fromkeys(m.name for m in report.metrics))
        width = max(len(n) for n in names) + 2
        lines += ["", f"{'metric':<{width}}" + "".join(f"{c:>{col}}" for c in umls) + "  target"]
        for name in names:
            by_config = {m.config: m for m in report.metrics if m.name == name}
            cells, target = [], ""
            for config in umls:
                m = by_config.get(config)
                text = ""
                if m is not None:
                    ok = "" if m.ok is None else (" ok" if m.ok else " NO")
                    text = (seconds(m.value) if m.unit == "s" else times_x(m.value)) + ok
                    target = m.target
                cells.append(f"{text:>{col}}")
            lines.append(f"{name:<{width}}" + "".join(cells) + f"  {target}")
        lines += ["", "targets:"]
        for name in names:
            judged = [m for m in report.metrics if m.name == name and m.ok is not None]
            met = ", ".join(m.config for m in judged if m.ok)
            missed = ", ".join(m.config for m in judged if not m.ok)
            verdicts = [*([f"met on {met}"] if met else []), *([f"NOT met on {missed}"] if missed else [])]
            lines.append(f"  {name} {judged[0].target}: {'; '.join(verdicts)}")
        verdict = "all met" if all(m.ok for m in report.metrics if m.ok is not None) else "NOT all met"
        lines.append(f"  => {verdict}")
    return "\n".join(lines)


def parse_configs(value: str) -> list[str]:
    chosen = [c.strip() for c in value.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in CONFIGS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"choose from {','.join(CONFIGS)} (got {value!r})")
    return [c for c in CONFIGS if c in chosen]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each cell (default: 5)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--configs",
        type=parse_configs,
        default=list(CONFIGS),
        help=f"comma-separated subset of {','.join(CONFIGS)} (default: all)",
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    def progress(message: str) -> None:
        if sys.stderr.isatty():
            print(f"bench_start: {message}", file=sys.stderr, flush=True)

    try:
        with tempfile.TemporaryDirectory(prefix="apppot-bench-") as tmp:
            report = bench(args.runs, args.configs, Path(tmp), progress)
    except (BenchError, OSError, subprocess.SubprocessError, ValueError) as e:
        print(f"bench_start: failed: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report.as_json()) if args.json else table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
