"""Developer tools: the stress test (stress.py) and the differential checker (difftest.py)."""
