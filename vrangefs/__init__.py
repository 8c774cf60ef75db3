"""vrangefs: a tmpfs-like FUSE filesystem whose files can have volatile (purgeable) ranges."""

__version__ = "0.1.0"
