"""The README's examples that run on one machine (no test cluster, no QEMU), pasted as a newcomer would.

Each runs as the unprivileged user `apppot-test` (and `apppot-test2` for the site's second user) with a
plain environment: HOME of its own, an empty cache but for the kernel `make demo` builds into it, and
`PATH=~/.local/bin:/usr/local/bin:/usr/bin:/bin` as the README's install step leaves it. A line the
README gives to root runs as root, as written, in the user's shell environment, through Debian's
`sudo` (which resets the environment and searches only its secure_path).
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from apppot.images.recipe import parse_recipe
from tests.conftest import ROOT, TEST_USER, chown_to, open_to_all
from tests.integration.conftest import own_kernel_only
from tests.integration.test_session import Tmux, read_exit, tmux_session, unique_id, wait_for
from tests.readme import Block, Command, Ran, example, fill, run

pytestmark = pytest.mark.uml
uml_kernel = own_kernel_only  # the kernel `make demo` builds; the kernel matrix is test_start's

TEST_USER_2 = "apppot-test2"
PLAIN_PATH = "/usr/local/bin:/usr/bin:/bin"
SUDO_SECURE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # Debian's sudoers
SESSION_TIMEOUT_S = 120.0


@dataclass
class User:
    name: str
    home: Path
    path: str  # PATH as the README's install step leaves it

    @property
    def env(self) -> dict[str, str]:
        return {"PATH": self.path, "HOME": str(self.home), "TERM": "xterm-256color"}

    def run(self, script: str, cwd: Path, timeout: float = 900) -> Ran:
        started = time.monotonic()
        ran = run(script, cwd, self.env, user=self.name, timeout=timeout)
        print(f"{self.name}: {time.monotonic() - started:.1f} s: {script.splitlines()[-1][:100]}")
        return ran

    def dir(self, name: str) -> Path:
        return owned(self.home / name, self.name)


def owned(path: Path, user: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    chown_to(path, user)
    return path


def chown_tree(path: Path, user: str) -> None:
    for p in [path, *path.rglob("*")]:
        pw = pwd.getpwnam(user)
        os.lchown(p, pw.pw_uid, pw.pw_gid)


def new_home(parent: Path, user: str, kernel: Path) -> Path:
    """A home of user's own holding, in its cache, the kernel `make demo` (`apppot kernel build`) leaves."""
    parent.mkdir(parents=True, exist_ok=True)
    open_to_all(parent)
    home = owned(parent / f"home-{user}", user)
    kernels = home / ".cache" / "apppot" / "kernels"
    kernels.mkdir(parents=True)
    shutil.copytree(kernel.parent, kernels / kernel.parent.name)
    (kernels / "default").symlink_to(kernel.parent.name)
    chown_tree(home / ".cache", user)
    return home


def clone(target: Path, user: str) -> Path:
    """A fresh clone of this repository, with the working tree's tracked files (edits not yet committed too)."""
    subprocess.run(["git", "clone", "-q", str(ROOT), str(target)], check=True, capture_output=True)
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout.decode()
    for name in filter(None, tracked.split("\0")):
        source = ROOT / name
        if source.is_file() and not source.is_symlink():
            shutil.copy2(source, target / name)
    chown_tree(target, user)
    return target


def with_sudo(env: dict[str, str]) -> dict[str, str]:
    """env, checked to find Debian's `sudo` (make test installs it): root's lines run through the real one."""
    assert shutil.which("sudo", path=env["PATH"]), "sudo is not installed: make host-test installs it"
    return env


def as_root(line: str, user: User, cwd: Path) -> Ran:
    """A line the README gives to root, typed in user's shell (their HOME and PATH), run as root."""
    started = time.monotonic()
    ran = run("set -e\n" + line, cwd, with_sudo(user.env))
    print(f"root: {time.monotonic() - started:.1f} s: {line[:100]}")
    return ran


def copy_image(record: dict[str, object], cache: Path, user: str) -> None:
    """The session's debian-dev in user's cache, as `apppot image build` leaves it (a later build is a hit)."""
    images = owned(cache / "apppot" / "images", user)
    image = Path(str(record["path"]))
    for source in (image, image.with_suffix(".json")):
        subprocess.run(["cp", "--sparse=always", str(source), str(images / source.name)], check=True)
        chown_to(images / source.name, user)


@pytest.fixture(scope="session")
def users_exist() -> None:
    for name in (TEST_USER, TEST_USER_2):
        try:
            pwd.getpwnam(name)
        except KeyError:
            pytest.skip(f"no user {name}: run 'make host-test' (tools/host_setup.py --test) as root")
    if os.geteuid() != 0:
        pytest.skip("switching to the test users needs root")


@pytest.fixture(scope="session")
def installed(users_exist: None, own_kernel: Path, tmp_path_factory: pytest.TempPathFactory) -> User:
    """apppot-test after `make install` in a clone of its own, as the README's install example does it."""
    home = new_home(tmp_path_factory.mktemp("readme-installed"), TEST_USER, own_kernel)
    checkout = clone(home / "apppot", TEST_USER)
    plain = User(TEST_USER, home, PLAIN_PATH)  # a shell opened before ~/.local/bin existed
    ran = plain.run(example("install").script(), checkout, timeout=300)
    assert ran.returncode == 0, ran.stderr
    bin_dir = home / ".local" / "bin"
    assert ran.stdout.splitlines() == [
        f"installed {bin_dir}/apppot (and apppot-start, apppot-snap beside it)",
        f"note: {bin_dir} is not on your PATH, so a bare 'apppot' is not found; run {bin_dir}/apppot, or add it "
        f'to PATH (e.g. in ~/.profile): export PATH="{bin_dir}:$PATH"',
        "hello",
    ], ran.stderr
    first = home / "apppot-first"  # the first job's directory: not the checkout, which a job could write into
    assert first.is_dir() and first.stat().st_uid == pwd.getpwnam(TEST_USER).pw_uid
    return User(TEST_USER, home, f"{bin_dir}:{PLAIN_PATH}")


def test_make_demo_in_a_fresh_clone_runs_a_job_and_says_where_apppot_is(
    users_exist: None, own_kernel: Path, tmp_path: Path
) -> None:
    home = new_home(tmp_path, TEST_USER, own_kernel)  # the kernel build is then a cache hit, as on a second run
    checkout = clone(home / "apppot", TEST_USER)
    user = User(TEST_USER, home, PLAIN_PATH)
    ran = user.run(example("demo").script(), checkout, timeout=600)
    assert ran.returncode == 0, ran.stderr
    assert "job ran on Linux" in ran.stdout and (checkout / "demo-job" / "result.txt").read_text() == "20\n"
    where = f"apppot is {checkout}/.venv/bin/apppot (not on your PATH); 'make install' installs it for you as ~/.local/bin/apppot"
    assert ran.stdout.splitlines()[-1] == where, ran.stdout
    assert os.access(checkout / ".venv" / "bin" / "apppot", os.X_OK)


def test_first_job(installed: User) -> None:
    scratch = installed.dir("first-job")
    myjob = owned(scratch / "myjob", installed.name)
    (myjob / "input.dat").write_bytes(b"x" * 1234)
    ran = installed.run(example("first-job").script(), scratch)
    assert (ran.returncode, ran.stdout) == (0, "done\n0\n"), ran.stderr
    result = myjob / "result.txt"
    assert result.read_text() == "1234\n" and result.stat().st_uid == pwd.getpwnam(installed.name).pw_uid


def test_recipe_toml_parses_to_what_its_comments_say(tmp_path: Path) -> None:
    recipe = tmp_path / "chem.toml"
    recipe.write_text(example("recipe-toml").text)
    (tmp_path / "src").mkdir()
    (tmp_path / "autorun.sh").write_text("#!/bin/sh\necho run\n")
    parsed = parse_recipe(recipe)
    assert (parsed.name, parsed.description, parsed.size_bytes) == ("chem", "my application", 4 << 30)
    assert (parsed.packages, parsed.commands) == (("build-essential",), ("make -C /opt/src install",))
    assert parsed.autorun == "#!/bin/sh\necho run\n"
    assert tuple(parsed.base) == ("debian", "bookworm", "http://deb.debian.org/debian", ("main",))
    [copy] = parsed.files
    assert (copy.source, copy.target, copy.mode) == (tmp_path / "src", "/opt/src", 0o755)


def test_recipes(installed: User, debian_dev: dict[str, object], tmp_path: Path) -> None:
    checkout = installed.home / "apppot"
    copy_image(debian_dev, installed.home / ".cache", installed.name)  # the build below is then a cache hit
    job = owned(checkout / "job", installed.name)
    script = job / "build-and-test.sh"
    script.write_text("#!/bin/sh -e\ntar xzf myproj.tar.gz\ncd myproj && make -s && ./hello\n")
    script.chmod(0o755)
    project = owned(installed.home / "src", installed.name)
    (tmp_path / "myproj").mkdir()
    (tmp_path / "myproj" / "Makefile").write_text("hello: hello.c\n\tcc -o hello hello.c\n")
    (tmp_path / "myproj" / "hello.c").write_text('#include <stdio.h>\nint main(void) { puts("built and tested"); return 0; }\n')
    with tarfile.open(project / "myproj.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "myproj", "myproj")
    chown_tree(installed.home / "src", installed.name)
    chown_tree(job, installed.name)

    [build, *rest] = example("recipes").commands()
    assert build.text.startswith("sudo "), build.text  # root's: building a Debian appliance
    ran = as_root(build.text, installed, checkout)
    assert ran.returncode == 0, ran.stderr
    ran = installed.run("set -e\n" + "\n".join(c.text for c in rest), checkout)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.endswith("built and tested\n"), ran.stdout
    assert "debian-dev" in ran.stdout  # image list and info
    shutil.rmtree(job)


# --- snap: a session at the guest's prompt ---------------------------------------------------------


def typed_at_prompt(tmux: Tmux, prompt: str, command: str) -> None:
    """Types command at the guest's prompt and waits for the next prompt."""

    def prompts() -> int:
        return sum(1 for line in tmux.screen() if line.startswith(prompt))

    before = prompts()
    tmux.type(command)
    wait_for(
        lambda: prompts() > before and [ln for ln in tmux.screen() if ln][-1] == prompt,
        SESSION_TIMEOUT_S,
        lambda: f"{command!r} to finish at {prompt!r}; {tmux.dump()}",
    )


def run_session(user: User, cwd: Path, line: str, typed: list[Command], tmp_path: Path) -> str:
    """Runs line as user in a tmux pane, types the guest-prompt lines at the prompt; returns the screen."""
    tmp_path.mkdir()
    open_to_all(tmp_path)
    exit_file = tmp_path / "exit"
    umid = unique_id()
    env = [f"{k}={v}" for k, v in user.env.items()]
    as_user = ["setpriv", f"--reuid={user.name}", f"--regid={user.name}", "--init-groups", "--", "env", "-i", *env]
    pane = f"{shlex.join([*as_user, 'bash', '-c', line + chr(10)])}; echo EXIT=$? > {shlex.quote(str(exit_file))}"
    prompt = typed[0].prompt or ""
    started = time.monotonic()
    with tmux_session(tmp_path / "tmux.sock", cwd, pane, umid) as tmux:
        wait_for(lambda: prompt in tmux.screen(), SESSION_TIMEOUT_S, lambda: f"{prompt} on {tmux.dump()}")
        for c in typed[:-1]:
            typed_at_prompt(tmux, prompt, c.text)
        tmux.type(typed[-1].text)  # the last one ends the session
        wait_for(lambda: read_exit(exit_file), SESSION_TIMEOUT_S, lambda: f"the session to end; {tmux.dump()}")
        screen = tmux.dump()
    print(f"{user.name}: {time.monotonic() - started:.1f} s: session {line}")
    assert read_exit(exit_file) == "EXIT=0", screen
    return screen


def run_with_sessions(block: Block, user: User, cwd: Path, fill_with: dict[str, str], tmp_path: Path) -> list[str]:
    """Runs block's host lines as user; a line followed by guest-prompt lines starts a session in tmux, where
    those lines are typed. Returns the host lines' stdout, one entry per group of lines."""
    commands = block.commands()
    outputs: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            ran = user.run("set -e\n" + fill("\n".join(pending), fill_with), cwd)
            assert ran.returncode == 0, ran.stderr
            outputs.append(ran.stdout)
            pending.clear()

    for i, command in enumerate(commands):
        if command.prompt:
            continue
        typed = []
        for c in commands[i + 1 :]:
            if not c.prompt:
                break
            typed.append(c)
        if not typed:
            pending.append(command.text)
            continue
        flush()
        outputs.append(run_session(user, cwd, fill(command.text, fill_with), typed, tmp_path / f"session-{i}"))
    flush()
    return outputs


def test_snap(installed: User, debian_dev: dict[str, object], tmp_path: Path) -> None:
    scratch = installed.dir("snap")
    subprocess.run(["cp", "--sparse=always", str(debian_dev["path"]), str(scratch / "app.img")], check=True)
    chown_to(scratch / "app.img", installed.name)
    (scratch / "app.img").chmod(0o644)
    outputs = run_with_sessions(example("snap"), installed, scratch, {"./run-my-version": "cat /etc/myapp.conf"}, tmp_path)
    shown = outputs[-1]
    assert "my version\nmy version\n" in shown, outputs  # with --changes, then merged automatically
    assert "etc/myapp.conf" in shown, shown  # changes show lists the added file
    assert (scratch / "mine.changes.tar.gz").stat().st_uid == pwd.getpwnam(installed.name).pw_uid


# --- site install: root, alice (apppot-test) and bob (apppot-test2) ---------------------------------


def sections(block: Block) -> Iterator[tuple[str, list[str]]]:
    """The block's lines grouped under its `# WHO: ...` comment lines."""
    who, lines = "", list[str]()
    for raw in block.text.splitlines():
        if raw.startswith("# "):
            if lines:
                yield who, lines
            who, lines = raw[2:].split(":", 1)[0].split(" (")[0], []
        elif raw.strip():
            lines.append(raw)
    if lines:
        yield who, lines


def test_site_install(installed: User, debian_dev: dict[str, object], own_kernel: Path, tmp_path: Path) -> None:
    open_to_all(tmp_path)
    root_dirs = {
        "/opt/apppot": str(tmp_path / "opt-apppot"),
        "/usr/local/bin": str(tmp_path / "usr-local-bin"),
        "/var/lib/apppot/images": str(tmp_path / "var-lib-apppot" / "images"),
        "alice": TEST_USER,
    }
    site_path = f"{root_dirs['/usr/local/bin']}:{PLAIN_PATH}"
    alice = User(TEST_USER, new_home(tmp_path / "alice", TEST_USER, own_kernel), site_path)
    bob = User(TEST_USER_2, owned(tmp_path / "bob" / "home", TEST_USER_2), site_path)
    copy_image(debian_dev, alice.home / ".cache", alice.name)  # her build below is then a cache hit
    checkout = clone(alice.home / "apppot", alice.name)
    site_env = {"APPPOT_IMAGE_PATH": root_dirs["/var/lib/apppot/images"]}  # stands in for the default
    found = dict(sections(example("site-install")))
    assert list(found) == ["the site", "alice", "bob"], found

    for line in found["the site"]:
        ran = run("set -e\n" + fill(line, root_dirs), checkout, {"PATH": SUDO_SECURE_PATH, "HOME": "/root"})
        assert ran.returncode == 0, ran.stderr
    for line in found["alice"]:
        if line.startswith("sudo "):
            ran = as_root(line, alice, checkout)
        else:
            ran = run("set -e\n" + line, checkout, {**alice.env, **site_env}, user=alice.name)
        assert ran.returncode == 0, ran.stderr
    job = owned(tmp_path / "bob" / "job", bob.name)
    ran = run("set -e\n" + "\n".join(found["bob"]), job, {**bob.env, **site_env}, user=bob.name)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith("gcc (Debian"), ran.stdout
