"""Experiments: sweeps over configs, the report of finished runs, and the papers' tables."""
