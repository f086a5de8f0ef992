"""What AppPot says (issue 16, item 8): no Python None or repr in any record it prints, every refusal
in one line starting `apppot: error: `, and what it does told, not left silent."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
from importlib import resources
from pathlib import Path

import pytest

from apppot.cli import main
from apppot.cli.common import print_record, print_table
from apppot.errors import HostError, UsageError
from apppot.images.store import ImageRecord, StoredImage
from apppot.runner import guest_identity
from apppot.spec import MIB, choose_mem, map_count_needed, mem_for_map_count

REPR = re.compile(r"\bNone\b|\bTrue\b|\bFalse\b|PosixPath\(|\[\]|\['|\{'")


def test_host_root_naming_another_job_user_is_refused_in_one_line() -> None:
    assert guest_identity(None, None, host_uid=0, host_gid=0) == (0, 0, "root", "root")
    assert guest_identity("root", None, host_uid=0, host_gid=0) == (0, 0, "root", "root")
    assert guest_identity("bob", None, host_uid=1001, host_gid=1001) == (1001, 1001, "bob", "user")
    for user, group in (("bob", None), (None, "staff"), ("root", "staff")):
        with pytest.raises(UsageError, match=r"^--(user|group) '\w+': .*root.*: .*\n?$") as refused:
            guest_identity(user, group, host_uid=0, host_gid=0)
        assert "\n" not in str(refused.value)


@pytest.mark.parametrize("host_uid", [0, 1001])
@pytest.mark.parametrize(
    ("user", "group"), [("two words", None), ("new\nline", None), ("\x1b[2Jx", None), (None, "two words"), ("root", "a\nb")]
)
def test_a_malformed_name_is_refused_as_malformed_whoever_asks(user: str | None, group: str | None, host_uid: int) -> None:
    with pytest.raises(UsageError) as refused:
        guest_identity(user, group, host_uid=host_uid, host_gid=host_uid)
    message = str(refused.value)
    bad = user if group is None else group
    assert message.startswith(f"invalid {'user' if group is None else 'group'} name {bad!r}"), message
    assert "\n" not in message and "\x1b" not in message


def test_host_root_refusal_quotes_the_name() -> None:
    with pytest.raises(UsageError, match=r"^--user 'bob': "):
        guest_identity("bob", None, host_uid=0, host_gid=0)


@pytest.mark.parametrize("host_files", [True, False])
def test_user_root_with_another_group_is_refused_not_dropped(host_files: bool) -> None:
    with pytest.raises(UsageError, match=r"^--group 'staff' with --user root: .*drop --group") as refused:
        guest_identity("root", "staff", host_uid=1001, host_gid=1001, host_files=host_files)
    assert "\n" not in str(refused.value)
    assert guest_identity("root", "root", host_uid=1001, host_gid=1001, host_files=host_files) == (0, 0, "root", "root")


def test_a_seed_shares_no_host_files_so_host_root_may_name_its_user() -> None:
    assert guest_identity("bob", None, host_uid=0, host_gid=0, host_files=False) == (1000, 1000, "bob", "user")
    assert guest_identity("bob", "staff", host_uid=0, host_gid=0, host_files=False) == (1000, 1000, "bob", "staff")
    assert guest_identity(None, None, host_uid=0, host_gid=0, host_files=False) == (0, 0, "root", "root")
    assert guest_identity("bob", None, host_uid=1001, host_gid=1001, host_files=False) == (1001, 1001, "bob", "user")


@pytest.mark.skipif(os.getuid() != 0, reason="what host root is told")
@pytest.mark.skipif(shutil.which("xorriso") is None, reason="xorriso writes the seed")
def test_host_root_cloud_seed_runs_the_job_as_the_named_user(tmp_path: Path) -> None:
    seed = tmp_path / "seed.iso"
    assert main(["cloud-seed", "-o", str(seed), "--no-jobdir", "--user", "bob", "--", "id"]) == 0
    out = tmp_path / "user-data"
    extract = ["xorriso", "-osirrox", "on", "-indev", str(seed), "-extract", "/user-data", str(out)]
    subprocess.run(extract, capture_output=True, check=True)
    settings = out.read_text()
    assert "A_USER='bob'\n" in settings and "A_UID='1000'\n" in settings, settings


@pytest.mark.skipif(os.getuid() != 0, reason="what host root is told")
def test_host_root_start_with_another_user_is_refused_before_anything_starts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["start", "--image", "/nonexistent.img", "--user", "bob", "--", "true"]) == 125
    err = capsys.readouterr().err
    assert err.startswith("apppot: error: --user 'bob': ") and err.count("\n") == 1, err


@pytest.mark.parametrize("count", [65530, 100000, 131072, 262144, 1 << 20])
def test_doctor_names_the_memory_the_start_command_really_gives(count: int) -> None:
    from apppot.cli.vm import map_count_check

    line = map_count_check(count).detail
    said = int(re.search(r"up to (\d+) MiB", line).group(1))  # type: ignore[union-attr]
    assert said * MIB == mem_for_map_count(count)
    assert choose_mem(said * MIB, count, 1 << 50) == (said * MIB, None)  # accepted as asked
    assert choose_mem((said + 1) * MIB, count, 1 << 50).bytes == said * MIB  # one more is lowered to it


@pytest.mark.parametrize("count", [20000, 30000, 50000, 61440, 61439, 65530, 126975, 126976, 131072, 1 << 20])
def test_doctor_names_what_a_start_without_mem_gets(count: int) -> None:
    from apppot.cli.vm import map_count_check

    check = map_count_check(count)
    said = int(re.search(r"a start without --mem gets (\d+) MiB", check.detail).group(1))  # type: ignore[union-attr]
    assert choose_mem(None, count, 1 << 50).bytes == said * MIB
    assert map_count_needed(said * MIB) <= count  # never more than the host can map (it would hang)
    assert check.ok is None and "\n" not in check.detail


@pytest.mark.parametrize("count", [0, 200, 2000, 12287])
def test_a_limit_too_low_for_any_guest_is_a_failed_doctor_check_and_a_refused_start(count: int) -> None:
    from apppot.cli.vm import map_count_check

    check = map_count_check(count)
    assert check.ok is False and "refused below 64 MiB" in check.detail and "sudo sysctl -w vm.max_map_count=" in check.detail
    with pytest.raises(HostError, match=r"sudo sysctl -w vm.max_map_count=\d+"):
        choose_mem(None, count, 1 << 50)


def fake_image(directory: Path, name: str, built: str, record: bool = True) -> Path:
    image = directory / f"{name}.img"
    with image.open("wb") as f:
        f.truncate(1 << 20)
        f.write(b"x" * 8192)
    if record:
        made = ImageRecord(
            name.split("-")[0],
            "r.toml",
            recipe_id="0" * 64,
            content_id="1" * 64,
            agent="2" * 64,
            protocol=4,
            distribution="debian",
            suite="trixie",
            packages=[],
            size_bytes=1 << 20,
            built=built,
            build_seconds=1.0,
        )
        made.write(image.with_suffix(".json"))
    return image


def test_every_image_record_and_row_renders_without_none(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from apppot.cli.images import _image_row

    tiny = fake_image(tmp_path, "tiny-0123456789abcdef", "", record=False)
    app = fake_image(tmp_path, "app-1", "", True)
    rows = [_image_row(StoredImage(tiny, None)), _image_row(StoredImage(app, ImageRecord.read(app.with_suffix(".json"))))]
    for row in rows:
        print_record(row, False)
    print_table(rows, ["name", "id", "size", "used", "built", "where", "path"])
    out = capsys.readouterr().out
    assert not REPR.search(out), out
    assert re.search(r"^built: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", out, re.MULTILINE), out  # the tiny appliance's too


def test_a_site_copy_of_the_tiny_appliance_has_no_build_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Its file time is when the copy was made, not when it was built: unknown, not passed off as built."""
    from apppot.cli.images import _image_row

    tiny = fake_image(tmp_path, "tiny-0123456789abcdef", "", record=False)
    row = _image_row(StoredImage(tiny, None, site=tmp_path))
    print_record(row, False)
    assert "\nbuilt: -\n" in capsys.readouterr().out


def test_yes_and_no_in_records_and_tables_not_true_and_false(capsys: pytest.CaptureFixture[str]) -> None:
    record: dict[str, object] = {"seccomp_supported": False, "reused": True, "count": 0}
    print_record(record, False)
    print_table([record], list(record))
    out = capsys.readouterr().out
    assert not REPR.search(out), out
    assert "seccomp_supported: no\nreused: yes\ncount: 0\n" in out and out.splitlines()[-1].split() == ["no", "yes", "0"], out
    print_record(record, True)
    assert json.loads(capsys.readouterr().out) == record  # JSON keeps its booleans


def test_a_changes_archive_whose_manifest_has_null_fields_is_refused_not_shown_as_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from apppot import snap

    path = tmp_path / "c.tar.gz"
    manifest = json.dumps(
        {"format": "apppot-changes", "base": "b" * 64, "created": None, "tool": None, "deleted": [], "added": [], "modified": []}
    ).encode()
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(snap.MANIFEST_MEMBER)
        info.size = len(manifest)
        import io

        tar.addfile(info, io.BytesIO(manifest))
    assert main(["changes", "show", str(path)]) == 125
    captured = capsys.readouterr()
    assert "None" not in captured.out + captured.err and captured.err.startswith("apppot: error: "), captured


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("APPPOT_IMAGE_PATH", "")
    images = tmp_path / "apppot" / "images"
    images.mkdir(parents=True)
    return images


def test_image_remove_old_says_what_it_removed_or_that_nothing_was(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake_image(cache, "app-1111111111111111", "2026-01-01T00:00:00Z")
    assert main(["image", "remove", "app", "--old"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("nothing to remove: ") and "app-1111111111111111.img" in out, out
    fake_image(cache, "app-2222222222222222", "2026-02-01T00:00:00Z")
    assert main(["image", "remove", "app", "--old", "--json"]) == 0
    removed = json.loads(capsys.readouterr().out)
    assert [(Path(r["path"]).name, r["bytes"] > 0) for r in removed["removed"]] == [("app-1111111111111111.img", True)]
    assert main(["image", "remove", "app"]) == 0
    out = capsys.readouterr().out
    assert re.fullmatch(r"removed \S+/app-2222222222222222\.img \(\d+\.\dK\)\n", out), out


AGENT = resources.files("apppot.guest").joinpath("apppot-init")


@pytest.mark.parametrize("shell", [s for s in ("/bin/busybox", "/bin/dash") if shutil.which(s)])
def test_the_agents_refusals_start_as_the_hosts_do(shell: str) -> None:
    """A refusal from inside the guest (a changes archive of another base, no command) reaches the
    user's stderr as one line, as the host's own refusals do."""
    argv = [shell, "sh"] if shell.endswith("busybox") else [shell]
    script = (
        '. "$AGENT"; log() { :; }; apppot_mount_out() { :; }; apppot_finish() { exit "$1"; }; ERR_DEV=/dev/stderr; '
        'apppot_fail "the changes archive was made against base 0123, but this system is base 4567"'
    )
    env = {"PATH": "/usr/bin:/bin", "AGENT": str(AGENT), "APPPOT_AGENT_LIBRARY": "1"}
    r = subprocess.run([*argv, "-c", script], env=env, capture_output=True, text=True, timeout=10, check=False)
    assert r.returncode == 125
    assert r.stderr == "apppot: error: the changes archive was made against base 0123, but this system is base 4567\n"


def test_clean_says_what_it_removed_and_counts_no_link_the_job_left(
    cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from apppot.submit import jobs

    stage = jobs.jobs_dir() / "s1"
    (stage / "job").mkdir(parents=True)
    (stage / "job" / "out.dat").write_bytes(b"x" * 40000)
    big = cache.parent / "big"
    big.write_bytes(b"y" * 400000)
    (stage / "job" / "link").symlink_to(big)  # the job's link: neither followed nor counted
    jobs.JobRecord("slurm-7", "slurm", "7", "n", str(stage), [], "2026-01-01T00:00:00Z").write()
    # The batch system's answer is the one thing not run here (no cluster in unit tests).
    monkeypatch.setattr(jobs, "status", lambda job_id: jobs.JobStatus(job_id, "COMPLETED", 0, True, ""))
    assert main(["clean", "slurm-7"]) == 0
    out = capsys.readouterr().out
    assert re.fullmatch(rf"cleaned slurm-7: removed its staging directory {stage} \((4\d|5\d)\.\dK\)\n", out), out
    assert not stage.exists() and big.exists()


def test_a_records_installed_packages_are_counted_for_people_and_listed_in_json() -> None:
    from apppot.cli.images import _for_people

    record: dict[str, object] = {"name": "dev", "installed": ["a=1", "b=2"]}
    assert _for_people(record)["installed"] == "2 packages with their versions (--json lists them)"
    assert record["installed"] == ["a=1", "b=2"]
    assert _for_people({"name": "tiny"}) == {"name": "tiny"}
