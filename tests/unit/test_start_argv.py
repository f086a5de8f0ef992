"""Where `apppot start`'s options end and the command begins: seed command lines (no '--'), lines
with '--', and the command lines clients generate, for `apppot start` and `apppot-start`."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apppot import cli
from apppot.cli.start import START_OPTIONS, _fast_parse, _start_parser, parse_start, split_start_argv
from apppot.errors import UsageError

SEED_LINE = "--apppot IMG --changes c.tar.gz --mem 256M --extra k=v grep -c -- b f.txt"

# (command line, the command it gives: None for none)
GOLDEN = [
    (SEED_LINE, "grep -c -- b f.txt"),
    ("--apppot job.cow,IMG --changes c.tar.gz --mem 256M --extra k=v grep -c -- b f.txt", "grep -c -- b f.txt"),
    ("--apppot ./apppot_a3d.img /bin/bash", "/bin/bash"),
    ("--appot a3d.img.cow,/share/a3d.img", None),
    ("--image a.img -- sh -c x", "sh -c x"),
    ("--image=a.img --mem=1G --extra=-x -- sh", "sh"),
    ("--mem 1G -- grep -- x", "grep -- x"),
    ("-- -- x", "-- x"),
    ("--", ""),
    ("", None),
    ("-v -n", None),
    ("ls -h", "ls -h"),
    ("ls --help", "ls --help"),
    ("ls -l --mem 1G --image x", "ls -l --mem 1G --image x"),
    ("-nv cat -", "cat -"),
    ("--jobdir /tmp -", "-"),
    ("--ima a.img ls", "ls"),  # argparse's unique abbreviation of --image takes a value too
    ("--cow c.cow --jobdir ls ls", "ls"),  # an option's value is never the command
    ("--net --no-stdin --full-boot -v uname -a", "uname -a"),
    ("--isolation strict --backend uml --cpu all --boot-timeout 30 --id x --user u --group g id", "id"),
    ("--kernel /k --uml /k --linux /k --console-log l --writable-image --unsafe-jobdir --host-loopback --record r true", "true"),
]


@pytest.mark.parametrize(("line", "command"), GOLDEN)
def test_the_command_starts_where_the_options_end(line: str, command: str | None) -> None:
    _, got = split_start_argv(line.split())
    assert (" ".join(got) if got is not None else None) == command


def test_the_seed_line_of_the_issue_reads_every_option() -> None:
    for prog in ("apppot start", "apppot-start"):
        spec = parse_start(SEED_LINE.split(), prog)
        assert spec.argv == ("grep", "-c", "--", "b", "f.txt")
        assert (spec.image, spec.changes, spec.mem_bytes, spec.extra) == (Path("IMG"), Path("c.tar.gz"), 256 << 20, ("k=v",))


def test_options_after_the_command_belong_to_it() -> None:
    spec = parse_start(["ls", "-l", "--mem", "1G"])
    assert spec.argv == ("ls", "-l", "--mem", "1G") and spec.mem_bytes is None


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("--mem -- ls", "argument --mem: expected one argument"),
        ("--mem", "argument --mem: expected one argument"),
        ("--frobnicate ls", "unrecognized arguments: --frobnicate"),
        ("--net=1 ls", "--net: ignored explicit argument '1'"),
        ("-1", "unrecognized arguments: -1"),
        ("--apppot ,img ls", "--apppot ,img: the COW is empty"),
        ("--apppot cow, ls", "--apppot cow,: the image is empty"),
    ],
)
def test_a_bad_line_is_one_usage_error(line: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as caught:
        parse_start(line.split())
    assert "\n" not in str(caught.value)


def test_both_entry_points_refuse_a_bad_line_with_125(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["start", "--mem"]) == 125
    assert cli.start_main(["--apppot", "c,", "ls"]) == 125
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("apppot: error: ") for line in err), err


def test_a_comma_in_a_path_of_apppot(tmp_path: Path) -> None:
    image = tmp_path / "im,age.img"
    image.touch()
    spec = parse_start(["--apppot", str(image), "true"])  # an existing file is the image, commas and all
    assert (spec.image, spec.cow) == (image, None)
    spec = parse_start(["--apppot", f"a,b.cow,{image}", "true"])  # the split that names an existing image wins
    assert (spec.image, spec.cow) == (image, Path("a,b.cow"))
    spec = parse_start(["--apppot", f"{tmp_path}/x.cow:{tmp_path}/new.img"])
    assert (spec.image, spec.cow) == (tmp_path / "new.img", tmp_path / "x.cow")


# --- property: whatever the options, the command comes back exactly -------------------------------

WORD = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=8)
VALUE = WORD.filter(lambda w: not w.startswith("-"))
SPECIAL_VALUES = {
    "mem": st.sampled_from(["256M", "1G", "300"]),
    "boot_timeout": st.sampled_from(["30", "1.5"]),
    "apppot": st.sampled_from(["IMG", "job.cow,IMG", "a3d.img.cow:/share/a3d.img"]),
}


@st.composite
def option_words(draw: st.DrawFn) -> list[str]:
    """A list of start options, each in one of the forms argparse takes (a pair such as --net/--no-net once)."""
    chosen = draw(st.lists(st.sampled_from(START_OPTIONS), max_size=8, unique_by=lambda o: (o.dest, o.kind)))
    words: list[str] = []
    for o in chosen:
        if o.kind in ("true", "false") and any(c.dest == o.dest and c.kind != o.kind for c in chosen):
            continue
        if o.dest == "net" and o.kind == "false" and any(c.dest == "host_loopback" for c in chosen):
            continue  # a conflict of its own (test_cli)
        flag = draw(st.sampled_from(o.flags))
        if o.kind not in ("value", "path", "append"):
            words.append(flag)
            continue
        value = draw(st.sampled_from(o.choices) if o.choices else SPECIAL_VALUES.get(o.dest, VALUE))
        long_form = flag.startswith("--") and draw(st.booleans())
        words += [f"{flag}={value}"] if long_form else [flag, value]
    return words


@settings(max_examples=200, deadline=None)
@given(options=option_words(), command=st.lists(WORD, max_size=6), at=st.integers(0, 6), leading=st.booleans())
def test_any_options_and_any_command_holding_double_dash_give_back_the_command(
    options: list[str], command: list[str], at: int, leading: bool
) -> None:
    command = [*command[:at], "--", *command[at:]]
    if not leading:  # the seed's form: the command's first word is no option
        command = ["prog", *command]
    line = [*options, "--", *command] if leading else [*options, *command]
    for prog in ("apppot start", "apppot-start"):
        assert parse_start(line, prog).argv == tuple(command)
    got_options, _ = split_start_argv(line)
    assert got_options == options
    fast = _fast_parse(options)
    assert fast is not None and vars(fast) == vars(_start_parser("apppot start").parse_args(options))


@pytest.mark.parametrize("argv", [["--apppot", "", "true"], ["--apppot=", "true"], ["--appot=", "--", "true"]])
def test_an_empty_apppot_value_is_refused(argv: list[str]) -> None:
    # Not the default image, silently: the seed's client meant an image and lost it (an unset variable).
    with pytest.raises(UsageError, match="--apppot is empty; give --apppot COW,IMG or --apppot IMG"):
        parse_start(argv)
