"""How the command line shows things: human-readable sizes, the statistics as a table and
in Prometheus text format."""

from __future__ import annotations

from collections.abc import Mapping

import humanize
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vrangefs.protocol import PurgeCause

_RENAMED = {"memory_cap": "memory_cap_bytes"}
_COUNTERS = (
    ("purged_bytes", "bytes purged"),
    ("purge_events", "units purged"),
    ("evicted_files", "cache-directory files evicted"),
    ("evicted_bytes", "resident bytes of evicted files"),
)
_PLAIN_COUNTERS = {
    "pins_released_by_exit": "pins dropped because their process exited",
    "events_dropped": "events the event stream's subscribers lost by reading too slowly",
    "gc_full_collections": "full runs of the daemon's garbage collector",
}


def size(n: int) -> str:
    """*n* bytes in binary units with one decimal: ``1.5 MiB``."""
    return str(humanize.naturalsize(n, binary=True, format="%.1f"))


def _is_byte_count(key: str) -> bool:
    return key.endswith(("_bytes", "_total")) or key == "memory_cap"


def stats_table(stats: Mapping[str, int | str]) -> str:
    """The statistics one per line, aligned; byte counts also in human units."""
    if not stats:
        return ""
    width = max(len(k) for k in stats)
    lines = []
    for key, value in stats.items():
        shown = str(value)
        if isinstance(value, int) and _is_byte_count(key):
            shown = f"{value} ({size(value)})"
        lines.append(f"{key:<{width}}  {shown}\n")
    return "".join(lines)


class _StatsCollector(Collector):
    def __init__(self, stats: Mapping[str, int | str], mountpoint: str) -> None:
        self.stats = stats
        self.mountpoint = mountpoint

    def collect(self) -> list[Metric]:
        metrics: list[Metric] = []
        for prefix, what in _COUNTERS:
            counter = CounterMetricFamily(
                f"vrangefs_{prefix}",
                f"{what} since mount, by cause",
                labels=["mountpoint", "cause"],
            )
            for cause in PurgeCause:
                value = self.stats.get(f"{prefix}_{cause.value}")
                if isinstance(value, int):
                    counter.add_metric([self.mountpoint, cause.value], value)
            metrics.append(counter)
        for key, value in self.stats.items():
            if not isinstance(value, int) or key == "pid":
                continue
            if key in _PLAIN_COUNTERS:
                counter = CounterMetricFamily(
                    f"vrangefs_{key}", f"{_PLAIN_COUNTERS[key]}, since mount", labels=["mountpoint"]
                )
                counter.add_metric([self.mountpoint], value)
                metrics.append(counter)
                continue
            if key.startswith(tuple(prefix for prefix, _ in _COUNTERS)):
                continue
            gauge = GaugeMetricFamily(
                f"vrangefs_{_RENAMED.get(key, key)}",
                f"vrangefs statistic {key}",
                labels=["mountpoint"],
            )
            gauge.add_metric([self.mountpoint], value)
            metrics.append(gauge)
        return metrics


def prometheus_text(stats: Mapping[str, int | str], mountpoint: str) -> str:
    """The statistics in Prometheus text exposition format, labelled by mount point.

    Purges and evictions are counters labelled by cause (:class:`~vrangefs.protocol.PurgeCause`);
    everything else is a gauge. For node_exporter's textfile collector, e.g. from a timer:
    ``vrangefs stats --prometheus /mnt/cache > /var/lib/node_exporter/vrangefs.prom``.
    """
    registry = CollectorRegistry()
    registry.register(_StatsCollector(stats, mountpoint))
    return generate_latest(registry).decode()
