"""Training paths: a model zoo described as data, K-FAC, exact natural gradient, full-batch
L-BFGS and a single-process training loop. Pure torch (no Ray, no gRPC imports here)."""

from .datasets import DATASETS, load_dataset
from .kfac import (
    Communicator,
    ComputeMethod,
    CostBalancedAssignment,
    KFACPreconditioner,
    LocalCommunicator,
    TorchDistributedCommunicator,
    WorkAssignment,
)
from .loop import StepMetrics, TrainResult, TrainSpec, load_weights, save_weights, train
from .models import build_model, parse_model_spec
from .natural_gradient import NaturalGradientPreconditioner

__all__ = [
    "DATASETS",
    "Communicator",
    "ComputeMethod",
    "CostBalancedAssignment",
    "KFACPreconditioner",
    "LocalCommunicator",
    "NaturalGradientPreconditioner",
    "StepMetrics",
    "TrainResult",
    "TrainSpec",
    "TorchDistributedCommunicator",
    "WorkAssignment",
    "build_model",
    "load_dataset",
    "load_weights",
    "parse_model_spec",
    "save_weights",
    "train",
]
