"""Every time the README quotes is measured by a benchmark, and says which (issue 16: timings come from
benchmarks/ and are re-measured, not remembered). Settings (a default, a limit) are not measurements."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TIME = re.compile(r"\d[\d.]*(?:\u2013\d[\d.]*)?\s?(?:µs|ms|s|min|minutes|seconds)\b")
SETTING = re.compile(r"(?:default|at most|every|within|after)\s+$")  # what AppPot is set to do, not how long it took
BENCHMARK = re.compile(r"benchmarks/\w+\.py|readme_timings|bench_start|bench_appliance")
NEAR = 300  # characters: the figure's own sentence or the one after


def unmeasured(text: str) -> list[str]:
    found = []
    for m in TIME.finditer(text):
        if SETTING.search(text[max(0, m.start() - 12) : m.start()]):
            continue
        if not BENCHMARK.search(text[max(0, m.start() - NEAR) : m.end() + NEAR]):
            line = text.count("\n", 0, m.start()) + 1
            found.append(f"README.md:{line}: {m.group()}")
    return found


def test_the_guard_tells_a_measured_figure_from_a_remembered_one() -> None:
    assert unmeasured("It builds in about 40 s (`benchmarks/readme_timings.py`: `debian-dev-build`).") == []
    assert unmeasured("It builds in about 40 s.") == ["README.md:1: 40 s"]
    assert unmeasured("the probe takes at most 20 s; progress every 2 s (default 60 s)") == []


def test_every_time_the_readme_quotes_names_the_benchmark_that_measures_it() -> None:
    assert unmeasured((ROOT / "README.md").read_text()) == []


def test_the_kernel_build_time_is_the_same_wherever_it_is_told() -> None:
    """The README (benchmarks/readme_timings.py's kernel-build), `kernel build --help` and the build's own
    progress line quote one figure."""
    on_2_cores = re.compile(r"(\d+) min(?:utes)? on 2 (?:shared )?cores")
    texts = {"README.md": (ROOT / "README.md").read_text()}
    texts |= {str(p.relative_to(ROOT)): p.read_text() for p in (ROOT / "src" / "apppot").rglob("*.py")}
    figures = {(where, m.group(1)) for where, text in texts.items() for m in on_2_cores.finditer(text)}
    assert {where for where, _ in figures} >= {"README.md", "src/apppot/kernel_build.py", "src/apppot/cli/images.py"}
    assert len({figure for _, figure in figures}) == 1, sorted(figures)
