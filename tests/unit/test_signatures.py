"""Signed images without booting: the ssh-keygen argv (golden), reading a signature (golden, and any bytes),
the site policy's choice, and sign/verify/publish with the real ssh-keygen on small image files."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apppot.cli import main
from apppot.errors import HostError, ImageError, UsageError
from apppot.images import publish, signatures, sites, sshsig, store
from apppot.images.signatures import SignatureError
from tests.conftest import APPPOT

# `ssh-keygen -Y sign -f k1 -n apppot-image` of b"hello\n", and k1's public key and fingerprint (ssh-keygen -l).
GOLDEN_SIGNATURE = b"""-----BEGIN SSH SIGNATURE-----
U1NIU0lHAAAAAQAAADMAAAALc3NoLWVkMjU1MTkAAAAgsmmoQZE9mnF08tbz6h6VHrDyN6
Lrf3yTdSgogut/0TkAAAAMYXBwcG90LWltYWdlAAAAAAAAAAZzaGE1MTIAAABTAAAAC3Nz
aC1lZDI1NTE5AAAAQGu1E2U0jfTClaZzGNKirNe2n5ZcFH8syEam0IAFNvDZdgnDyqPVH+
3/B/mQJdpRrm+lNQ816ivHao8B9C3l5gA=
-----END SSH SIGNATURE-----
"""
GOLDEN_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILJpqEGRPZpxdPLW8+oelR6w8jei6398k3UoKILrf9E5"
GOLDEN_FINGERPRINT = "SHA256:aNu01nSYAxaszyuOhP3gp0WA20mJkmrmG/nHuS8XXyk"


def test_the_ssh_keygen_commands() -> None:
    assert sshsig.sign_argv(Path("/k/id"), Path("/t/record")) == [
        "ssh-keygen", "-q", "-Y", "sign", "-f", "/k/id", "-n", "apppot-image", "/t/record",
    ]  # fmt: skip
    assert sshsig.find_principals_argv(Path("/t/signers"), Path("/t/record.sig")) == [
        "ssh-keygen", "-Y", "find-principals", "-f", "/t/signers", "-s", "/t/record.sig",
    ]  # fmt: skip
    assert sshsig.verify_argv(Path("/t/signers"), "-alice@x", Path("/t/record.sig")) == [
        "ssh-keygen", "-Y", "verify", "-f", "/t/signers", "-I", "-alice@x", "-n", "apppot-image", "-s", "/t/record.sig",
    ]  # fmt: skip


def test_a_signature_says_its_key_and_namespace() -> None:
    parsed = sshsig.parse(GOLDEN_SIGNATURE)
    assert (parsed.namespace, parsed.hash_algorithm, parsed.key_type) == ("apppot-image", "sha512", "ssh-ed25519")
    assert parsed.fingerprint == GOLDEN_FINGERPRINT
    assert parsed.openssh_key == GOLDEN_KEY
    assert sshsig.allowed_signers_line("alice@x", parsed) == f'alice@x namespaces="apppot-image" {GOLDEN_KEY}'


def test_a_damaged_signature_is_said_so_at_every_cut() -> None:
    lines = GOLDEN_SIGNATURE.splitlines()
    import base64

    blob = base64.b64decode(b"".join(lines[1:-1]))
    for cut in range(len(blob)):
        armored = b"\n".join([lines[0], base64.b64encode(blob[:cut]), lines[-1]])
        with pytest.raises(sshsig.DamagedSignature):
            sshsig.parse(armored)


@given(st.binary(max_size=2000))
def test_any_bytes_are_a_signature_or_damaged(data: bytes) -> None:
    for candidate in (data, b"-----BEGIN SSH SIGNATURE-----\n" + data + b"\n-----END SSH SIGNATURE-----\n"):
        with contextlib.suppress(sshsig.DamagedSignature):
            sshsig.parse(candidate)


def test_the_policy_the_first_site_file_and_the_environment_both() -> None:
    site = [Path("/site1/allowed_signers"), Path("/site2/allowed_signers")]
    env = (Path("/etc/apppot/signers"), "APPPOT_TRUSTED_SIGNERS")
    first = (site[0], "the site image directory /site1")
    assert signatures.choose_policy("/etc/apppot/signers", site) == (first, env)  # the environment adds, never replaces
    assert signatures.choose_policy("/etc/apppot/signers", []) == (env,)
    assert signatures.choose_policy("", site) == (first,)
    assert signatures.choose_policy(None, site[1:]) == ((site[1], "the site image directory /site2"),)
    assert signatures.choose_policy(None, []) == ()
    with pytest.raises(UsageError, match="relative path"):
        signatures.choose_policy("signers", site)


def test_a_site_policy_others_could_change_is_refused_not_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp_path.chmod(0o755)
    open_site, plain_site = tmp_path / "open", tmp_path / "plain"
    open_site.mkdir(mode=0o777)
    open_site.chmod(0o777)
    plain_site.mkdir(mode=0o755)
    monkeypatch.delenv(signatures.TRUSTED_SIGNERS_ENV, raising=False)
    monkeypatch.setenv(sites.IMAGE_PATH_ENV, f"{open_site}:{plain_site}")
    assert signatures.site_policies() == ()  # no policy file: an unsafe directory is the image lookup's business
    (plain_site / "allowed_signers").write_text("")
    assert signatures.site_policies() == ((plain_site / "allowed_signers", f"the site image directory {plain_site}"),)
    (open_site / "allowed_signers").write_text("")
    with pytest.raises(ImageError, match=f"site image directory {open_site}: .* writable by others"):
        signatures.site_policies()


# --- with the real ssh-keygen ----------------------------------------------------------------------


def keygen(path: Path, passphrase: str = "") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", path.name, "-f", str(path)], check=True)
    return path


def image_with_record(directory: Path, name: str = "dev", content: bytes = b"an image's bytes") -> Path:
    """An image file and a record naming its content id (the only field verification reads)."""
    directory.mkdir(parents=True, exist_ok=True)
    rid = hashlib.sha256(name.encode()).hexdigest()
    image = directory / f"{store.image_stem(name, rid)}.img"
    image.write_bytes(content)
    content_id = hashlib.sha256(content).hexdigest()
    built = "2026-01-01T00:00:00Z"
    record = store.ImageRecord(name, "r.toml", rid, content_id, "a" * 64, 5, "debian", "bookworm", [], 1, built, 1.0)
    record.write(image.with_suffix(".json"))
    return image


@pytest.fixture
def signed(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A signed image, the key that signed it and an allowed-signers file that trusts it."""
    image = image_with_record(tmp_path / "images")
    key = keygen(tmp_path / "alice")
    done = signatures.sign(image, key, "alice@example.org")
    assert done.signature == image.with_suffix(".json.sig") and done.identity == "alice@example.org"
    signers = tmp_path / "allowed_signers"
    signers.write_text(done.allowed_signers + "\n")
    return image, key, signers


def test_a_good_signature_names_its_signer(signed: tuple[Path, Path, Path]) -> None:
    image, key, signers = signed
    good = signatures.verify(image, signers)
    fingerprint = subprocess.run(["ssh-keygen", "-lf", f"{key}.pub"], capture_output=True, text=True, check=True).stdout
    assert good.signer == "alice@example.org" and good.key == fingerprint.split()[1]
    assert good.content_id == hashlib.sha256(image.read_bytes()).hexdigest()
    # ssh-keygen alone checks it too: the signature is OpenSSH's, of the record's bytes.
    by_hand = ["ssh-keygen", "-Y", "verify", "-f", str(signers), "-I", "alice@example.org", "-n", "apppot-image"]
    record = image.with_suffix(".json").read_bytes()
    assert subprocess.run([*by_hand, "-s", str(image.with_suffix(".json.sig"))], input=record, check=False).returncode == 0


def test_another_key_a_changed_record_or_image_is_not_trusted(signed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    image, _, signers = signed
    good = image.with_suffix(".json.sig").read_bytes()
    signatures.sign(image, keygen(tmp_path / "mallory"), "alice@example.org")
    with pytest.raises(SignatureError, match=f"signed by the key SHA256:.*, which {signers} does not trust"):
        signatures.verify(image, signers)
    image.with_suffix(".json.sig").write_bytes(good)
    record = image.with_suffix(".json")
    data = json.loads(record.read_text())
    record.write_text(json.dumps({**data, "packages": ["backdoor"]}))
    with pytest.raises(SignatureError, match=r"not a good signature of its record .* by alice@example.org"):
        signatures.verify(image, signers)
    record.write_text(json.dumps(data, indent=2) + "\n")
    signatures.verify(image, signers)  # the same bytes again
    image.write_bytes(b"another image")
    with pytest.raises(SignatureError, match="was changed after it was built: its record says content id"):
        signatures.verify(image, signers)
    with pytest.raises(ImageError, match="was changed after it was built"):  # and is not signed as it is
        signatures.sign(image, tmp_path / "alice", "alice@example.org")


@pytest.mark.parametrize("what", ["missing", "link", "fifo", "huge", "garbage", "other namespace", "directory"])
def test_a_signature_file_of_any_kind_is_one_line(signed: tuple[Path, Path, Path], tmp_path: Path, what: str) -> None:
    image, key, signers = signed
    sig = image.with_suffix(".json.sig")
    sig.unlink()
    expected = {
        "missing": "is not signed",
        "link": "is a symbolic link, not a file",
        "fifo": r"is a named pipe \(FIFO\), not a file",
        "huge": "is over 65536 bytes",
        "garbage": "is damaged",
        "other namespace": "was made for 'file', not for AppPot images",
        "directory": "is a directory, not a file",
    }[what]
    if what == "link":
        (tmp_path / "elsewhere.sig").write_bytes(GOLDEN_SIGNATURE)
        sig.symlink_to(tmp_path / "elsewhere.sig")
    elif what == "fifo":
        os.mkfifo(sig)
    elif what == "huge":
        sig.write_bytes(b"-" * (1 << 20))
    elif what == "garbage":
        sig.write_bytes(b"\0\xff" * 100)
    elif what == "other namespace":
        record = image.with_suffix(".json")
        subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-f", str(key), "-n", "file", str(record)], check=True)
    elif what == "directory":
        sig.mkdir()
    with pytest.raises(SignatureError, match=expected):
        signatures.verify(image, signers)


def test_what_cannot_be_signed_or_checked_says_why(
    signed: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image, key, signers = signed
    tiny = tmp_path / "images" / "tiny-0123456789abcdef.img"
    tiny.write_bytes(b"tiny")
    with pytest.raises(ImageError, match=r"the tiny default appliance has no record .* so it cannot be signed"):
        signatures.sign(tiny, key, "alice@example.org")
    with pytest.raises(SignatureError, match="the tiny default appliance has no record"):
        signatures.verify(tiny, signers)
    signers.chmod(0o666)
    with pytest.raises(ImageError, match=r"writable by others than its owner .* chmod go-w"):
        signatures.verify(image, signers)
    signers.chmod(0o644)
    with pytest.raises(ImageError, match=r"no image file .*nothing\.img"):
        signatures.verify(tmp_path / "nothing.img", signers)
    for bad in ("", "alice smith", 'a"b', "a,b", "#x"):
        with pytest.raises(UsageError, match=r"--identity .*: give a name without blanks"):
            signatures.sign(image, key, bad)
    with pytest.raises(UsageError, match=r"--key .*nokey: no such file"):
        signatures.sign(image, tmp_path / "nokey", "alice@example.org")
    locked = keygen(tmp_path / "locked", passphrase="secret")
    # No terminal to ask the passphrase on (a batch job): one line, and the way out.
    argv = ["setsid", APPPOT, "image", "sign", str(image), "--key", str(locked)]
    done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 125 and done.stderr.count("\n") == 1, done.stderr
    assert f"the key {locked} needs its passphrase and there is no terminal to ask it on" in done.stderr
    assert f"ssh-add {locked}" in done.stderr
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    monkeypatch.setattr("apppot.proc.SYSTEM_DIRS", ())
    with pytest.raises(HostError, match="ssh-keygen is not installed: sudo apt-get install openssh-client"):
        signatures.verify(image, signers)


def test_the_commands_exit_statuses(signed: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    image, _, signers = signed
    assert main(["image", "verify", str(image), "--signers", str(signers), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trusted"] and out["signer"] == "alice@example.org"
    image.with_suffix(".json.sig").unlink()
    assert main(["image", "verify", str(image), "--signers", str(signers), "--json"]) == 1
    captured = capsys.readouterr()
    assert not json.loads(captured.out)["trusted"] and captured.err.count("\n") == 1 and "is not signed" in captured.err
    assert main(["image", "verify", str(image), "--signers", str(signers.with_name("none"))]) == 125


def test_publish_carries_the_signature_and_leaves_none_stale(
    signed: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image, key, signers = signed
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cache = store.images_dir()
    cache.mkdir(parents=True)
    for path in (image, image.with_suffix(".json"), image.with_suffix(".json.sig")):
        path.rename(cache / path.name)
    image = cache / image.name
    tmp_path.chmod(0o755)
    site = tmp_path / "site"
    done = publish.publish("dev", site, force=False, kernel=None, with_kernel=False, say=print)
    assert done.signature == site / image.with_suffix(".json.sig").name
    assert stat.S_IMODE(done.signature.stat().st_mode) == 0o644
    assert signatures.verify(done.image, signers).signer == "alice@example.org"
    # Signed again (another key) after it was published: the same image, its new signature goes there.
    other = keygen(tmp_path / "bob")
    signatures.sign(image, other, "bob@example.org")
    again = publish.publish("dev", site, force=False, kernel=None, with_kernel=False, say=print)
    assert again.reused and done.signature.read_bytes() == image.with_suffix(".json.sig").read_bytes()
    # Rebuilt (same recipe, other bytes) and not signed: published over it, no signature of the old one stays.
    for path in (image.with_suffix(".json.sig"), image.with_suffix(".json"), image):
        path.unlink()
    rebuilt = image_with_record(cache, content=b"rebuilt bytes")
    assert rebuilt.name == image.name
    replaced = publish.publish("dev", site, force=True, kernel=None, with_kernel=False, say=print)
    assert replaced.signature is None and not done.signature.exists()
    with pytest.raises(SignatureError, match="is not signed"):
        signatures.verify(replaced.image, signers)
    # A signed image replaced by one of another recipe id: the old one's signature goes with it.
    signatures.sign(rebuilt, key, "alice@example.org")
    publish.publish("dev", site, force=True, kernel=None, with_kernel=False, say=print)
    for path in (rebuilt.with_suffix(".json.sig"), rebuilt.with_suffix(".json"), rebuilt):
        path.unlink()
    newer = image_with_record(cache, name="dev", content=b"third")
    rid = hashlib.sha256(b"other recipe").hexdigest()
    moved = cache / f"{store.image_stem('dev', rid)}.img"
    newer.rename(moved)
    record = json.loads(newer.with_suffix(".json").read_text())
    moved.with_suffix(".json").write_text(json.dumps({**record, "recipe_id": rid}))
    newer.with_suffix(".json").unlink()
    last = publish.publish("dev", site, force=True, kernel=None, with_kernel=False, say=print)
    assert sorted(p.name for p in site.iterdir()) == sorted([moved.name, moved.with_suffix(".json").name])
    assert last.signature is None


def test_a_key_held_by_ssh_agent_signs_by_its_public_half(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A key with a passphrase, loaded once into ssh-agent: a batch job signs with --key KEY.pub, no terminal.
    image = image_with_record(tmp_path / "images")
    key = keygen(tmp_path / "locked", passphrase="secret")
    askpass = tmp_path / "askpass"
    askpass.write_text("#!/bin/sh\necho secret\n")
    askpass.chmod(0o700)
    socket = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(socket)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not socket.exists() and agent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        env = {**os.environ, "SSH_AUTH_SOCK": str(socket), "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force"}
        subprocess.run(["ssh-add", "-q", str(key)], env=env, stdin=subprocess.DEVNULL, check=True, capture_output=True)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(socket))
        done = signatures.sign(image, key.with_suffix(".pub"), "batch@example.org")
    finally:
        agent.terminate()
        agent.wait()
    signers = tmp_path / "allowed_signers"
    signers.write_text(done.allowed_signers + "\n")
    assert signatures.verify(image, signers).signer == "batch@example.org"


@pytest.mark.parametrize("what", ["link", "fifo", "huge", "directory", "missing", "writable"])
def test_an_allowed_signers_file_of_any_kind_is_one_line_and_no_check(
    signed: tuple[Path, Path, Path], tmp_path: Path, what: str
) -> None:
    image, _, signers = signed
    given = tmp_path / "given"
    expected = {
        "link": "is a symbolic link, not a file",
        "fifo": r"is a named pipe \(FIFO\), not a file",
        "huge": "is over 1048576 bytes",
        "directory": "is a directory, not a file",
        "missing": "does not exist",
        "writable": r"writable by others than its owner \(mode 0646\)",
    }[what]
    if what == "link":
        given.symlink_to(signers)
    elif what == "fifo":
        os.mkfifo(given)
    elif what == "huge":
        given.write_bytes(signers.read_bytes() * (1 << 20))
    elif what == "directory":
        given.mkdir()
    elif what == "writable":
        given.write_bytes(signers.read_bytes())
        given.chmod(0o646)
    with pytest.raises(ImageError, match=expected) as refused:
        signatures.verify(image, given)
    assert not isinstance(refused.value, SignatureError)  # `apppot image verify` exits 125: not checked


def test_removing_an_image_removes_its_signature(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    image = image_with_record(store.images_dir())
    signatures.sign(image, keygen(tmp_path / "alice"), "alice@example.org")
    assert image.with_suffix(".json.sig").exists()
    removed, _ = store.remove("dev", keep_newest=False)
    assert [path for path, _ in removed] == [image]
    assert list(store.images_dir().iterdir()) == []


def test_the_policy_checks_the_open_image_not_what_its_name_gives_later(signed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """The descriptor that boots is the one whose bytes must be the signed record's content id: an evil image
    opened, then the signed one put under its name (a RENAME_EXCHANGE race), is refused."""
    image, _, signers = signed
    env = {signatures.TRUSTED_SIGNERS_ENV: str(signers)}
    evil = tmp_path / "evil.img"
    evil.write_bytes(b"evil bytes")
    fd = os.open(evil, os.O_RDONLY)
    try:
        with pytest.raises(SignatureError, match=f"image {image} was changed after it was built.*APPPOT_TRUSTED_SIGNERS"):
            signatures.enforce_policy(image, fd, env)
    finally:
        os.close(fd)
    fd = os.open(image, os.O_RDONLY)
    try:
        assert [good.signer for good in signatures.enforce_policy(image, fd, env)] == ["alice@example.org"]
    finally:
        os.close(fd)


def test_the_site_file_and_the_environment_must_both_trust_the_image(
    signed: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image, _, signers = signed
    site = tmp_path / "site"
    site.mkdir(mode=0o755)
    (site / "allowed_signers").write_text("")  # the site trusts no one
    tmp_path.chmod(0o755)
    monkeypatch.setenv(sites.IMAGE_PATH_ENV, str(site))
    fd = os.open(image, os.O_RDONLY)
    try:
        with pytest.raises(SignatureError, match=f"does not trust.*the site image directory {site}"):
            signatures.enforce_policy(image, fd, {signatures.TRUSTED_SIGNERS_ENV: str(signers)})
    finally:
        os.close(fd)
