"""Backends that boot an appliance: pure builders of their command lines."""
