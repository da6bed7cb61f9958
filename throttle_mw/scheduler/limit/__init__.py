"""The learned concurrency limit: a sans-IO estimator beside the scheduler.

Fed one `Sample` per finished admitted request and the time, it produces the
concurrency limit in force; the scheduler only reads that number. See the
scheduler README, "The learned limit".
"""

from .estimator import (
    LimitConfig,
    LimitEstimator,
    LimitState,
    StepReason,
    initial_state,
    step,
)
from .flight import InFlight
from .sample import Sample
from .summary import WindowSummary

__all__ = [
    "InFlight",
    "LimitConfig",
    "LimitEstimator",
    "LimitState",
    "Sample",
    "StepReason",
    "WindowSummary",
    "initial_state",
    "step",
]
