"""The one way the engine opens an ONNX Runtime session for measuring: evaluation, mode auto's timing and
scoring, and sensitivity all use the same options, so their numbers are comparable."""

from __future__ import annotations

import onnxruntime as ort

from core.result import SessionSettings
from worker.engine.machine import usable_cores

# Idle intra-op threads of one session must not spin on cores while another model is being timed (the two
# sessions own separate thread pools).
_NO_SPIN = ("session.intra_op.allow_spinning", "0")


def session_options(threads: int) -> ort.SessionOptions:
    """`threads` at most the usable cores, whoever asked for more."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, min(threads, usable_cores()))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry(*_NO_SPIN)
    so.log_severity_level = 3  # errors only: ORT's warnings are not for the user
    return so


def session_settings(threads: int) -> SessionSettings:
    """What `session_options(threads)` sets, as the result records it."""
    return SessionSettings(
        intra_op_num_threads=max(1, min(threads, usable_cores())),
        inter_op_num_threads=1,
        execution_mode="sequential",
        graph_optimization_level="all",
        allow_spinning=False,
    )
