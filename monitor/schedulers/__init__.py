"""Learning-rate schedulers driven by activation-pattern measurements."""

from monitor.schedulers.actcool import ActCoolDivergence, ActCoolLR

__all__ = ["ActCoolDivergence", "ActCoolLR"]
