"""throttle_mw: ASGI throttling for Starlette and FastAPI.

Queues or delays the excess per tenant against one capacity budget shared by
every worker and replica, keeps each tenant's fair share, serves critical
routes first and sheds nonessential ones under load.
"""

from .asgi import InvalidTenant, ThrottleDecision, ThrottleMiddleware, client_address
from .observe import Observer, ThrottleEvent
from .priorities import Priority, RouteTag, priority
from .settings import ConfigError, FailureMode, Settings

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "FailureMode",
    "InvalidTenant",
    "Observer",
    "Priority",
    "RouteTag",
    "Settings",
    "ThrottleDecision",
    "ThrottleEvent",
    "ThrottleMiddleware",
    "__version__",
    "client_address",
    "priority",
]
