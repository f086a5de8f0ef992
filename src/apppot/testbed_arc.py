"""The test ARC CE's old import path; it lives in apppot.testbed.arc."""

from __future__ import annotations

from apppot.testbed.arc import ENDPOINT, PORT, RTE_NAME, render_arc_conf, set_rte_params, up

__all__ = ["ENDPOINT", "PORT", "RTE_NAME", "render_arc_conf", "set_rte_params", "up"]
