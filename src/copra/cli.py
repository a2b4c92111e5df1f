"""`copra <subcommand>`: each subcommand is a few lines calling the library.

`main(argv)` runs in-process (tests call it). A UserError prints one line and returns 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from copra.utils.compat import quiet_known_warnings
from copra.utils.errors import UserError, resource_error
from copra.utils.precision import PRECISIONS


def _cmd_train(args) -> int:
    from copra.core.config import load_config
    from copra.training.loop import check_writable, train
    from copra.training.run_folder import check_fresh_output
    from copra.utils.locks import folder_lock

    config = with_output(load_config(args.config, args.set), args)
    if args.quiet:
        config = config.replace(progress=False)
    check_writable(Path(config.output_dir))  # names a file in the way or a read-only folder, before the lock
    with folder_lock(config.output_dir):  # checked and written by one process only
        if not (args.resume or args.force):
            check_fresh_output(config.output_dir)
        result = train(config, output_dir=config.output_dir, resume=args.resume)
    if result.resumed_from == config.steps:
        print(f"{config.output_dir} already holds this finished run", file=sys.stderr)
    elif result.resumed_from is not None:
        print(f"resumed from the checkpoint at step {result.resumed_from}", file=sys.stderr)
    elif args.resume:
        print(f"no checkpoint in {config.output_dir}: trained from step 0", file=sys.stderr)
    print(
        f"{config.method} on {config.task}, seed {config.seed}: accuracy {100 * result.accuracy:.2f}% "
        f"({result.seconds_per_step:.3f} s/step, {result.precision or 'fp32'}) -> {result.adapter_dir}"
    )
    return 0


def _cmd_demo(args) -> int:
    if args.model == "smollm2":
        return _llm_demo(args)
    from copra.experiments.demo import DemoConfig, run, table

    config = DemoConfig(output_dir=args.output, progress=not args.quiet, jobs=args.jobs, precision=args.precision)
    _demo_budget(config, args)
    if args.sections is not None:
        config.sections = [s for s in args.sections.split(",") if s and s != "none"]
    config.__post_init__()
    summary = run(config)
    print(table(summary))
    for name, section in summary["sections"].items():
        print(f"{name}: {section['seconds']:.0f} s")
    print(f"\nwall time {summary['wall_seconds']:.0f} s; report: {os.path.join(args.output, 'report.md')}")
    return 0


def _demo_budget(config, args) -> None:
    """--tasks, --seeds and --steps into either demo's config (checked by its __post_init__ after)."""
    if args.tasks:
        config.tasks = args.tasks.split(",")
    if args.seeds:
        try:
            config.seeds = [int(s) for s in args.seeds.split(",")]
        except ValueError:
            raise UserError(f"--seeds takes integers separated by commas, got {args.seeds!r}") from None
    if args.steps:
        config.steps = args.steps


def _llm_demo(args) -> int:
    from copra.experiments.llm_demo import NAME, LLMDemoConfig, gains_table, run, table

    if args.sections is not None:
        raise UserError("--sections belongs to the encoder demo; the SmolLM2 demo has one table")
    config = LLMDemoConfig(output_dir=args.output, progress=not args.quiet, jobs=args.jobs, precision=args.precision)
    _demo_budget(config, args)
    config.__post_init__()
    summary = run(config, log=lambda line: print(line, file=sys.stderr))
    print(table(summary) + "\n\n" + gains_table(summary))
    report = os.path.join(args.output, f"{NAME}.md")
    print(f"\nwall time {summary['wall_seconds']:.0f} s ({summary['trained']} runs trained); report: {report}")
    return 0


def _cmd_experiment(args) -> int:
    from copra.experiments import EXPERIMENTS
    from copra.utils.settings import load_dataclass

    config_class, run, render = EXPERIMENTS[args.command]()
    sets = list(args.set)
    if args.executor is not None or args.ray_address is not None:
        if "executor" not in getattr(config_class, "__dataclass_fields__", {}):
            raise UserError(f"{args.command} runs in this process; --executor and --ray-address do not apply")
        sets += [f"executor={args.executor or 'ray'}"] + (
            [f"ray_address={args.ray_address}"] if args.ray_address else []
        )
    if args.quiet:
        sets.append("progress=false")
    config = with_output(load_dataclass(config_class, args.config, sets), args)
    summary = run(config)
    print(render(summary))
    print(f"results in {config.output_dir}")
    return 0


def with_output(config, args):
    """`config` with `-o/--output` as its output_dir; UserError if `--set output_dir=` names another folder.

    The path goes in as given, not parsed as YAML like a --set value (`-o 2024` stays a folder name);
    `dataclasses.replace` runs the config's own checks on it again.
    """
    from copra.utils.settings import parse_sets

    if args.output is None:
        return config
    given = parse_sets(args.set).get("output_dir")
    if given is not None and Path(str(given)) != Path(args.output):
        raise UserError(f"-o {args.output} and --set output_dir={given} name different folders; give one of them")
    return dataclasses.replace(config, output_dir=args.output)


def _numbers(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise UserError(f"--weights takes numbers separated by commas or spaces, got {text!r}") from None


def _cmd_merge(args) -> int:
    from copra.adapters.ops import merge_folders

    out = merge_folders(
        args.adapters,
        args.method,
        _numbers(args.weights),
        args.align,
        output=args.output,
        align_steps=args.align_steps,
        overwrite=args.force,
        density=args.density,
        majority_sign_method=args.majority_sign_method,
        seed=args.seed,
    )
    print(f"{args.method} of {len(args.adapters)} adapters{' (aligned)' if args.align else ''} -> {out}")
    return 0


def _cmd_prune(args) -> int:
    from copra.adapters.ops import prune_folder

    values = _keep_values(args)
    out = prune_folder(
        args.adapter,
        output=args.output,
        scheme=args.scheme,
        sparsity=args.sparsity,
        scope=args.scope,
        keep_values=values,
        keep=args.keep,
        overwrite=args.force,
    )
    how = args.scheme or (
        f"sparsity {args.sparsity}"
        if args.sparsity is not None
        else f"the {args.keep} players with the highest Shapley values"
    )
    print(f"pruned {args.adapter} ({how}) -> {out}")
    return 0


def _keep_values(args):
    """--keep-by-shapley: the VALUES.json path, or (players, values) computed now for `auto`."""
    from pathlib import Path

    if args.keep is not None and args.keep_by_shapley is None:
        raise UserError("--keep goes with --keep-by-shapley VALUES.json|auto")
    if args.task is not None and args.keep_by_shapley != "auto":
        raise UserError(
            "--task goes with --keep-by-shapley auto (the task whose training pool gives the validation split)"
        )
    if args.keep_by_shapley is None:
        return None
    if args.keep is None:
        raise UserError("--keep-by-shapley needs --keep K (how many players to keep)")
    if args.keep_by_shapley != "auto":
        return args.keep_by_shapley
    if args.task is None:
        raise UserError("--keep-by-shapley auto needs --task T (values are estimated on its validation split)")
    from copra.adapters.io import load_adapter
    from copra.adapters.ops import check_output
    from copra.adapters.prune import check_k, players_of
    from copra.experiments.shapley_pruning import auto_values

    check_output(Path(args.adapter), Path(args.output), args.force)  # before the minutes of estimation
    check_k(args.keep, len(players_of(load_adapter(args.adapter)[0], args.granularity)))
    return auto_values(args.adapter, args.task, args.granularity, args.samples)


def _cmd_report(args) -> int:
    from copra.report.assemble import write_report

    paths = write_report(args.results, args.output)
    print("report: " + " and ".join(str(p) for p in paths))
    return 0


def _cmd_reproduce(args) -> int:
    from copra.report.suite import reproduce
    from copra.utils.settings import parse_sets

    result = reproduce(
        args.suite,
        args.output,
        parse_sets(args.set),
        jobs=args.jobs,
        progress=not args.quiet,
        log=lambda line: print(line, file=sys.stderr),
        executor=args.executor or ("ray" if args.ray_address else "local"),
        ray_address=args.ray_address,
        skip=[n for part in args.skip for n in part.split(",") if n],
    )
    print("report: " + " and ".join(str(p) for p in result["report"]))
    return 0


def _cmd_tasks(args) -> int:
    from copra.data.text_tasks import MTL15, TASKS
    from copra.experiments.task_table import render, task_rows

    unknown = [n for n in args.names if n not in TASKS]
    if unknown:
        raise UserError(f"unknown task {unknown[0]!r}; choose from: {', '.join(MTL15)}")
    rows = task_rows(
        args.names or list(MTL15),
        zero_shot=args.zero_shot,
        eval_examples=args.eval_examples,
        model=args.model,
        progress=not args.quiet,
    )
    print(render(rows))
    return 0


class _ArgumentError(UserError):
    """A command line argparse refuses (printed as one line, exit code 2, like every UserError)."""


class _Parser(argparse.ArgumentParser):
    config_class: Callable[[], type] | None = None  # whose keys `--help` lists (loaded only when asked)

    def error(self, message: str):  # argparse prints usage + message and exits; copra prints one line
        raise _ArgumentError(f"{message} (see {self.prog} --help)")

    def format_help(self) -> str:
        if self.config_class is not None and self.epilog is None:
            from copra.utils.settings import keys_help

            self.formatter_class = argparse.RawDescriptionHelpFormatter
            self.epilog = "config keys (--set KEY=VALUE, or a YAML file):\n" + keys_help(self.config_class())
        return super().format_help()


def _executor_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--executor",
        choices=["local", "ray"],
        help="local: this process or --jobs processes (default); ray: one Ray task per training run",
    )
    p.add_argument(
        "--ray-address",
        help="Ray cluster to join (default $COPRA_RAY_ADDRESS, else a private local Ray "
        "with --jobs CPUs); run folders must be on a shared file system",
    )


def _train_config() -> type:
    from copra.core.config import TrainConfig

    return TrainConfig


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="copra",
        description="CopRA: progressive, randomly gated LoRA training",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(
        dest="command", required=True, parser_class=_Parser, metavar="COMMAND", help="one of the commands below"
    )
    summaries: dict[str, str] = {}

    def command(name: str, summary: str) -> _Parser:
        summaries[name] = summary  # listed by group below, not in argparse's one flat list
        return sub.add_parser(name, description=summary)

    p = command("train", "train one LoRA or CopRA adapter")
    p.config_class = _train_config
    p.add_argument("--config", help="YAML file overriding the defaults")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
    p.add_argument("-o", "--output", help="run folder (the config's output_dir; default runs/default)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar (as --set progress=false)")
    existing_run = p.add_mutually_exclusive_group()  # what to do with a run already in the folder
    existing_run.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in output_dir from its last checkpoint (same config; from step 0 if none)",
    )
    existing_run.add_argument("--force", action="store_true", help="start over even if output_dir already holds a run")
    p.set_defaults(func=_cmd_train)

    p = command("demo", "the main job: LoRA vs CopRA on the embedded default")
    p.add_argument("-o", "--output", default="results", help="results folder (default: results)")
    p.add_argument(
        "--model",
        choices=["minilm", "smollm2"],
        default="minilm",
        help="minilm: the encoder demo with its sections (default); smollm2: the decoder LLM demo (docs/llm-demo.md)",
    )
    p.add_argument("--tasks", help="comma-separated task names")
    p.add_argument("--seeds", help="comma-separated seeds")
    p.add_argument("--steps", type=int, help="optimizer steps per run")
    p.add_argument(
        "--sections", help="comma-separated: merging,pruning,shapley (default all; 'none' for the core table)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--jobs", type=int, default=1, help="training runs in parallel processes (default 1)")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto (bf16 where the CPU/GPU has it, else fp32), fp32, bf16 or fp16 (CUDA)",
    )
    p.set_defaults(func=_cmd_demo)

    from copra.adapters.peft_merge import MERGE_METHODS

    p = command("merge", "merge LoRA adapter folders (fusion, mixture or PEFT's methods) into one PEFT folder")
    p.add_argument("adapters", nargs="+", help="PEFT adapter folders (two or more)")
    p.add_argument(
        "--method",
        choices=MERGE_METHODS,
        default="fusion",
        metavar="METHOD",
        help="fusion (rank r), mixture (rank n*r) or PEFT's add_weighted_adapter: " + ", ".join(MERGE_METHODS[2:]),
    )
    p.add_argument("--weights", help="one weight per adapter, comma-separated (default: equal)")
    p.add_argument(
        "--density", type=float, help="fraction kept by ties, dare_*, magnitude_prune (and _svd), in (0, 1]"
    )
    p.add_argument("--majority-sign-method", choices=["total", "frequency"], help="TIES sign election (default total)")
    p.add_argument("--seed", type=int, default=0, help="seed of DARE's random drops (default 0)")
    p.add_argument("--align", action="store_true", help="LoRA Align every adapter to the first before merging")
    p.add_argument("--align-steps", type=int, default=200, help="Adam steps of LoRA Align per module")
    p.add_argument("-o", "--output", required=True, help="output adapter folder")
    p.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    p.set_defaults(func=_cmd_merge)

    p = command("prune", "prune a LoRA adapter folder (structured scheme, magnitude sparsity or keep K by Shapley)")
    p.add_argument("adapter", help="PEFT adapter folder")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--scheme", help="all, every_other, low, middle, high, query, key, value, output")
    how.add_argument("--sparsity", type=float, help="fraction of A/B entries to zero, in [0, 1)")
    how.add_argument(
        "--keep-by-shapley",
        metavar="VALUES.json|auto",
        help="keep the --keep K players with the highest Shapley values (a `copra shapley` JSON, or "
        "auto: estimate them now on a validation split of --task's training pool)",
    )
    p.add_argument("--keep", type=int, metavar="K", help="players kept with --keep-by-shapley")
    p.add_argument("--task", help="with --keep-by-shapley auto: the task the adapter was trained on")
    p.add_argument(
        "--granularity",
        choices=["layer", "module"],
        default="layer",
        help="with --keep-by-shapley auto: players are blocks (default) or single LoRA modules",
    )
    p.add_argument(
        "--samples",
        type=int,
        default=64,
        help="with --keep-by-shapley auto: multilinear samples (exact values when that covers 2^n)",
    )
    p.add_argument(
        "--scope", choices=["matrix", "global"], default="matrix", help="magnitude threshold per matrix or global"
    )
    p.add_argument("-o", "--output", required=True, help="output adapter folder")
    p.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    p.set_defaults(func=_cmd_prune)

    from copra.experiments import EXPERIMENTS, SUMMARIES

    for name, loader in EXPERIMENTS.items():
        p = command(name, SUMMARIES[name])
        p.add_argument("--config", help="YAML file overriding the experiment's defaults")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one key")
        p.add_argument("-o", "--output", help="results folder (the config's output_dir)")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars (as --set progress=false)")
        _executor_arguments(p)
        p.config_class = lambda load=loader: load().config
        p.set_defaults(func=_cmd_experiment)

    p = command("report", "every experiment's results in one Markdown + HTML report, in paper order")
    p.add_argument("results", help="results folder, searched recursively for experiment summaries")
    p.add_argument("-o", "--output", help="folder for paper_report.md / .html (default: the results folder)")
    p.set_defaults(func=_cmd_report)

    p = command("reproduce", "every paper table and figure as one resumable suite, then the report")
    p.add_argument(
        "--suite",
        choices=["full", "converged", "merge-regimes", "clip"],
        default="full",
        help="full: the embedded default, more seeds (hours on CPU); converged: per-method lr, 16 shots, 5 "
        "seeds, converged runs, statistics (hours on CPU; prints its expected time first); merge-regimes: "
        "where LoRA's merges break, then the pre-registered CopRA vs LoRA endpoints there; clip: CLIP-LoRA",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="applied to every step that has the key (e.g. seeds=0,1 steps=20; clip: model=, data_root=)",
    )
    p.add_argument("-o", "--output", default="results/reproduce", help="results folder (resumed if it exists)")
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="STEP[,STEP]",
        help="leave these steps out (e.g. crossover_long,schedules: the converged suite in under 4 h on 2 cores)",
    )
    p.add_argument("--jobs", type=int, default=1, help="training runs in parallel processes")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _executor_arguments(p)
    p.set_defaults(func=_cmd_reproduce)

    p = command("tasks", "list the embedded text tasks (MTL15): classes, sizes, zero-shot accuracy")
    p.add_argument("names", nargs="*", help="tasks to list (default: all 15)")
    p.add_argument(
        "--zero-shot", action="store_true", help="also evaluate the untrained encoder on each task (minutes)"
    )
    p.add_argument("--eval-examples", type=int, default=500, help="fixed evaluation subset per task (default 500)")
    p.add_argument("--model", default="embedded:minilm", help="encoder for --zero-shot (TrainConfig.model)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_tasks)
    groups = {
        "adapters": ["train", "merge", "prune"],
        "paper experiments (one table or figure each)": list(EXPERIMENTS),
        "everything at once": ["demo", "reproduce", "report"],
        "data": ["tasks"],
    }
    assert sorted(sum(groups.values(), [])) == sorted(summaries), "a command without a group"
    width = max(map(len, summaries))
    parser.epilog = (
        "\n\n".join(
            f"{title}:\n" + "\n".join(f"  {name:<{width}}  {summaries[name]}" for name in names)
            for title, names in groups.items()
        )
        + "\n\n`copra COMMAND --help` tells more; docs/commands.md has them all."
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    quiet_known_warnings()
    try:
        args = build_parser().parse_args(argv)
        code = args.func(args)
        sys.stdout.flush()  # here, so a closed pipe is seen inside the try, not at interpreter exit
        return code
    except BrokenPipeError:  # `copra tasks | head -2`: the reader left; end quietly, as a SIGPIPE'd tool would
        return _pipe_closed()
    except UserError as error:
        print(f"copra: error: {one_line(str(error))}", file=sys.stderr)
        return 2
    except (OSError, MemoryError) as error:  # a write the library did not wrap, or memory outside training
        converted = (
            resource_error(error, action="cannot use")
            if isinstance(error, OSError)
            else UserError("out of memory; try a smaller batch_size, fewer eval_examples or fewer --jobs")
        )
        if converted is None:
            raise
        print(f"copra: error: {one_line(str(converted))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("copra: interrupted", file=sys.stderr)
        return 130


def _pipe_closed() -> int:
    """Exit status 141 (128 + SIGPIPE) after pointing stdout at /dev/null (Python docs, "Note on SIGPIPE").

    The redirect keeps the interpreter's final flush of the unwritable buffer from printing a second error.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file descriptor (captured in-process)
        pass
    return 128 + 13


def one_line(message: str) -> str:
    """The message on one line (an error line never spans lines, whatever a file name holds)."""
    return " ".join(message.split()) if "\n" in message or "\r" in message else message


if __name__ == "__main__":
    sys.exit(main())
