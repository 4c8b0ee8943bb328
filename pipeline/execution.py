"""Run the block tasks of a plan on a cluster and watch them to the end.

One task per block (:func:`pipeline.inference.run_block`: read, infer, write the chunk,
then record the block in the ledger). The scheduler reruns a task whose worker died
(``distributed.scheduler.allowed-failures``) and a task that raised, up to
``cluster.retries`` times; a block that still fails stops the run with its pixels and
cause, and every block already recorded stays recorded for ``--resume``. A cluster left
without workers for ``cluster.worker_timeout`` (jobs cancelled and not replaced, a queue
that never starts them) stops the run instead of waiting for ever.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from dask.utils import parse_timedelta
from distributed import KilledWorker, as_completed

from .cluster import Connection
from .downsample import Downsampling
from .errors import ExecutionError, PipelineError
from .inference import InferenceSpec, run_block, share_spec
from .io import fs
from .io.ome import level_chunk_indices, write_level_chunk
from .progress import Progress
from .skip_blocks import write_skipped_block
from .tiling import TilePlan

POLL_SECONDS = 0.2
WORKER_CHECK_SECONDS = 2.0


@dataclass
class BlockCounts:
    """What happened to the plan's blocks in this run."""

    total: int
    resumed: int = 0  # written by an interrupted run and kept
    computed: int = 0  # by the model
    skipped: int = 0  # written as tiling.skip.label without the model (by the mask or a rule)
    retried: int = 0  # blocks whose task ran more than once (worker lost, or raised and retried)
    failed: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))

    def describe(self) -> str:
        parts = [f"{self.computed} computed"]
        if self.skipped:
            parts.append(f"{self.skipped} skipped (no model)")
        if self.resumed:
            parts.append(f"{self.resumed} resumed")
        parts.append(f"{self.retried} retried")
        if self.failed:
            parts.append(f"{self.failed} failed")
        return f"blocks     {self.total}: " + ", ".join(parts)


@dataclass
class Execution:
    seconds: float
    filled: int  # NaN/infinite input pixels that were filled
    computed_pixels: int = 0  # of the blocks the model ran on (skipped blocks not counted)
    submit_seconds: float = 0.0  # building and submitting the tasks (grows with the blocks)


def execute_blocks(
    conn: Connection,
    spec: InferenceSpec,
    todo: list[tuple[int, ...]],
    counts: BlockCounts,
    progress: Progress,
    masked: frozenset[tuple[int, ...]] = frozenset(),
) -> Execution:
    """Compute the blocks ``todo``; ``counts`` is updated as they finish (also on failure).

    Blocks in ``masked`` (``tiling.skip.mask`` skips them) become cheap tasks that write the
    skip class with neither model nor image read.

    The spec reaches the workers as the result of a task, not as scattered data: if the
    worker holding it dies, the scheduler recomputes it elsewhere.
    """
    client, cfg, plan = conn.client, conn.cfg, spec.plan
    start = time.perf_counter()
    if not todo:
        return Execution(0.0, 0)
    tag = spec.run_id[:8]
    shared = client.submit(share_spec, spec, key=f"spec-{tag}", pure=False)
    skips = [i for i in todo if i in masked]
    todo = [i for i in todo if i not in masked]
    keys = [f"predict-{tag}-{'-'.join(map(str, i))}" for i in todo]
    futures = client.map(
        run_block,
        todo,
        spec=shared,
        key=keys,
        retries=cfg.retries,
        resources={"GPU": 1} if conn.gpu_tasks else None,
    )
    index_of = dict(zip(keys, todo))
    if skips:  # after the blocks that need the model
        skip_keys = [f"skip-{tag}-{'-'.join(map(str, i))}" for i in skips]
        futures += client.map(write_skipped_block, skips, spec=shared, key=skip_keys, retries=cfg.retries)
        index_of.update(zip(skip_keys, skips))
        keys += skip_keys
    submitted = time.perf_counter() - start
    filled = pixels = 0
    watch = WorkerWatch(client, parse_timedelta(cfg.worker_timeout))
    pending = as_completed(futures)
    try:
        while not pending.is_empty():
            batch = pending.next_batch(block=False)
            if not batch:
                watch.check(spec, counts)
                time.sleep(POLL_SECONDS)
                continue
            for future in batch:
                if future.status in ("lost", "pending"):
                    # It finished, then its worker died holding the result (a job cancelled
                    # or pre-empted): the scheduler computes it again since we hold it.
                    pending.add(future)
                    continue
                if future.status != "finished":
                    counts.failed += 1
                    raise block_failure(index_of[future.key], plan, _exception_of(future), spec)
                result = future.result()
                if result.skipped:
                    counts.skipped += 1
                else:
                    counts.computed += 1
                    pixels += result.pixels
                filled += result.filled
                progress.update(result.tiles, result.pixels, skipped=result.skipped)
    except BaseException:
        counts.retried = _retried_blocks(client, keys, cfg.retries)  # before the tasks are forgotten
        client.cancel(futures + [shared], force=True)
        raise
    counts.retried = _retried_blocks(client, keys, cfg.retries)
    return Execution(time.perf_counter() - start, filled, pixels, submitted)


def build_pyramid(
    conn: Connection, path: str, run_id: str, levels: int, method: Downsampling, storage: fs.StorageRules
) -> float:
    """Compute pyramid levels ``1 .. levels`` of the volume at ``path``, each from the one
    before (one task per chunk of the new level); seconds taken. A failed chunk stops the
    run: the volume stays unfinished, and ``--resume`` builds the levels again."""
    client, start = conn.client, time.perf_counter()
    for level in range(1, levels + 1):
        indices = level_chunk_indices(path, level)
        keys = [f"pyramid-{run_id[:8]}-{level}-{'-'.join(map(str, i))}" for i in indices]
        index_of = dict(zip(keys, indices))
        futures = client.map(
            write_level_chunk, indices, path=path, run_id=run_id, level=level, method=method,
            storage=storage, key=keys, retries=conn.cfg.retries,
        )  # fmt: skip
        try:
            for future in as_completed(futures):
                if future.status != "finished":
                    exc = _exception_of(future)
                    if isinstance(exc, PipelineError):
                        raise exc
                    raise ExecutionError(
                        f"pyramid level {level} of {fs.redact(path)}: chunk {index_of[future.key]} "
                        f"failed: {one_line(exc)}; the volume stays unfinished (rerun with --resume)"
                    )
        except BaseException:
            client.cancel(futures, force=True)
            raise
    return time.perf_counter() - start


class WorkerWatch:
    """Fails the run when the cluster has had no worker at all for ``limit`` seconds."""

    def __init__(self, client: Any, limit: float) -> None:
        self.client, self.limit = client, limit
        self.last_seen = time.monotonic()
        self.last_check = -float("inf")

    def check(self, spec: InferenceSpec, counts: BlockCounts) -> None:
        now = time.monotonic()
        if now - self.last_check < WORKER_CHECK_SECONDS:
            return
        self.last_check = now
        if self.client.scheduler_info(n_workers=-1)["workers"]:
            self.last_seen = now
        elif now - self.last_seen > self.limit:
            done = counts.resumed + counts.computed + counts.skipped
            raise ExecutionError(
                f"the cluster has had no worker for {self.limit:.0f} s (cluster.worker_timeout): "
                f"its jobs ended or never started; {done} of {counts.total} blocks of "
                f"{spec.output_path} are written and kept: rerun with --resume to compute the rest"
            )


def _retried_blocks(client: Any, keys: list[str], retries: int) -> int:
    """Blocks whose task ran more than once, as the scheduler counted them."""
    try:
        return int(client.run_on_scheduler(count_retried, keys=keys, retries=retries))
    except Exception:  # a scheduler without this package installed: unknown, reported as 0
        return 0


def count_retried(dask_scheduler: Any, keys: list[str], retries: int) -> int:
    """On the scheduler: tasks that lost a worker (``suspicious``) or used a retry."""
    count = 0
    for key in keys:
        ts = dask_scheduler.tasks.get(key)
        if ts is not None and (ts.suspicious or (ts.retries is not None and ts.retries < retries)):
            count += 1
    return count


def _exception_of(future: Any) -> BaseException:
    if future.status == "cancelled":
        return RuntimeError("the task was cancelled (the cluster lost it)")
    try:
        return future.exception()
    except BaseException as exc:  # a lost future raises instead of returning its error
        return exc


def block_failure(index: tuple[int, ...], plan: TilePlan, exc: BaseException, spec: InferenceSpec) -> PipelineError:
    box = plan.block(index).write
    where = ", ".join(f"{a}:{b}" for a, b in zip(box.offset, box.stop))
    if isinstance(exc, PipelineError):
        detail = str(exc)
    elif isinstance(exc, KilledWorker):
        detail = (
            "the worker process running it died each time it was tried (killed by the system, "
            "e.g. for memory, or crashed in native code)"
        )
    else:
        detail = one_line(exc)
    return ExecutionError(
        f"block {index} (pixels {where}) of {spec.image.path} failed: {detail}; "
        f"{spec.output_path} keeps its finished blocks: after the fix, rerun with --resume"
    )


def one_line(exc: BaseException) -> str:
    """First and last line of an error (TorchScript and CUDA errors carry long traces)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [""]
    text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return f"{type(exc).__name__}: {text}"
