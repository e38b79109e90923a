"""secant: optimization as a service. The Python SDK.

Light by design (grpcio, protobuf, numpy); tqdm, matplotlib and pyyaml are optional extras
imported only when used (``progress=True``, ``result.plot()``, the CLI's YAML specs).

>>> import secant
>>> with secant.Client("127.0.0.1:50051") as client:
...     res = client.minimize("sum(100*(x[1:]-x[:-1]**2)**2 + (1-x[:-1])**2)", x0=[-1.2, 1.0])
>>> res.x, res.fun, res.success
"""

from secant._aio import AsyncBatch, AsyncBatchJob, AsyncClient, AsyncJob
from secant._batch import BatchInputError, BatchSolveResult, build_batch_problem
from secant._client import Batch, BatchJob, Client, Job
from secant._core import DEFAULT_ADDRESS, RetryPolicy, TLSConfig
from secant._errors import SecantError
from secant._problem import Bounds, Expression, Pickled, Residual, TorchExport, build_problem
from secant._result import IterateRecord, JobState, OptimizeResult, Status, plot_history
from secant._tensors import from_tensor, to_tensor
from secant._training import MemoryPlan, PlanRow, TrainRun

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_ADDRESS",
    "AsyncBatch",
    "AsyncBatchJob",
    "AsyncClient",
    "AsyncJob",
    "Batch",
    "BatchInputError",
    "BatchJob",
    "BatchSolveResult",
    "Bounds",
    "Client",
    "Expression",
    "IterateRecord",
    "Job",
    "JobState",
    "MemoryPlan",
    "OptimizeResult",
    "Pickled",
    "PlanRow",
    "Residual",
    "RetryPolicy",
    "SecantError",
    "Status",
    "TLSConfig",
    "TorchExport",
    "TrainRun",
    "__version__",
    "build_batch_problem",
    "build_problem",
    "from_tensor",
    "plot_history",
    "to_tensor",
]
