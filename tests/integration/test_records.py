"""What `apppot image info`, `image list` and `kernel info` show for what AppPot does not know: the
same '-' in a record as in a table, null in JSON, never Python's None."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import apppot_cli


@pytest.fixture(autouse=True)
def uml_kernel() -> None:
    """No job runs here: not the suite's two-kernel matrix."""


def test_the_tiny_appliance_shows_the_same_id_and_unknowns_in_list_and_info(cache_home: Path, tiny_image: Path) -> None:
    info = apppot_cli(cache_home, "image", "info", "tiny").stdout.decode()
    assert "None" not in info
    fields = dict(line.split(": ", 1) for line in info.splitlines())
    rows = [line.split() for line in apppot_cli(cache_home, "image", "list").stdout.decode().splitlines()[1:]]
    listed = next(row for row in rows if row[0] == "tiny" and row[-1] == fields["path"])  # the session has other images
    # The tiny appliance in your cache was made when its file was: a UTC time, the same in list and info.
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", fields["built"]), fields["built"]
    assert (fields["built"], fields["id"]) == (listed[4], listed[1])  # the list's columns: name id ... built path
    as_json = json.loads(apppot_cli(cache_home, "image", "info", "--json", "tiny").stdout)
    assert as_json["built"] == fields["built"] and as_json["content_id"].startswith(as_json["id"])
    assert len(as_json["content_id"]) == 64
    in_list = json.loads(apppot_cli(cache_home, "image", "list", "--json").stdout)
    assert [image["id"] for image in in_list if image["path"] == fields["path"]] == [as_json["id"]]


def test_debians_kernel_reports_its_release(cache_home: Path, debian_kernel: Path) -> None:
    r = apppot_cli(cache_home, "kernel", "info", "--kernel", str(debian_kernel))
    assert r.returncode == 0, r.err
    release = subprocess.run([str(debian_kernel), "--version"], capture_output=True, text=True, check=True).stdout.strip()
    assert f"\nrelease: {release}\n" in r.stdout.decode() and "None" not in r.stdout.decode()
