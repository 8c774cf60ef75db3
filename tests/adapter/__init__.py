"""Tests of the pyfuse3 adapter run in-process: no mount, a fake request context."""
