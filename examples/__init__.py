"""Examples of using vrangefs; a package so that tests can import them (examples.cachestore)."""
