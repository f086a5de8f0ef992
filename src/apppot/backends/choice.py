"""Which backend runs a job, and how (pure: the KVM probe is passed in).

The backend is asked for by, first hit wins: ``--backend``, ``$APPPOT_BACKEND``, the
``backend`` key of ``~/.config/apppot/config.toml``; else UML. ``auto`` means QEMU
with KVM if a probe guest really boots with KVM on this host (apppot.kvm; the
``KVM_GET_API_VERSION`` ioctl alone proves nothing), else UML. ``qemu`` uses KVM
where the probe found it working, else TCG emulation with a warning; ``--kvm``
requires KVM and ``--no-kvm`` asks for TCG.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple

from apppot.backends.qemu import Accel
from apppot.errors import HostError, UsageError

BACKEND_ENV = "APPPOT_BACKEND"


class Backend(StrEnum):
    UML = "uml"
    QEMU = "qemu"
    AUTO = "auto"


class KvmState(NamedTuple):
    """What the KVM probe found: whether a guest booted with KVM, and why (not)."""

    works: bool
    reason: str


class Decision(NamedTuple):
    backend: Backend  # UML or QEMU
    accel: Accel | None  # for QEMU
    why: str  # where the choice came from, for --verbose and apppot doctor
    warning: str | None = None


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "apppot" / "config.toml"


def read_config(path: Path | None = None) -> dict[str, Any]:
    """The user's config file, or {} if there is none."""
    path = path or config_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path} is not valid TOML ({e}); fix or remove it") from None


def requested(
    flag: str | None, env: Mapping[str, str], config: Callable[[], Mapping[str, Any]] = read_config
) -> tuple[Backend, str]:
    """The backend asked for, and where: --backend, then $APPPOT_BACKEND, then the config file (read
    only when neither said), else UML."""
    sources: list[tuple[Callable[[], Any], str]] = [
        (lambda: flag, "--backend"),
        (lambda: env.get(BACKEND_ENV), f"${BACKEND_ENV}"),
        (lambda: config().get("backend"), "config"),
    ]
    for source, where in sources:
        value = source()
        if value:
            try:
                return Backend(value), where
            except ValueError:
                raise UsageError(f"unknown backend {value!r} from {where}: use uml, qemu or auto") from None
    return Backend.UML, "default"


def decide(
    backend: Backend, where: str, kvm: bool | None, probe: Callable[[], KvmState], *, uml_kernel: str | None = None
) -> Decision:
    """The backend and accelerator for a job. ``kvm``: --kvm (True), --no-kvm (False) or neither.
    ``uml_kernel``: an explicit --kernel, refused where QEMU was asked for, and UML's under auto, on every host
    alike ($APPPOT_KERNEL, a site's setting for UML, is not passed: it means nothing to QEMU and must not
    break its jobs)."""
    if backend is Backend.QEMU and uml_kernel:
        raise _kernel_under_qemu(uml_kernel, where)
    if backend is Backend.AUTO and uml_kernel:
        if kvm:
            raise UsageError(f"--kernel {uml_kernel} names a UML kernel, but --kvm asks for QEMU with KVM; leave out one of them")
        return Decision(Backend.UML, None, f"auto ({where}): uml, because --kernel names a UML kernel")
    if backend is Backend.UML:
        if kvm:
            raise UsageError("--kvm needs --backend qemu or auto: UML does not use KVM")
        return Decision(Backend.UML, None, f"uml ({where})")
    if kvm is False:
        if backend is Backend.AUTO:
            return Decision(Backend.UML, None, f"auto ({where}) with --no-kvm: uml")
        return Decision(Backend.QEMU, Accel.TCG, f"qemu ({where}) with --no-kvm: TCG emulation")
    state = probe()
    if state.works:
        return Decision(Backend.QEMU, Accel.KVM, f"{backend.value} ({where}): KVM works ({state.reason})")
    if kvm:
        raise HostError(f"KVM does not work on this host: {state.reason}; leave out --kvm to run without it")
    if backend is Backend.AUTO:
        return Decision(Backend.UML, None, f"auto ({where}): uml, because KVM does not work ({state.reason})")
    return Decision(
        Backend.QEMU,
        Accel.TCG,
        f"qemu ({where}): TCG emulation, because KVM does not work ({state.reason})",
        f"KVM does not work here ({state.reason}): QEMU emulates the CPU (TCG), several times slower than "
        "native; --backend uml is faster on this host",
    )


def _kernel_under_qemu(kernel: str, where: str) -> UsageError:
    asked, fix = (
        ("--backend qemu", "use --backend uml instead of qemu")
        if where == "--backend"
        else (f"qemu from {where}", "add --backend uml")
    )
    return UsageError(
        f"--kernel {kernel} names a UML kernel, but {asked} runs the job with Debian's guest kernel; leave out --kernel, or {fix}"
    )
