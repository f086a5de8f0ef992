"""Choosing the host CPU a guest is pinned to."""

from __future__ import annotations

from pathlib import Path

import pytest

from apppot.cpu import choose_cpu, current_cpu, format_cpus
from apppot.errors import UsageError

TWO = frozenset({0, 1})


@pytest.mark.parametrize(
    ("requested", "allowed", "current", "chosen"),
    [
        (None, TWO, 1, 1),  # auto: where the scheduler put us
        ("auto", TWO, 0, 0),
        (" AUTO ", TWO, 0, 0),
        (None, frozenset({2, 3}), 0, 2),  # current outside the allowed set (moved since)
        (None, TWO, None, 0),  # current unknown
        (None, frozenset({5}), 5, None),  # already on one CPU: nothing to do
        ("all", TWO, 1, None),
        ("1", TWO, 0, 1),
        ("5", frozenset({5}), 5, 5),
    ],
)
def test_choose_cpu(requested: str | None, allowed: frozenset[int], current: int | None, chosen: int | None) -> None:
    assert choose_cpu(requested, allowed, current) == chosen


def test_a_cpu_outside_the_allowed_set_is_refused_with_the_choices() -> None:
    with pytest.raises(UsageError, match=r"CPU 7 is not available to this job \(it may use 0-2,5\)"):
        choose_cpu("7", frozenset({0, 1, 2, 5}), 0)


@pytest.mark.parametrize("requested", ["-1", "one", "1,2", ""])
def test_a_malformed_cpu_is_refused(requested: str) -> None:
    with pytest.raises(UsageError, match="invalid --cpu"):
        choose_cpu(requested, TWO, 0)


@pytest.mark.parametrize(("cpus", "text"), [({0, 1, 2, 5}, "0-2,5"), ({3}, "3"), (set(), "none"), ({1, 3, 4}, "1,3-4")])
def test_format_cpus(cpus: set[int], text: str) -> None:
    assert format_cpus(cpus) == text


def test_current_cpu_reads_field_39_past_a_command_name_with_blanks(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    # pid (comm) state, then fields 4..52; field 39 (processor) is 3
    rest = [str(n) for n in range(4, 53)]
    rest[39 - 4] = "3"
    stat.write_text(f"123 (a b) c) S {' '.join(rest)}\n")
    assert current_cpu(stat) == 3
    assert current_cpu(tmp_path / "missing") is None


def test_current_cpu_of_this_process_is_one_it_may_use() -> None:
    import os

    assert current_cpu() in os.sched_getaffinity(0)
