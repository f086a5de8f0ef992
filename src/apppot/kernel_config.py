"""AppPot's kernel configuration fragment: reading it, turning it into scripts/config
arguments, and checking a finished .config against it (pure: no I/O beyond reading the fragment)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

_UNSET = re.compile(r"# CONFIG_(\w+) is not set")
_SET = re.compile(r"CONFIG_(\w+)=(.*)")


@dataclass(frozen=True)
class Option:
    name: str  # without the CONFIG_ prefix
    value: str | None  # "y", a number or a quoted string; None: not set

    def line(self) -> str:
        return f"# CONFIG_{self.name} is not set" if self.value is None else f"CONFIG_{self.name}={self.value}"


def fragment_text() -> bytes:
    return resources.files("apppot.data").joinpath("apppot-um.config").read_bytes()


def config_hash(text: bytes | None = None) -> str:
    """The fragment's SHA-256: part of the kernel's identity."""
    return hashlib.sha256(fragment_text() if text is None else text).hexdigest()


def parse_fragment(text: str) -> list[Option]:
    options = []
    for raw in text.splitlines():
        line = raw.strip()
        if m := _UNSET.fullmatch(line):
            options.append(Option(m[1], None))
        elif m := _SET.fullmatch(line):
            options.append(Option(m[1], m[2]))
        elif line and not line.startswith("#"):
            raise ValueError(f"not a kernel config line: {raw!r}")
    return options


def parse_dotconfig(text: str) -> dict[str, str | None]:
    """A .config as {name: value}, with None for options that are explicitly not set."""
    return {o.name: o.value for o in parse_fragment(text)}


def scripts_config_args(options: list[Option]) -> list[str]:
    """Arguments for the kernel's scripts/config that apply the options in order."""
    args: list[str] = []
    for o in options:
        if o.value is None:
            args += ["--disable", o.name]
        elif o.value == "y":
            args += ["--enable", o.name]
        elif o.value == "m":
            args += ["--module", o.name]
        elif o.value.startswith('"'):
            args += ["--set-str", o.name, o.value[1:-1]]
        else:
            args += ["--set-val", o.name, o.value]
    return args


def unmet(options: list[Option], final: dict[str, str | None], known: set[str]) -> list[str]:
    """The fragment's lines that the final .config does not honour, among options this kernel knows."""
    wrong = []
    for o in options:
        if o.name not in known:
            continue  # e.g. the 6.1-only network drivers on 7.x
        have = final.get(o.name)
        if o.value is None:
            if have not in (None, "n"):
                wrong.append(o.line())
        elif have != o.value:
            wrong.append(o.line())
    return wrong
