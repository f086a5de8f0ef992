"""Base + changes on a Debian appliance: record, pack in a persistent COW, merge into a pristine job."""

from __future__ import annotations

import io
import json
import re
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from apppot import snap
from apppot.images import tiny
from tests.integration.conftest import apppot_cli, own_kernel_only

pytestmark = pytest.mark.uml

MODIFY = """set -e
echo "new file" > /opt/added.txt
echo "changed motd" > /etc/motd
rm /usr/share/doc/mawk/copyright
chmod 0600 /etc/debian_version
ln -s /opt/added.txt /usr/local/bin/added-link
useradd -m -s /bin/sh alice
mkdir -p /opt/newdir/sub && echo x > /opt/newdir/sub/f
apppot-snap changes
apppot-snap manifest /home/user/job/modified.manifest.gz
"""
CHECK = "cat /etc/motd; id -u alice; ls /usr/share/doc/mawk/copyright 2>/dev/null || echo deleted; stat -c %a /etc/debian_version"


uml_kernel = own_kernel_only  # AppPot's UML kernel only


@pytest.fixture(scope="module")
def made_changes(cache_home: Path, debian_dev: dict[str, object], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's session in a persistent COW of the dev appliance, and the changes archive it made."""
    job = tmp_path_factory.mktemp("snap-work")
    (job / "modify.sh").write_text(MODIFY)
    r = apppot_cli(
        cache_home, "start", "--image", "debian-dev", "--cow", str(job.parent / "mine.cow"), "--", "sh", "modify.sh", cwd=job
    )
    assert r.returncode == 0, r.err
    (archive,) = job.glob("apppot.*.changes.tar.gz")
    assert re.fullmatch(rf"apppot\.{time.strftime('%Y-%m-%d')}\.changes\.tar\.gz", archive.name)
    assert re.search(rb"apppot-snap: /home/user/job/apppot\..*: \d+ added, \d+ changed, 1 deleted", r.stdout)
    return archive


def test_changes_merged_at_boot_give_exactly_the_users_system(
    cache_home: Path, debian_dev: dict[str, object], made_changes: Path, tmp_path: Path
) -> None:
    image = Path(str(debian_dev["path"]))
    job = tmp_path / "job"
    job.mkdir()
    r = apppot_cli(
        cache_home, "start", "--image", "debian-dev", "--changes", str(made_changes), "--",
        "sh", "-c", f"apppot-snap manifest /home/user/job/merged.manifest.gz >/dev/null; {CHECK}", cwd=job,
    )  # fmt: skip
    assert (r.returncode, r.stdout) == (0, b"changed motd\n1000\ndeleted\n600\n"), r.err
    modified = snap.read_manifest(str(made_changes.parent / "modified.manifest.gz"))
    merged = snap.read_manifest(str(job / "merged.manifest.gz"))
    assert merged.entries == modified.entries
    assert merged.id == modified.id
    # The pristine image without the archive is the base.
    r = apppot_cli(cache_home, "start", "--image", "debian-dev", "--", "sh", "-c", CHECK, cwd=job)
    assert r.returncode == 0, r.err
    assert b"changed motd" not in r.stdout and r.stdout.endswith(b"/usr/share/doc/mawk/copyright\n644\n")
    # Nothing of it reached the base image.
    assert tiny.image_id(image) == debian_dev["content_id"]


def test_an_archive_in_the_job_directory_is_merged_automatically(
    cache_home: Path, debian_dev: dict[str, object], made_changes: Path, tmp_path: Path
) -> None:
    job = tmp_path / "job"
    job.mkdir()
    (job / "apppot-changes.tar.gz").write_bytes(made_changes.read_bytes())
    r = apppot_cli(cache_home, "start", "--image", "debian-dev", "--", "sh", "-c", CHECK, cwd=job)
    assert (r.returncode, r.stdout) == (0, b"changed motd\n1000\ndeleted\n600\n"), r.err


def test_changes_show_lists_the_archive(cache_home: Path, made_changes: Path, debian_dev: dict[str, object]) -> None:
    r = apppot_cli(cache_home, "changes", "show", str(made_changes))
    assert r.returncode == 0, r.err
    text = r.stdout.decode()
    assert f"base: {debian_dev['base_id']}" in text
    assert re.search(r"^adds \(\d+\):$(.|\n)*^  /opt/added.txt$", text, re.M)
    assert re.search(r"^modifies \(\d+\):$(.|\n)*^  /etc/motd$", text, re.M)
    assert re.search(r"^deletes \(1\):\n  /usr/share/doc/mawk/copyright$", text, re.M)
    info = json.loads(apppot_cli(cache_home, "changes", "show", "--json", str(made_changes)).stdout)
    assert info["deleted"] == ["/usr/share/doc/mawk/copyright"] and "/usr/local/bin/added-link" in info["added"]


def test_an_archive_of_another_base_is_refused(
    cache_home: Path, debian_dev: dict[str, object], glpk_image: dict[str, object], tmp_path: Path
) -> None:
    job = tmp_path / "job"
    job.mkdir()
    r = apppot_cli(
        cache_home,
        "start",
        "--image",
        "glpk",
        "--",
        "sh",
        "-c",
        "touch /opt/x && apppot-snap changes /home/user/job/other.tar.gz",
        cwd=job,
    )
    assert r.returncode == 0, r.err
    r = apppot_cli(cache_home, "start", "--image", "debian-dev", "--changes", str(job / "other.tar.gz"), "--", "true", cwd=job)
    assert r.returncode == 125
    other, this = str(glpk_image["base_id"])[:16], str(debian_dev["base_id"])[:16]
    assert r.err.startswith("apppot: error: the changes archive was made against base ") and r.err.count("\n") == 1, r.err
    assert f"made against base {other}, but this system is base {this}" in r.err
    assert "merge it with the COW it was made in" in r.err
    # merge inside a running system says the same, and --force overrides it
    r = apppot_cli(cache_home, "start", "--image", "debian-dev", "--", "apppot-snap", "merge", "other.tar.gz", cwd=job)
    assert r.returncode == 1 and b"pass --force" in r.stderr
    r = apppot_cli(
        cache_home,
        "start",
        "--image",
        "debian-dev",
        "--",
        "sh",
        "-c",
        "apppot-snap merge --force other.tar.gz && ls /opt/x",
        cwd=job,
    )
    assert (r.returncode, r.stdout.splitlines()[-1]) == (0, b"/opt/x"), r.err


def hand_made_archive(path: Path, base: str, members: list[tuple[str, bytes]]) -> Path:
    """A changes archive made by hand: a manifest that lists the given files as added, then the files."""
    manifest = {"format": "apppot-changes", "base": base, "created": "", "tool": "", "deleted": [], "modified": []}
    manifest["added"] = [name for name, _ in members]
    with tarfile.open(path, "w:gz") as tar:
        for name, data in ((snap.MANIFEST_MEMBER, json.dumps(manifest).encode()), *members):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_a_malicious_archive_never_reaches_the_guest(cache_home: Path, debian_dev: dict[str, object], tmp_path: Path) -> None:
    evil = hand_made_archive(tmp_path / "evil.tar.gz", str(debian_dev["base_id"]), [("etc/../../../tmp/escaped", b"x")])
    job = tmp_path / "job"
    job.mkdir()
    r = apppot_cli(cache_home, "start", "--image", "debian-dev", "--changes", str(evil), "--", "true", cwd=job)
    assert r.returncode == 125
    assert "member 'etc/../../../tmp/escaped' has an absolute path, '..'" in r.err
    assert r.err.count("\n") == 1


def test_the_tiny_appliance_has_no_base_to_merge_onto(apppot, jobdir: Path, made_changes: Path) -> None:
    r = apppot(["start", "--changes", str(made_changes), "--", "true"], cwd=jobdir)
    assert r.returncode == 125
    assert "this image has no recorded base state" in r.err


def test_recording_a_base_in_a_job_and_its_speed(cache_home: Path, debian_dev: dict[str, object], tmp_path: Path) -> None:
    """`apppot-snap base` and `changes` over the whole dev appliance (times are reported, not judged)."""
    job = tmp_path / "job"
    job.mkdir()
    script = "apppot-snap base && touch /opt/y && apppot-snap changes -n"
    r = apppot_cli(cache_home, "start", "--image", "debian-dev", "--", "sh", "-c", script, cwd=job)
    assert r.returncode == 0, r.err
    assert re.search(
        rb"^apppot-snap: base [0-9a-f]{16} recorded in /var/lib/apppot/base.manifest.gz: \d+ paths in [\d.]+ s$", r.stdout, re.M
    )
    assert b"WARNING: replacing the base state /var/lib/apppot/base.manifest.gz" in r.stderr
    assert r.stdout.endswith(b"add /opt/y\n")


def test_the_seed_flow_records_a_base_in_the_image_opened_writable_on_purpose(
    cache_home: Path, debian_dev: dict[str, object], tmp_path: Path
) -> None:
    image = tmp_path / "app.img"
    subprocess.run(["cp", "--sparse=always", str(debian_dev["path"]), str(image)], check=True)
    job = tmp_path / "job"
    job.mkdir()
    r = apppot_cli(cache_home, "start", "--image", str(image), "--writable-image", "--", "apppot-snap", "base", cwd=job)
    assert r.returncode == 125 and "is not writable by you; make it writable" in r.err
    image.chmod(0o644)
    r = apppot_cli(
        cache_home,
        "start",
        "--image",
        str(image),
        "--writable-image",
        "--",
        "sh",
        "-c",
        "echo mine >/etc/motd && apppot-snap base",
        cwd=job,
    )
    assert r.returncode == 0, r.err
    new_base = re.search(rb"base ([0-9a-f]{16}) recorded", r.stdout)
    assert new_base is not None
    # Later jobs (with their own COWs) start from the new base, which includes the new motd.
    r = apppot_cli(
        cache_home,
        "start",
        "--image",
        str(image),
        "--",
        "sh",
        "-c",
        "cat /etc/motd /var/lib/apppot/base.id; apppot-snap changes -n",
        cwd=job,
    )
    assert r.returncode == 0, r.err
    motd, base_id, *rest = r.stdout.decode().splitlines()
    assert (motd, base_id[:16], rest) == ("mine", new_base.group(1).decode(), [])
    assert base_id != debian_dev["base_id"]


def test_an_archive_writing_through_the_images_own_links_cannot_reach_the_host(
    cache_home: Path, debian_dev: dict[str, object], tmp_path: Path
) -> None:
    """/var/run is the image's link to /run, where the control directory is mounted: the host cannot know
    the image's links, so the agent merges with the control directory read-only and the job directory
    not yet mounted."""
    members = [("var/run/apppot/status", b"0\n"), ("var/run/apppot/planted", b"x")]
    sneaky = hand_made_archive(tmp_path / "sneaky.tar.gz", str(debian_dev["base_id"]), members)
    job = tmp_path / "job"
    job.mkdir()
    r = apppot_cli(cache_home, "start", "--image", "debian-dev", "--changes", str(sneaky), "--", "true", cwd=job)
    assert r.returncode == 125, r.err
    assert "cannot merge the changes archive" in r.err
    assert list(job.iterdir()) == []
