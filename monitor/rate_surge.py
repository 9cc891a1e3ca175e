"""The rate surge: a step's learning rate at least ``SURGE_RATE`` times its recent median.

The divergence detector's heat rules judge a step only under this condition (``plugins.divergence``,
``heat_rate`` and ``heat_window`` default to these values), and the client waits, while it holds,
at the end of each step for the host to judge that step's own summary, so that such an alert
arrives within the step that raised it (``monitor.client.handle``). One definition keeps the two
in step; a user who changes the plugin's settings changes only what the plugin judges.
"""

from __future__ import annotations

SURGE_RATE = 3.0  # the step's rate over the median rate of the last SURGE_WINDOW steps
SURGE_WINDOW = 100
