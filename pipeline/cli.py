"""``pipeline validate|plan|run|evaluate|demo-data``: argv -> calls, no logic of its own.

User errors print one clear message (file, field, expected, got) and exit non-zero
without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from .errors import PipelineError


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: any output being written is left marked incomplete", file=sys.stderr)
        return 130


def _validate(args: argparse.Namespace) -> int:
    from .config import load_workflow
    from .planning import prepare

    prepared = prepare(load_workflow(args.workflow))
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
    from .planning import describe_plan, prepare

    print(describe_plan(prepare(load_workflow(args.workflow))))
    return 0


def _run(args: argparse.Namespace) -> int:
    from .config import load_workflow
    from .runner import run

    run(load_workflow(args.workflow))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_paths
    from .io.images import ImageSpec
    from .report import class_names, format_table, scores_to_dict, write_json

    if args.num_classes < 1:
        raise PipelineError(f"--num-classes: expected an integer >= 1, got {args.num_classes}")
    scores = evaluate_paths(
        ImageSpec(args.prediction, None, "prediction"),
        ImageSpec(args.ground_truth, None, "ground truth"),
        args.num_classes,
        args.ignore_index,
    )
    names = class_names(args.num_classes)
    print(format_table(scores, names))
    if args.json:
        document = {
            "prediction": args.prediction,
            "ground_truth": args.ground_truth,
            "num_classes": args.num_classes,
            "ignore_index": args.ignore_index,
            **scores_to_dict(scores, names),
        }
        write_json(args.json, document)
        print(f"report: {args.json}")
    return 0


def _demo_data(args: argparse.Namespace) -> int:
    from .demo import write_demo_data

    for path in write_demo_data(args.folder, size=args.size, seed=args.seed):
        print(path)
    return 0


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

    ev = sub.add_parser(
        "evaluate",
        help="IoU statistics of a label image against ground truth",
        description="Confusion matrix, per-class IoU, mIoU, Dice and pixel accuracy.",
    )
    ev.add_argument("prediction", help="label volume written by `pipeline run`, TIFF or zarr")
    ev.add_argument("ground_truth", help="ground-truth label image (TIFF or zarr)")
    ev.add_argument("--num-classes", type=int, required=True)
    ev.add_argument("--ignore-index", type=int, default=None)
    ev.add_argument("--json", default=None, help="also write the report here")
    ev.set_defaults(handler=_evaluate)

    demo = sub.add_parser(
        "demo-data",
        help="generate the demo's synthetic EM-like image and its ground truth",
        description="Writes image.tif and labels.tif (tiled TIFF) into FOLDER, unless present.",
    )
    demo.add_argument("folder")
    demo.add_argument("--size", type=int, default=4096)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=_demo_data)
    return parser


if __name__ == "__main__":
    sys.exit(main())
