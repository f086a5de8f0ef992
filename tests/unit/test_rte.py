"""The APPPOT runtime environment (src/apppot/data/rte/APPPOT-0) under the shells that source it, and
at stage 0 inside ARC's own submit code (/usr/share/arc), which writes the batch script."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RTE = ROOT / "src" / "apppot" / "data" / "rte" / "APPPOT-0"
ARC_SHARE = Path("/usr/share/arc")
SHELLS = [s for s in (["dash"], ["busybox", "sh"], ["bash", "--posix"]) if shutil.which(s[0])]
SLIDES_ARGS = ("/$APPPOT_STARTUP", "--apppot", "a3d.img.cow,$A3D_UML_IMAGE")


def source(shell: list[str], script: str, env: dict[str, str] | None = None) -> str:
    r = subprocess.run([*shell, "-c", script], capture_output=True, text=True, env=env or {}, check=False, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    return r.stdout


def test_the_rte_declares_its_parameters_for_arcctl() -> None:
    text = RTE.read_text()
    for name in ("APPPOT_START", "APPPOT_IMAGE", "APPPOT_KERNEL"):
        assert f"# param:{name}:string:" in text
    assert text.startswith("# description: ")


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[0])
def test_stage_1_exports_the_seeds_variables_and_path(shell: list[str]) -> None:
    show = 'echo "$APPPOT_START|$APPPOT_STARTUP|$APPPOT_IMAGE|${APPPOT_KERNEL-unset}|$PATH"; env | grep -c ^APPPOT_'
    defaults = source(shell, f"PATH=/usr/bin:/bin; set -- 1; . {RTE}; {show}")
    assert defaults == "/usr/bin/apppot-start|/usr/bin/apppot-start|/opt/apppot/apppot.img|unset|/usr/bin:/bin\n3\n"
    params = 'APPPOT_START="/site/bin/apppot-start"\nAPPPOT_IMAGE="/site/i.img"\nAPPPOT_KERNEL="/site/linux"\n'
    site = source(shell, f"PATH=/usr/bin:/bin; set -- 1; {params}. {RTE}; {show}; command -v apppot-start || true")
    assert site == "/site/bin/apppot-start|/site/bin/apppot-start|/site/i.img|/site/linux|/usr/bin:/bin:/site/bin\n4\n"
    assert "_apppot" not in source(shell, f"set -- 1; . {RTE}; set")  # nothing of its own left in the job's shell


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[0])
@pytest.mark.parametrize("executable", ["/$APPPOT_STARTUP", "$APPPOT_STARTUP", "/${APPPOT_STARTUP}", "$APPPOT_START"])
def test_stage_0_names_the_real_apppot_start_for_the_seeds_executable(shell: list[str], executable: str) -> None:
    script = (
        f"APPPOT_START=/site/bin/apppot-start; joboption_arg_0='{executable}'; "
        f"""joboption_args=' "{executable}" "--apppot" "a.cow,$IMG"'; set -- 0; . {RTE}; """
        'echo "$?|$joboption_arg_0|$joboption_args"; echo "${_apppot_start-}${_apppot_word-}${_apppot_bin-}."'
    )
    assert source(shell, script) == '0|/site/bin/apppot-start| "/site/bin/apppot-start" "--apppot" "a.cow,$IMG"\n.\n'


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[0])
def test_stage_0_leaves_other_executables_and_odd_paths_alone(shell: list[str]) -> None:
    other = f"""joboption_arg_0='./run.sh'; joboption_args=' "./run.sh" "$APPPOT_STARTUP"'; set -- 0; . {RTE}; """
    assert source(shell, other + 'echo "$joboption_arg_0|$joboption_args"') == './run.sh| "./run.sh" "$APPPOT_STARTUP"\n'
    # a start path a shell would interpret is not put into the command line (it keeps the variable,
    # which stage 1 exports); the executable ARC checks still is the path
    odd = """APPPOT_START='/s$x/apppot-start'; joboption_arg_0='/$APPPOT_STARTUP'; joboption_args=' "/$APPPOT_STARTUP"'; """
    out = source(shell, odd + f'set -- 0; . {RTE}; echo "$joboption_arg_0|$joboption_args"')
    assert out == '/s$x/apppot-start| "/$APPPOT_STARTUP"\n'


def arc_stage_0(tmp: Path, args: tuple[str, ...], rte_names: list[str]) -> str:
    """ARC's own grami parsing and RTE stage 0 (what submit-*-job runs before it writes the batch
    script) on a job with these arguments and RTEs, the APPPOT one published under rte_names."""
    control = tmp / "control"
    for name in rte_names:
        link = control / "rte" / "enabled" / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(RTE)
        params = control / "rte" / "params" / name
        params.parent.mkdir(parents=True, exist_ok=True)
        params.write_text('APPPOT_START="/site/bin/apppot-start"\nAPPPOT_IMAGE="/site/i.img"\nAPPPOT_KERNEL=""\n')
    lines = [f"joboption_arg_{i}='{a}'" for i, a in enumerate(args)]
    lines += [f"joboption_runtime_{i}='{n}'" for i, n in enumerate(rte_names)]
    grami = tmp / "job.test.grami"
    grami.write_text("\n".join([f"joboption_directory='{tmp}/session'", *lines, ""]))
    script = (
        f"pkgdatadir={ARC_SHARE}; . {ARC_SHARE}/lrms_common.sh; . {ARC_SHARE}/submit_common.sh; "
        f"parse_grami_file {grami}; CONFIG_controldir={control}; RTE_stage0; "
        # as submit_common.sh writes them into the batch script
        """echo "executable='$joboption_arg_0'"; echo "$joboption_args" """
    )
    return source(["sh"], script, env={"PATH": "/usr/bin:/bin"})


@pytest.mark.skipif(not (ARC_SHARE / "submit_common.sh").exists(), reason="needs A-REX (nordugrid-arc-arex)")
def test_arcs_own_stage_0_writes_the_real_path_for_the_slides_job(tmp_path: Path) -> None:
    out = arc_stage_0(tmp_path, SLIDES_ARGS, ["TEST/APPPOT-0"])
    assert out == (
        "executable='/site/bin/apppot-start'\n"
        ' "/site/bin/apppot-start" "--apppot" "a3d.img.cow,$A3D_UML_IMAGE"\n'  # expanded on the worker
    )
    (tmp_path / "other").mkdir()
    untouched = arc_stage_0(tmp_path / "other", ("./run.sh", "x"), ["ENV/APPPOT-0.21"])
    assert untouched == 'executable=\'./run.sh\'\n "./run.sh" "x"\n'
