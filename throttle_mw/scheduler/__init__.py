"""The sans-IO scheduler: budget, fair queues and priorities as a pure state machine."""

from .core import Scheduler
from .types import (
    AUTO,
    STATUS,
    Admit,
    Decision,
    Enqueue,
    Event,
    Evicted,
    Granted,
    LeaseKey,
    Limits,
    Policy,
    Reason,
    Reject,
    Request,
    RequestFields,
    Snapshot,
    TenantSnapshot,
)

__all__ = [
    "AUTO",
    "STATUS",
    "Admit",
    "Decision",
    "Enqueue",
    "Event",
    "Evicted",
    "Granted",
    "LeaseKey",
    "Limits",
    "Policy",
    "Reason",
    "Reject",
    "Request",
    "RequestFields",
    "Scheduler",
    "Snapshot",
    "TenantSnapshot",
]
