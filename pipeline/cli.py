"""``pipeline validate|plan|run|evaluate|demo-data``: argv -> calls, no logic of its own.

User errors print one clear message (file, field, expected, got) and exit non-zero
without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

from . import __version__
from .errors import PipelineError, RunInterrupted


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    with _redacted_output():
        return _main(args)


@contextmanager
def _redacted_output() -> Iterator[None]:
    """Whatever this process prints loses credentials embedded in URLs (a last line of defence)."""
    from .io.fs import redact
    from .log_redaction import install

    install()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Redacting(sys.stdout, redact), _Redacting(sys.stderr, redact)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


class _Redacting:
    def __init__(self, stream: TextIO, redact: Callable[[str], str]) -> None:
        self._stream, self._redact = stream, redact

    def write(self, text: str) -> int:
        return self._stream.write(self._redact(text))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _main(args: argparse.Namespace) -> int:
    try:
        return int(args.handler(args) or 0)
    except PipelineError as exc:
        for line in str(exc).splitlines() or [type(exc).__name__]:
            print(f"error: {line}", file=sys.stderr)  # one line per problem
        return exc.exit_code
    except RunInterrupted as exc:
        if not exc.reported:  # stopped before anything was written
            print(f"interrupted ({exc.signal_name}) before the run started", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: any output being written is left marked incomplete", file=sys.stderr)
        return 130


def _validate(args: argparse.Namespace) -> int:
    from .config import load_workflow
    from .image_set import expand_images, prepare_set
    from .planning import prepare

    workflow = load_workflow(args.workflow)
    images = expand_images(workflow)
    if images is not None:
        every = prepare_set(images)
        print(
            f"{args.workflow}: valid: {len(every)} images, {every[0].model.geometry.name}, "
            f"{sum(p.plan.n_tiles for p in every)} tiles in {sum(p.plan.n_blocks for p in every)} blocks"
        )
        for note in sorted({n for p in every for n in p.notes}):
            print(f"note: {note}")
        return 0
    prepared = prepare(workflow)
    plan = prepared.plan
    print(
        f"{args.workflow}: valid: {prepared.image.shape} image, {prepared.model.geometry.name}, "
        f"{plan.n_tiles} tiles in {plan.n_blocks} blocks"
    )
    for note in prepared.notes:
        print(f"note: {note}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from .config import load_workflow
    from .image_set import describe_set, expand_images, prepare_set
    from .planning import describe_plan, prepare

    workflow = load_workflow(args.workflow)
    images = expand_images(workflow)
    if images is not None:
        print(describe_set(images, prepare_set(images)))
    else:
        print(describe_plan(prepare(workflow)))
    return 0


def _run(args: argparse.Namespace) -> int:
    from .config import load_workflow
    from .runner import run

    workflow = load_workflow(args.workflow)
    with _signals_interrupt():
        run(workflow, resume=args.resume, performance_report=args.performance_report)
    return 0


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM (``scancel``, ``kill``, a pod's termination) stop a run cleanly.

    The first one raises :class:`RunInterrupted` in the main thread: the runner cancels the
    tasks, stops the cluster and says how to resume; the exit status is 128 + the signal
    (130, 143). Repeats are ignored while that shutdown runs.
    """

    def handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise RunInterrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate_command import evaluate_command

    return evaluate_command(args)


def _train(args: argparse.Namespace) -> int:
    from .train_command import train_command

    return train_command(args.workflow, resume=args.resume)


def _instances(args: argparse.Namespace) -> int:
    from .instances_command import instances_command

    return instances_command(args)


def _demo_data(args: argparse.Namespace) -> int:
    from .demo import write_demo_data

    for path in write_demo_data(args.folder, size=args.size, seed=args.seed, overwrite=args.overwrite):
        print(path)
    return 0


def _demo_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 64 <= value <= 65536:
        raise argparse.ArgumentTypeError(f"expected 64 to 65536, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline",
        description="Segment gigapixel images with mirrored overlap-tile inference on Dask.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, handler, text in (
        ("validate", _validate, "check a workflow without computing (files, model, sizes)"),
        ("plan", _plan, "print the tiling plan: sizes, halo, borders, tasks, memory"),
        ("run", _run, "run a workflow: labels, then the IoU report if ground truth is given"),
    ):
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument("workflow", help="workflow YAML file")
        cmd.set_defaults(handler=handler)
        if name == "run":
            cmd.add_argument(
                "--resume",
                action="store_true",
                help="finish an interrupted run: compute only the blocks its output lacks "
                "(refused if the input, model or label-deciding settings changed); "
                "starts as usual when there is nothing to resume",
            )
            cmd.add_argument(
                "--performance-report", metavar="FILE", default=None,
                help="write Dask's HTML performance report of the block computation here",
            )  # fmt: skip

    ev = sub.add_parser(
        "evaluate",
        help="IoU statistics of label images against ground truth",
        description=(
            "Exact dataset-level statistics (confusion matrix summed over chunks): per-class "
            "IoU, Dice, precision, recall; mIoU, frequency-weighted IoU, pixel accuracy, mean "
            "class accuracy. PREDICTION and GROUND_TRUTH are label images (zarr, TIFF, PNG), "
            "folders or globs of them, paired by name: the path below a folder, or the parts a "
            "glob's wildcards match, without suffix."
        ),
    )
    ev.add_argument("prediction", help="label volume written by `pipeline run`, label image, folder or glob")
    ev.add_argument("ground_truth", help="ground-truth label image, folder or glob")
    ev.add_argument("--num-classes", type=int, default=None, help="default: from the encoding, else the largest id + 1")
    ev.add_argument("--ignore-index", type=int, default=None, help="truth value not counted")
    ev.add_argument("--ignore-mask", default=None, help="label image(s), nonzero = not counted")
    ev.add_argument("--encoding", choices=["indices", "binary", "palette"], default="indices")
    ev.add_argument("--classes", default=None, help="YAML/JSON list of {name, colour} in class-id order")
    ev.add_argument("--ignore-colour", action="append", default=[], help="palette colour not counted (repeatable)")
    ev.add_argument("--absent", choices=["exclude", "nan"], default="exclude", help="absent-class policy of the means")
    ev.add_argument("--regions", type=int, default=None, help="per-region breakdown on a grid of this cell size")
    ev.add_argument("--per-slice", action="store_true", help="per z-slice breakdown of label volumes (z, y, x)")
    ev.add_argument("--bootstrap", type=int, default=0, help="bootstrap resamples for a mIoU interval")
    ev.add_argument("--confidence", type=float, default=0.95)
    ev.add_argument("--json", default=None, help="write the JSON report here")
    ev.add_argument("--csv", default=None, help="write per-class statistics here")
    ev.add_argument("--heatmap", default=None, help="write the confusion heatmap PNG here")
    ev.add_argument("--preview", default=None, help="write the overlay preview PNG of the first pair here")
    ev.add_argument("--image", default=None, help="the input image, for the preview")
    ev.add_argument("--image-channel-axis", type=int, default=None)
    ev.add_argument(
        "--instances", action="store_true",
        help="match objects too: AP and F1 over IoU thresholds 0.5:0.95, panoptic quality, adapted Rand error, VI",
    )  # fmt: skip
    ev.add_argument("--instance-classes", type=int, nargs="+", default=None, help="classes whose connected pixels are objects")
    ev.add_argument("--connectivity", type=int, default=None, help="4 or 8 (2D), 6, 18 or 26 (3D); default 4 / 6")
    ev.add_argument("--prediction-ids", action="store_true", help="the prediction holds instance ids, not classes")
    ev.add_argument("--truth-ids", action="store_true", help="the ground truth holds instance ids, not classes")
    ev.add_argument("--instances-csv", default=None, help="write matching per image and IoU threshold here")
    ev.add_argument("--instances-plot", default=None, help="write the precision/recall/F1 plot PNG here")
    ev.add_argument("--overwrite", action="store_true", help="replace existing report files")
    ev.add_argument(
        "--storage-options",
        default=None,
        metavar="JSON",
        help="fsspec options for every store URL, e.g. '{\"endpoint_url\": \"https://s3.example.org\"}' "
        "(credentials: from the environment or a profile)",
    )
    ev.set_defaults(handler=_evaluate)

    tr = sub.add_parser(
        "train",
        help="fit a built-in U-Net or dilated network to image/label pairs (a checkpoint pipeline run loads)",
        description="Trains with the U-Net paper's recipe (mirrored patches, elastic deformation, weighted "
        "loss), validates each epoch and keeps the best checkpoint (.safetensors + .json).",
    )
    tr.add_argument("workflow", help="workflow YAML with model and train sections")
    tr.add_argument("--resume", action="store_true", help="continue from the last saved epoch")
    tr.set_defaults(handler=_train)

    inst = sub.add_parser(
        "instances",
        help="object ids, an object table (Parquet, CSV) from class labels",
        description=(
            "Connected components of the chosen classes over the whole volume, merged across "
            "block seams, as uint64 ids in an OME-Zarr label image (default: LABELS_instances "
            "beside LABELS), with one row per object (class, area, bounding box, centroid, mean "
            "intensity) in <out>.objects.parquet and .csv."
        ),
    )
    inst.add_argument("labels", help="label volume written by `pipeline run`, or a label image (zarr, TIFF, PNG)")
    inst.add_argument("--classes", type=int, nargs="+", required=True, help="class ids whose connected pixels make objects")
    inst.add_argument("--connectivity", type=int, default=None, help="4 or 8 (2D), 6, 18 or 26 (3D); default 4 / 6")
    inst.add_argument("--min-size", type=int, default=0, help="drop objects of fewer pixels")
    inst.add_argument("--grow-into", type=int, nargs="+", default=None, help="classes objects may grow into")
    inst.add_argument("--grow-by", type=int, default=0, help="at most this many pixels of growth")
    inst.add_argument("--image", default=None, help="the input image, for mean intensities per channel")
    inst.add_argument("--image-channel-axis", type=int, default=None)
    inst.add_argument("--out", default=None, help="the instance volume (default: beside LABELS)")
    inst.add_argument("--no-pyramid", action="store_true", help="level 0 only")
    inst.add_argument("--overwrite", action="store_true", help="replace an instance volume of this pipeline's")
    inst.set_defaults(handler=_instances)

    demo = sub.add_parser(
        "demo-data",
        help="generate the demo's synthetic EM-like image and its ground truth",
        description="Writes image.tif and labels.tif (tiled TIFF) into FOLDER, unless present.",
    )
    demo.add_argument("folder")
    demo.add_argument("--size", type=_demo_size, default=4096, help="edge in pixels (64 to 65536)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--overwrite", action="store_true", help="replace image.tif/labels.tif of another size")
    demo.set_defaults(handler=_demo_data)
    return parser


if __name__ == "__main__":
    sys.exit(main())
