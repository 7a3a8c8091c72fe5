"""Stand-in for NVlabs/EAGLE's ``eagle`` package (fef95f1), for tests. See ``meteor_plugin.testing.eagle_like``."""
