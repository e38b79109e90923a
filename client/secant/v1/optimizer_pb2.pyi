import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    INT64: _ClassVar[DType]
    INT32: _ClassVar[DType]
    BOOL: _ClassVar[DType]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    QUEUED: _ClassVar[JobState]
    RUNNING: _ClassVar[JobState]
    SUCCEEDED: _ClassVar[JobState]
    FAILED: _ClassVar[JobState]
    CANCELLED: _ClassVar[JobState]
    WAITING_FOR_CLIENT: _ClassVar[JobState]

class SolveStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SOLVE_STATUS_UNSPECIFIED: _ClassVar[SolveStatus]
    CONVERGED: _ClassVar[SolveStatus]
    MAX_ITERATIONS: _ClassVar[SolveStatus]
    MAX_EVALUATIONS: _ClassVar[SolveStatus]
    LINE_SEARCH_FAILED: _ClassVar[SolveStatus]
    NON_FINITE: _ClassVar[SolveStatus]
    CANCELLED_BY_USER: _ClassVar[SolveStatus]
    TIME_LIMIT: _ClassVar[SolveStatus]
DTYPE_UNSPECIFIED: DType
FLOAT64: DType
FLOAT32: DType
INT64: DType
INT32: DType
BOOL: DType
JOB_STATE_UNSPECIFIED: JobState
QUEUED: JobState
RUNNING: JobState
SUCCEEDED: JobState
FAILED: JobState
CANCELLED: JobState
WAITING_FOR_CLIENT: JobState
SOLVE_STATUS_UNSPECIFIED: SolveStatus
CONVERGED: SolveStatus
MAX_ITERATIONS: SolveStatus
MAX_EVALUATIONS: SolveStatus
LINE_SEARCH_FAILED: SolveStatus
NON_FINITE: SolveStatus
CANCELLED_BY_USER: SolveStatus
TIME_LIMIT: SolveStatus

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class NamedTensor(_message.Message):
    __slots__ = ("name", "tensor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensor: Tensor
    def __init__(self, name: _Optional[str] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Objective(_message.Message):
    __slots__ = ("expression", "residual", "torch_export", "cloudpickle", "data")
    EXPRESSION_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_FIELD_NUMBER: _ClassVar[int]
    TORCH_EXPORT_FIELD_NUMBER: _ClassVar[int]
    CLOUDPICKLE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    expression: str
    residual: str
    torch_export: bytes
    cloudpickle: bytes
    data: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, expression: _Optional[str] = ..., residual: _Optional[str] = ..., torch_export: _Optional[bytes] = ..., cloudpickle: _Optional[bytes] = ..., data: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class Bounds(_message.Message):
    __slots__ = ("lower", "upper")
    LOWER_FIELD_NUMBER: _ClassVar[int]
    UPPER_FIELD_NUMBER: _ClassVar[int]
    lower: Tensor
    upper: Tensor
    def __init__(self, lower: _Optional[_Union[Tensor, _Mapping]] = ..., upper: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Problem(_message.Message):
    __slots__ = ("objective", "x0", "method", "bounds", "options", "device", "dtype", "report_x_every", "labels", "batch")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    X0_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    BOUNDS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    REPORT_X_EVERY_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    objective: Objective
    x0: Tensor
    method: str
    bounds: Bounds
    options: _struct_pb2.Struct
    device: str
    dtype: DType
    report_x_every: int
    labels: _containers.ScalarMap[str, str]
    batch: BatchSpec
    def __init__(self, objective: _Optional[_Union[Objective, _Mapping]] = ..., x0: _Optional[_Union[Tensor, _Mapping]] = ..., method: _Optional[str] = ..., bounds: _Optional[_Union[Bounds, _Mapping]] = ..., options: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., device: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., report_x_every: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., batch: _Optional[_Union[BatchSpec, _Mapping]] = ...) -> None: ...

class BatchSpec(_message.Message):
    __slots__ = ("size", "member_data", "chunk_size")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MEMBER_DATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    size: int
    member_data: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    chunk_size: int
    def __init__(self, size: _Optional[int] = ..., member_data: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("x", "fun", "jac", "nit", "nfev", "njev", "nhev", "status", "success", "message", "solve_time_s", "wall_time_s", "batch", "method_chosen", "method_reason")
    X_FIELD_NUMBER: _ClassVar[int]
    FUN_FIELD_NUMBER: _ClassVar[int]
    JAC_FIELD_NUMBER: _ClassVar[int]
    NIT_FIELD_NUMBER: _ClassVar[int]
    NFEV_FIELD_NUMBER: _ClassVar[int]
    NJEV_FIELD_NUMBER: _ClassVar[int]
    NHEV_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SOLVE_TIME_S_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_S_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    METHOD_CHOSEN_FIELD_NUMBER: _ClassVar[int]
    METHOD_REASON_FIELD_NUMBER: _ClassVar[int]
    x: Tensor
    fun: float
    jac: Tensor
    nit: int
    nfev: int
    njev: int
    nhev: int
    status: SolveStatus
    success: bool
    message: str
    solve_time_s: float
    wall_time_s: float
    batch: BatchResult
    method_chosen: str
    method_reason: str
    def __init__(self, x: _Optional[_Union[Tensor, _Mapping]] = ..., fun: _Optional[float] = ..., jac: _Optional[_Union[Tensor, _Mapping]] = ..., nit: _Optional[int] = ..., nfev: _Optional[int] = ..., njev: _Optional[int] = ..., nhev: _Optional[int] = ..., status: _Optional[_Union[SolveStatus, str]] = ..., success: _Optional[bool] = ..., message: _Optional[str] = ..., solve_time_s: _Optional[float] = ..., wall_time_s: _Optional[float] = ..., batch: _Optional[_Union[BatchResult, _Mapping]] = ..., method_chosen: _Optional[str] = ..., method_reason: _Optional[str] = ...) -> None: ...

class BatchResult(_message.Message):
    __slots__ = ("fun", "status", "nit", "nfev", "njev", "nhev", "converged")
    FUN_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    NIT_FIELD_NUMBER: _ClassVar[int]
    NFEV_FIELD_NUMBER: _ClassVar[int]
    NJEV_FIELD_NUMBER: _ClassVar[int]
    NHEV_FIELD_NUMBER: _ClassVar[int]
    CONVERGED_FIELD_NUMBER: _ClassVar[int]
    fun: Tensor
    status: Tensor
    nit: Tensor
    nfev: Tensor
    njev: Tensor
    nhev: Tensor
    converged: int
    def __init__(self, fun: _Optional[_Union[Tensor, _Mapping]] = ..., status: _Optional[_Union[Tensor, _Mapping]] = ..., nit: _Optional[_Union[Tensor, _Mapping]] = ..., nfev: _Optional[_Union[Tensor, _Mapping]] = ..., njev: _Optional[_Union[Tensor, _Mapping]] = ..., nhev: _Optional[_Union[Tensor, _Mapping]] = ..., converged: _Optional[int] = ...) -> None: ...

class Accepted(_message.Message):
    __slots__ = ("state", "method", "n", "batch_id", "members")
    STATE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    state: JobState
    method: str
    n: int
    batch_id: str
    members: int
    def __init__(self, state: _Optional[_Union[JobState, str]] = ..., method: _Optional[str] = ..., n: _Optional[int] = ..., batch_id: _Optional[str] = ..., members: _Optional[int] = ...) -> None: ...

class Iterate(_message.Message):
    __slots__ = ("iteration", "f", "grad_norm", "step_size", "nfev", "njev", "elapsed_s", "x", "batch")
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    F_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    STEP_SIZE_FIELD_NUMBER: _ClassVar[int]
    NFEV_FIELD_NUMBER: _ClassVar[int]
    NJEV_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    iteration: int
    f: float
    grad_norm: float
    step_size: float
    nfev: int
    njev: int
    elapsed_s: float
    x: Tensor
    batch: BatchProgress
    def __init__(self, iteration: _Optional[int] = ..., f: _Optional[float] = ..., grad_norm: _Optional[float] = ..., step_size: _Optional[float] = ..., nfev: _Optional[int] = ..., njev: _Optional[int] = ..., elapsed_s: _Optional[float] = ..., x: _Optional[_Union[Tensor, _Mapping]] = ..., batch: _Optional[_Union[BatchProgress, _Mapping]] = ...) -> None: ...

class BatchProgress(_message.Message):
    __slots__ = ("size", "active", "converged", "failed", "best_grad_norm", "median_grad_norm", "best_f", "median_f")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    CONVERGED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    BEST_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    MEDIAN_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    BEST_F_FIELD_NUMBER: _ClassVar[int]
    MEDIAN_F_FIELD_NUMBER: _ClassVar[int]
    size: int
    active: int
    converged: int
    failed: int
    best_grad_norm: float
    median_grad_norm: float
    best_f: float
    median_f: float
    def __init__(self, size: _Optional[int] = ..., active: _Optional[int] = ..., converged: _Optional[int] = ..., failed: _Optional[int] = ..., best_grad_norm: _Optional[float] = ..., median_grad_norm: _Optional[float] = ..., best_f: _Optional[float] = ..., median_f: _Optional[float] = ...) -> None: ...

class Failure(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class StateChange(_message.Message):
    __slots__ = ("state", "reason")
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    state: JobState
    reason: str
    def __init__(self, state: _Optional[_Union[JobState, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class Metrics(_message.Message):
    __slots__ = ("step", "values")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    step: int
    values: _containers.ScalarMap[str, float]
    def __init__(self, step: _Optional[int] = ..., values: _Optional[_Mapping[str, float]] = ...) -> None: ...

class TrainResult(_message.Message):
    __slots__ = ("metrics", "steps", "stopped_early", "restarts", "train_time_s", "wall_time_s", "artifacts")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    METRICS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    STOPPED_EARLY_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_TIME_S_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_S_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    metrics: _containers.ScalarMap[str, float]
    steps: int
    stopped_early: bool
    restarts: int
    train_time_s: float
    wall_time_s: float
    artifacts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, metrics: _Optional[_Mapping[str, float]] = ..., steps: _Optional[int] = ..., stopped_early: _Optional[bool] = ..., restarts: _Optional[int] = ..., train_time_s: _Optional[float] = ..., wall_time_s: _Optional[float] = ..., artifacts: _Optional[_Iterable[str]] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job_id", "seq", "time", "accepted", "iterate", "result", "failure", "state_change", "metrics", "train_result", "more")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ITERATE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    STATE_CHANGE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_RESULT_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    seq: int
    time: _timestamp_pb2.Timestamp
    accepted: Accepted
    iterate: Iterate
    result: Result
    failure: Failure
    state_change: StateChange
    metrics: Metrics
    train_result: TrainResult
    more: _containers.RepeatedCompositeFieldContainer[JobEvent]
    def __init__(self, job_id: _Optional[str] = ..., seq: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., accepted: _Optional[_Union[Accepted, _Mapping]] = ..., iterate: _Optional[_Union[Iterate, _Mapping]] = ..., result: _Optional[_Union[Result, _Mapping]] = ..., failure: _Optional[_Union[Failure, _Mapping]] = ..., state_change: _Optional[_Union[StateChange, _Mapping]] = ..., metrics: _Optional[_Union[Metrics, _Mapping]] = ..., train_result: _Optional[_Union[TrainResult, _Mapping]] = ..., more: _Optional[_Iterable[_Union[JobEvent, _Mapping]]] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "state", "method", "n", "batch_id", "created", "started", "finished", "result", "failure", "last_seq", "labels", "owner", "kind", "train_result")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TRAIN_RESULT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    method: str
    n: int
    batch_id: str
    created: _timestamp_pb2.Timestamp
    started: _timestamp_pb2.Timestamp
    finished: _timestamp_pb2.Timestamp
    result: Result
    failure: Failure
    last_seq: int
    labels: _containers.ScalarMap[str, str]
    owner: str
    kind: str
    train_result: TrainResult
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., method: _Optional[str] = ..., n: _Optional[int] = ..., batch_id: _Optional[str] = ..., created: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., result: _Optional[_Union[Result, _Mapping]] = ..., failure: _Optional[_Union[Failure, _Mapping]] = ..., last_seq: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., owner: _Optional[str] = ..., kind: _Optional[str] = ..., train_result: _Optional[_Union[TrainResult, _Mapping]] = ...) -> None: ...

class SolveRequest(_message.Message):
    __slots__ = ("problem", "coalesce_events")
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    COALESCE_EVENTS_FIELD_NUMBER: _ClassVar[int]
    problem: Problem
    coalesce_events: bool
    def __init__(self, problem: _Optional[_Union[Problem, _Mapping]] = ..., coalesce_events: _Optional[bool] = ...) -> None: ...

class SubmitRequest(_message.Message):
    __slots__ = ("problem", "idempotency_key")
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    problem: Problem
    idempotency_key: str
    def __init__(self, problem: _Optional[_Union[Problem, _Mapping]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class SubmitBatchRequest(_message.Message):
    __slots__ = ("problems",)
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    problems: _containers.RepeatedCompositeFieldContainer[Problem]
    def __init__(self, problems: _Optional[_Iterable[_Union[Problem, _Mapping]]] = ...) -> None: ...

class SubmitBatchResponse(_message.Message):
    __slots__ = ("batch_id", "jobs")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    JOBS_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, batch_id: _Optional[str] = ..., jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("job_id", "after_seq", "coalesce_events")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    COALESCE_EVENTS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    after_seq: int
    coalesce_events: bool
    def __init__(self, job_id: _Optional[str] = ..., after_seq: _Optional[int] = ..., coalesce_events: _Optional[bool] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("state", "method", "batch_id", "page_size", "page_token")
    STATE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    state: JobState
    method: str
    batch_id: str
    page_size: int
    page_token: str
    def __init__(self, state: _Optional[_Union[JobState, str]] = ..., method: _Optional[str] = ..., batch_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CallbackStart(_message.Message):
    __slots__ = ("problem", "provides_gradient", "provides_hvp", "resume_job_id")
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    PROVIDES_GRADIENT_FIELD_NUMBER: _ClassVar[int]
    PROVIDES_HVP_FIELD_NUMBER: _ClassVar[int]
    RESUME_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    problem: Problem
    provides_gradient: bool
    provides_hvp: bool
    resume_job_id: str
    def __init__(self, problem: _Optional[_Union[Problem, _Mapping]] = ..., provides_gradient: _Optional[bool] = ..., provides_hvp: _Optional[bool] = ..., resume_job_id: _Optional[str] = ...) -> None: ...

class EvaluationResult(_message.Message):
    __slots__ = ("request_id", "f", "gradient", "hvp", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    F_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_FIELD_NUMBER: _ClassVar[int]
    HVP_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    f: float
    gradient: Tensor
    hvp: Tensor
    error: str
    def __init__(self, request_id: _Optional[int] = ..., f: _Optional[float] = ..., gradient: _Optional[_Union[Tensor, _Mapping]] = ..., hvp: _Optional[_Union[Tensor, _Mapping]] = ..., error: _Optional[str] = ...) -> None: ...

class CallbackClientMessage(_message.Message):
    __slots__ = ("start", "result")
    START_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    start: CallbackStart
    result: EvaluationResult
    def __init__(self, start: _Optional[_Union[CallbackStart, _Mapping]] = ..., result: _Optional[_Union[EvaluationResult, _Mapping]] = ...) -> None: ...

class EvaluationRequest(_message.Message):
    __slots__ = ("request_id", "x", "need_f", "need_gradient", "hvp_vector")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    NEED_F_FIELD_NUMBER: _ClassVar[int]
    NEED_GRADIENT_FIELD_NUMBER: _ClassVar[int]
    HVP_VECTOR_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    x: Tensor
    need_f: bool
    need_gradient: bool
    hvp_vector: Tensor
    def __init__(self, request_id: _Optional[int] = ..., x: _Optional[_Union[Tensor, _Mapping]] = ..., need_f: _Optional[bool] = ..., need_gradient: _Optional[bool] = ..., hvp_vector: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class CallbackServerMessage(_message.Message):
    __slots__ = ("request", "event", "events")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    request: EvaluationRequest
    event: JobEvent
    events: _containers.RepeatedCompositeFieldContainer[JobEvent]
    def __init__(self, request: _Optional[_Union[EvaluationRequest, _Mapping]] = ..., event: _Optional[_Union[JobEvent, _Mapping]] = ..., events: _Optional[_Iterable[_Union[JobEvent, _Mapping]]] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("spec", "data", "idempotency_key")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    spec: _struct_pb2.Struct
    data: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    idempotency_key: str
    def __init__(self, spec: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., data: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class GetArtifactRequest(_message.Message):
    __slots__ = ("job_id", "name")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    name: str
    def __init__(self, job_id: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class Artifact(_message.Message):
    __slots__ = ("job_id", "name", "content_type", "data")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    name: str
    content_type: str
    data: bytes
    def __init__(self, job_id: _Optional[str] = ..., name: _Optional[str] = ..., content_type: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class PlanRequest(_message.Message):
    __slots__ = ("spec", "workers", "batch_size", "precision", "memory_budget_bytes")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    spec: _struct_pb2.Struct
    workers: int
    batch_size: int
    precision: str
    memory_budget_bytes: int
    def __init__(self, spec: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., workers: _Optional[int] = ..., batch_size: _Optional[int] = ..., precision: _Optional[str] = ..., memory_budget_bytes: _Optional[int] = ...) -> None: ...

class PlanRow(_message.Message):
    __slots__ = ("zero_stage", "activation_checkpointing", "accumulation_steps", "micro_batch_size", "parameter_bytes", "gradient_bytes", "optimizer_bytes", "activation_bytes", "total_bytes", "formula_parameter_bytes", "formula_gradient_bytes", "formula_optimizer_bytes", "step_time", "fits")
    ZERO_STAGE_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_CHECKPOINTING_FIELD_NUMBER: _ClassVar[int]
    ACCUMULATION_STEPS_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_BYTES_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    FORMULA_PARAMETER_BYTES_FIELD_NUMBER: _ClassVar[int]
    FORMULA_GRADIENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    FORMULA_OPTIMIZER_BYTES_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_FIELD_NUMBER: _ClassVar[int]
    FITS_FIELD_NUMBER: _ClassVar[int]
    zero_stage: int
    activation_checkpointing: bool
    accumulation_steps: int
    micro_batch_size: int
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    total_bytes: int
    formula_parameter_bytes: int
    formula_gradient_bytes: int
    formula_optimizer_bytes: int
    step_time: float
    fits: bool
    def __init__(self, zero_stage: _Optional[int] = ..., activation_checkpointing: _Optional[bool] = ..., accumulation_steps: _Optional[int] = ..., micro_batch_size: _Optional[int] = ..., parameter_bytes: _Optional[int] = ..., gradient_bytes: _Optional[int] = ..., optimizer_bytes: _Optional[int] = ..., activation_bytes: _Optional[int] = ..., total_bytes: _Optional[int] = ..., formula_parameter_bytes: _Optional[int] = ..., formula_gradient_bytes: _Optional[int] = ..., formula_optimizer_bytes: _Optional[int] = ..., step_time: _Optional[float] = ..., fits: _Optional[bool] = ...) -> None: ...

class PlanResponse(_message.Message):
    __slots__ = ("parameter_count", "workers", "batch_size", "precision", "optimizer", "memory_budget_bytes", "rows", "recommended", "reason", "activation_method", "table")
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    RECOMMENDED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_METHOD_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    parameter_count: int
    workers: int
    batch_size: int
    precision: str
    optimizer: str
    memory_budget_bytes: int
    rows: _containers.RepeatedCompositeFieldContainer[PlanRow]
    recommended: int
    reason: str
    activation_method: str
    table: str
    def __init__(self, parameter_count: _Optional[int] = ..., workers: _Optional[int] = ..., batch_size: _Optional[int] = ..., precision: _Optional[str] = ..., optimizer: _Optional[str] = ..., memory_budget_bytes: _Optional[int] = ..., rows: _Optional[_Iterable[_Union[PlanRow, _Mapping]]] = ..., recommended: _Optional[int] = ..., reason: _Optional[str] = ..., activation_method: _Optional[str] = ..., table: _Optional[str] = ...) -> None: ...
