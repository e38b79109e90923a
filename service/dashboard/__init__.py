"""The gateway's web dashboard: a jobs table, live convergence plots, training curves and batch
distributions, served by the gateway process on its own port (Starlette under uvicorn).

It holds no state of its own: every page and event stream reads through the gateway's
JobManager with the viewer's rights (docs/dashboard.md).
"""

from service.dashboard._app import create_app
from service.dashboard._server import Dashboard, DashboardSettings

__all__ = ["Dashboard", "DashboardSettings", "create_app"]
