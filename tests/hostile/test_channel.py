"""Attacks through the host-guest channel: the control directory, the report directory, the status."""

from __future__ import annotations

import contextlib
import os
import threading
import time

import pytest

from tests.hostile.conftest import BOTH_BACKENDS, EXIT_GUEST_MISBEHAVED, Attack

CTL = "/run/apppot"
OUT = "/run/apppot-agent/out"  # the agent's alone: only root inside can reach it


def slow_stdin(first: bytes, rest: bytes, delay: float) -> int:
    """A pipe that gives ``first`` at once and ``rest`` after ``delay`` seconds, as a slow producer would."""
    read_end, write_end = os.pipe()

    def feed() -> None:
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(first)
            pipe.flush()
            time.sleep(delay)
            with contextlib.suppress(BrokenPipeError):
                pipe.write(rest)

    threading.Thread(target=feed, daemon=True).start()
    return read_end


@BOTH_BACKENDS
def test_a_link_planted_for_a_stdin_chunk_writes_nothing(backend: str, attack: Attack, inside: list[str]) -> None:
    # The reproduction: a link where the host writes its next stdin chunk, made before the host writes it.
    script = f"ln -s {attack.canary} {CTL}/.stdin.1.tmp; ln -s {attack.canary} {CTL}/stdin.1; head -c 4; cat >/dev/null"
    stdin = slow_stdin(b"line", b"INJECTED" * 300_000, delay=4)
    try:
        outcome = attack.run(["start", *inside, "--", "sh", "-c", script], stdin=stdin)
    finally:
        os.close(stdin)
    assert outcome.returncode == 0, outcome.err
    assert outcome.result.stdout == b"line"


def test_guest_root_cannot_make_the_control_directory_writable(attack: Attack) -> None:
    script = f"mount -o remount,rw {CTL}; echo x >{CTL}/stdin.1 && echo WROTE\n"
    script += f"ln -s {attack.canary} {CTL}/x && echo LINKED; exit 0"
    outcome = attack.run(["start", "--user", "root", "--", "sh", "-c", script], stdin=b"a" * 3_000_000)
    assert outcome.returncode == 0, outcome.err
    assert b"WROTE" not in outcome.result.stdout and b"LINKED" not in outcome.result.stdout


@BOTH_BACKENDS
def test_the_jobs_user_cannot_forge_the_status(backend: str, attack: Attack) -> None:
    # The report directory's files belong to the host user, whose uid the job's user has inside.
    script = f"echo 0 > {OUT}/status && echo FORGED; ln -s {attack.canary} {OUT}/stdin.read && echo LINKED; exit 3"
    outcome = attack.run(["start", "--", "sh", "-c", script], stdin=b"x" * (6 << 20))
    assert outcome.returncode == 3, outcome.err
    assert b"FORGED" not in outcome.result.stdout and b"LINKED" not in outcome.result.stdout


@BOTH_BACKENDS
def test_a_status_linked_to_a_host_file_is_refused(backend: str, attack: Attack) -> None:
    # The canary holds "IN-HOME 7": the exit code must never come from a host file.
    script = f"ln -s {attack.canary} {OUT}/status; sleep 30; exit 0"
    outcome = attack.run(["start", "--user", "root", "--", "sh", "-c", script])
    assert outcome.returncode == EXIT_GUEST_MISBEHAVED
    outcome.one_line("symbolic link as status")


@pytest.mark.parametrize(
    "make,says",
    [
        (f"ln -s /dev/zero {OUT}/status", "symbolic link as status"),
        (f"mkfifo {OUT}/status", "named pipe as status"),
        (f"mkdir {OUT}/status", "directory as status"),
        (f"dd if=/dev/zero of={OUT}/status bs=1 count=1 seek=2G 2>/dev/null", "bytes to status"),
        (f"head -c 100000 /dev/zero > {OUT}/status", "bytes to status"),
        (f"printf '\\377\\376\\n' > {OUT}/status", "not a number 0-255"),
        (f"printf '300\\n' > {OUT}/status", "not a number 0-255"),
    ],
    ids=["link-to-dev-zero", "fifo", "directory", "sparse-2G", "100k-zeros", "binary", "out-of-range"],
)
def test_whatever_the_guest_leaves_as_status_is_one_line(attack: Attack, make: str, says: str) -> None:
    # The agent writes the status after the job: the job's own status file must survive until the guest stops,
    # so it waits for the host to see it (the host stops a guest 10 s after a status appears).
    outcome = attack.run(["start", "--user", "root", "--", "sh", "-c", f"{make}; sleep 30"])
    assert outcome.returncode == EXIT_GUEST_MISBEHAVED, outcome.err
    outcome.one_line(says)
    assert outcome.seconds < 20


@BOTH_BACKENDS
def test_a_fifo_as_status_at_the_end_does_not_hang(backend: str, attack: Attack) -> None:
    # root inside replaces the agent's own status file with a FIFO as the guest powers off.
    script = f"(while :; do rm -f {OUT}/status; mkfifo {OUT}/status 2>/dev/null; sleep 0.01; done) & exit 0"
    outcome = attack.run(["start", "--user", "root", "--", "sh", "-c", script])
    assert outcome.returncode in (0, EXIT_GUEST_MISBEHAVED), outcome.err
    assert outcome.seconds < 30


@pytest.mark.parametrize(
    "make,says",
    [
        ("ln -s {canary} {out}/stdin.read", "symbolic link as stdin.read"),
        ("printf 'garbage\\n' > {out}/stdin.read", "not a count of stdin chunks"),
        ("printf '99999\\n' > {out}/stdin.read", "not a count of stdin chunks"),
        ("mkfifo {out}/stdin.read", "named pipe as stdin.read"),
    ],
    ids=["link", "garbage", "more-than-sent", "fifo"],
)
def test_a_hostile_stdin_report_ends_the_job(attack: Attack, make: str, says: str) -> None:
    script = make.format(canary=attack.canary, out=OUT) + "; sleep 30"
    outcome = attack.run(["start", "--user", "root", "--", "sh", "-c", script], stdin=b"x" * (12 << 20))
    assert outcome.returncode == EXIT_GUEST_MISBEHAVED, outcome.err
    outcome.one_line(says)
    assert outcome.seconds < 20


def test_what_the_guest_leaves_in_the_report_directory_is_removed(attack: Attack) -> None:
    script = f"""cd {OUT}
i=0; while [ $i -lt 300 ]; do mkdir d; cd d; i=$((i + 1)); done; touch f
cd {OUT}; mkdir -p locked/inner; touch locked/inner/f; chmod 0 locked/inner; chmod 500 locked
ln -s {attack.canary} link; ln -s / root; mkfifo pipe
exit 4"""
    outcome = attack.run(["start", "--user", "root", "--", "sh", "-c", script])
    assert outcome.returncode == 4, outcome.err  # check_host: no run directory left
