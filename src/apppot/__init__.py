"""AppPot: run a whole Linux appliance as one ordinary, unprivileged batch job."""

__version__ = "0.1.0"
