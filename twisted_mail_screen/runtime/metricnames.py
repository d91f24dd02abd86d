# -*- test-case-name: tests.test_web_metrics -*-
"""
What /metrics exposes, by name: the counters with their help and label
names, the delivery-latency histogram and its buckets. Kept apart so the
counting (metrics.py) and the rendering on the first scrape
(promrender.py) share them without importing each other.
"""

from __future__ import annotations

#: Delivery latency buckets (seconds): an fsync'd local delivery takes
#: milliseconds; a slow disk or a full worker pool shows in the tail.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: The counters, in the order /metrics lists them: name, help, label names.
COUNTERS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("mailscreen_connections", "Connections by protocol and outcome", ("protocol", "outcome")),
    ("mailscreen_auth_failures", "Failed logins by protocol", ("protocol",)),
    ("mailscreen_refusals", "Connections refused by screening, by rule", ("rule",)),
    ("mailscreen_blocks", "Blocks added, by rule", ("rule",)),
    ("mailscreen_freezes", "Accounts frozen", ()),
    ("mailscreen_messages_delivered", "Messages accepted with a 250 after DATA (stored or queued)", ()),
    ("mailscreen_messages_delivered_bytes", "Bytes of the messages delivered", ()),
    ("mailscreen_outbound_attempts", "Outbound delivery attempts per recipient, by result",
     ("result",)),
)
#: The histogram, listed after the delivery counters as before.
LATENCY = ("mailscreen_delivery_latency_seconds",
           "From the end of DATA to the fsync'd delivery behind the 250")
