"""A content-addressed blob cache for vrangefs mounts (and plain directories): see store.py.

from examples.cachestore import CacheStore

cache = CacheStore("/mnt/cache/thumbs")      # volatile if on vrangefs, plain files otherwise
key = cache.put(render(page))
data = cache.get(key) or cache_again(page)    # None: purged, deleted or never stored

# The fleet tier: Redis behind the local copy (pip install redis; see remote.py).
cache = CacheStore("/mnt/cache/thumbs", remote="redis://cache.internal:6379/0")
"""

from examples.cachestore.store import (
    BadKeyError,
    CacheStats,
    CacheStore,
    Counters,
    Usage,
    fstype_of,
    key_of,
    mount_root,
)

__all__ = [
    "BadKeyError",
    "CacheStats",
    "CacheStore",
    "Counters",
    "Usage",
    "fstype_of",
    "key_of",
    "mount_root",
]
