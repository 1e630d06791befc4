"""Data layer: text sources (local shards, globs, hub datasets) and calibration windows."""
