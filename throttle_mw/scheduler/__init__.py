"""The sans-IO scheduler: budget, fair queues and priorities as a pure state machine."""

from .core import Scheduler
from .types import (
    STATUS,
    Admit,
    Decision,
    Enqueue,
    Event,
    Evicted,
    Granted,
    Limits,
    Policy,
    Reason,
    Reject,
    Request,
    Snapshot,
    TenantSnapshot,
)

__all__ = [
    "STATUS",
    "Admit",
    "Decision",
    "Enqueue",
    "Event",
    "Evicted",
    "Granted",
    "Limits",
    "Policy",
    "Reason",
    "Reject",
    "Request",
    "Scheduler",
    "Snapshot",
    "TenantSnapshot",
]
