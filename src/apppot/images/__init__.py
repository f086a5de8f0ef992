"""Appliance images: checking, the cache, and builders."""
