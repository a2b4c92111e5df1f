"""`copra <subcommand>`: each subcommand is a few lines calling the library.

`main(argv)` runs in-process (tests call it). A UserError prints one line and returns 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from copra.errors import UserError


def _cmd_train(args) -> int:
    from copra.config import load_config
    from copra.training import train

    config = load_config(args.config, args.set)
    result = train(config, output_dir=config.output_dir)
    print(f"{config.method} on {config.task}, seed {config.seed}: accuracy {100 * result.accuracy:.2f}% "
          f"({result.seconds_per_step:.3f} s/step) -> {result.adapter_dir}")
    return 0


def _cmd_demo(args) -> int:
    from copra.experiments.demo import DemoConfig, render, run, table

    config = DemoConfig(output_dir=args.output, progress=not args.quiet)
    if args.tasks:
        config.tasks = args.tasks.split(",")
    if args.seeds:
        config.seeds = [int(s) for s in args.seeds.split(",")]
    if args.steps:
        config.steps = args.steps
    summary = run(config)
    print(table(summary))
    print(f"\nwall time {summary['wall_seconds']:.0f} s; report: {os.path.join(args.output, 'report.md')}")
    return 0


def _cmd_tasks(args) -> int:
    from copra.data.text_tasks import load_task, task_names

    for name in task_names():
        try:
            task = load_task(name)
            print(f"{name:16s} {task.num_classes:3d} classes  {len(task.train_texts):6d} train  "
                  f"{len(task.test_texts):6d} test  {task.template!r}")
        except UserError as error:
            print(f"{name:16s} unavailable: {error}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="copra", description="CopRA: progressive, randomly gated LoRA training")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one LoRA or CopRA adapter")
    p.add_argument("--config", help="YAML file overriding the defaults")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("demo", help="the main job: LoRA vs CopRA on the embedded default")
    p.add_argument("-o", "--output", default="results", help="results folder (default: results)")
    p.add_argument("--tasks", help="comma-separated task names")
    p.add_argument("--seeds", help="comma-separated seeds")
    p.add_argument("--steps", type=int, help="optimizer steps per run")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("tasks", help="list the embedded text tasks")
    p.set_defaults(func=_cmd_tasks)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as error:
        print(f"copra: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("copra: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
