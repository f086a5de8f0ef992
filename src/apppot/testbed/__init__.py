"""A throw-away Slurm cluster on this machine, for tests and for users who want to try `apppot submit`.

    apppot testbed up [--nodes N] [--arc USER]   munged, slurmctld and N slurmd (nodes n1..nN on
                                                 127.0.0.1), a copy of AppPot every user's jobs can run
                                                 (site/bin/apppot), and with --arc an ARC CE in front
    apppot testbed down                          stops what `up` started, by PID
    apppot testbed env                           the SLURM_CONF line to export

Everything lives in one directory ($APPPOT_TESTBED_DIR, default /var/lib/apppot-testbed), which must
be safe for root to use (statedir); the daemons listen on loopback only. It needs root: slurmd starts
jobs as the users who submit them.

Modules: statedir (the directory and its checks), daemons (pid files, stopping only the expected
process), slurm, arc, site (the copy of AppPot), cluster (up and down).
"""

from __future__ import annotations

from apppot.testbed.cluster import Stopped, down, running_conf, up
from apppot.testbed.slurm import LocalCluster, render_slurm_conf
from apppot.testbed.statedir import testbed_dir

__all__ = ["LocalCluster", "Stopped", "down", "render_slurm_conf", "running_conf", "testbed_dir", "up"]
