"""Errors a user can act on.

Every :class:`PipelineError` says where the problem is (file, field), what was expected
and what arrived. The CLI prints its message and exits non-zero without a traceback;
anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base class of errors caused by user input or the environment, not by a bug."""

    exit_code = 2


class WorkflowError(PipelineError):
    """The workflow file is unreadable, malformed or inconsistent."""


class InputImageError(PipelineError):
    """An input image (or ground truth) cannot be opened or does not fit the workflow."""


class ModelError(PipelineError):
    """The model cannot be built or loaded, or disagrees with the workflow."""


class TilingError(PipelineError):
    """No legal tiling exists for the requested tile size and the model's size rules."""


class OutputExistsError(PipelineError):
    """The output already exists and the workflow does not allow overwriting it."""


class OutputLockedError(OutputExistsError):
    """Another run is writing the same output right now."""


class OutputReplacedError(PipelineError):
    """The output was replaced or removed while this run was writing it."""

    exit_code = 1


class OutputIncompleteError(PipelineError):
    """An output volume was opened for reading but its run never finished."""


class StorageError(PipelineError):
    """A file or object store cannot be reached, read or written (credentials, bucket, key, network)."""


class EvaluationError(PipelineError):
    """Ground truth and prediction cannot be compared (shape, class ids)."""


class NonFiniteOutputError(PipelineError):
    """A model emitted NaN or infinite logits."""

    exit_code = 1


class ExecutionError(PipelineError):
    """A block failed on a worker; names the block and the cause."""

    exit_code = 1


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an error's message (TorchScript and torch errors carry long traces)."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


class ResumeRefusedError(PipelineError):
    """An interrupted run cannot be resumed: what decides its labels changed since it started."""


class RunInterrupted(BaseException):
    """The driver got SIGINT or SIGTERM: the run stops, its volume stays resumable.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` swallows it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.reported = False  # the runner said what stays and how to resume

    @property
    def signal_name(self) -> str:
        return {2: "SIGINT", 15: "SIGTERM"}.get(self.signum, f"signal {self.signum}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
