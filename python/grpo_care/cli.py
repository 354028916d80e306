"""`grpo-care`: train, eval, demo.

grpo-care train --config configs/seed_bench_r1_care.yaml [--field value ...]
grpo-care train --config configs/seed_bench_r1_care.yaml --resume_from_checkpoint latest
grpo-care eval  --model outputs/care/checkpoint-1500 --data validation_L1.jsonl validation_L2.jsonl [...] \
                --output_dir eval/ --judge offline          # report.json + samples.jsonl; rerun to resume
torchrun --nproc_per_node 8 -m grpo_care.cli train --config ... --distributed fsdp   # or ddp
torchrun --nproc_per_node 8 -m grpo_care.cli eval --model ... --data ... --output_dir eval/   # data-parallel
grpo-care demo  [...]                      # the embedded CPU demo (grpo_care.demo)

A mistake in the arguments (a missing file or model directory, a value of the wrong type or out of range, an
option misspelled or abbreviated, a reward function or judge that names nothing, a batch that does not fit the
torchrun world size, a malformed annotation file, an output_dir holding another run's checkpoints or samples)
ends in one line that names the argument, where its value came from and what to do, with exit status 2, before
the model is loaded; `--debug` anywhere on the command line (or GRPO_CARE_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from pathlib import Path

from grpo_care.config import COMMAND_LINE, GRPOCareConfig
from grpo_care.user_errors import OneLineArgumentParser, UsageError, check_dir, check_file, check_model_source

USAGE = (
    "usage: grpo-care {train,eval,demo} [options] [--debug]   (grpo-care <command> --help for each command's "
    "options)"
)
DEBUG_ENV = "GRPO_CARE_DEBUG"
ON_COMMAND_LINE = "given on the command line"


def debug_requested(argv: list[str]) -> bool:
    """`--debug` on the command line, or GRPO_CARE_DEBUG set to anything but '', 0, false, no, off."""
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    commands = {"train": _train, "eval": _eval, "demo": _demo}
    if command not in commands:
        print(f"grpo-care: unknown command {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    try:
        return commands[command](rest)
    except UsageError as err:
        if debug:
            raise
        print(f"grpo-care {command}: error: {err}", file=sys.stderr)
        return 2


def launched_world_size(config: GRPOCareConfig) -> int:
    """The number of ranks the trainer will run on: torchrun's WORLD_SIZE (1 outside torchrun, as
    distributed.setup decides); a UsageError for torchrun with distributed: none."""
    world = int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1
    if world > 1 and config.distributed == "none":
        raise UsageError(f"distributed=none, but torchrun launched {world} ranks: every rank would train its own "
                         "copy", source=config.describe_source("distributed"),
                         hint="pass --distributed ddp or fsdp (auto: ddp under torchrun)")
    return world


def check_train_inputs(config: GRPOCareConfig) -> None:
    """Everything `train` reads that a user can get wrong, checked before the model is loaded (UsageError): the
    model, the annotations (each record read), the data root, the checkpoint to resume from, the reward
    functions, the batch on this torchrun world size. A local-looking model path that does not exist never
    reaches the hub."""
    from grpo_care.batch import with_pinned_batch
    from grpo_care.data import load_samples
    from grpo_care.rewards import resolve_reward_func

    check_model_source(config.model_name_or_path, "model_name_or_path", config.describe_source("model_name_or_path"))
    if not config.train_file:
        raise UsageError("train_file is empty", source=config.describe_source("train_file"),
                         hint="set `train_file:` in the config or pass --train_file FILE (the training annotations)")
    check_file(config.train_file, "train_file", config.describe_source("train_file"), what="annotation file")
    if config.data_root:
        check_dir(config.data_root, "data_root", config.describe_source("data_root"), what="data root")
    resume = config.resume_from_checkpoint
    if resume and resume != "latest":
        source = config.describe_source("resume_from_checkpoint")
        check_dir(resume, "resume_from_checkpoint", source, what="checkpoint directory")
        if not (Path(resume).expanduser() / "trainer_state.pt").is_file():
            raise UsageError(f"resume_from_checkpoint: {resume!r} is not a checkpoint (no trainer_state.pt)",
                             source=source, hint="pass a checkpoint-N directory written by `grpo-care train`, "
                             "or latest (the newest in output_dir)")
    for name in config.reward_funcs:
        try:
            resolve_reward_func(name)
        except ValueError as err:
            raise UsageError(str(err), source=config.describe_source("reward_funcs"),
                             hint="pass --reward_funcs accuracy,format (or dotted paths that import)") from err
    with_pinned_batch(config, launched_world_size(config))
    load_samples(config.train_file, config.data_root or None, fmt=config.dataset_format, seed=config.seed,
                 template="train", prompt_style=config.prompt_style,
                 limit=config.max_train_samples)  # a malformed record: its file and line


def check_hub_model(name: str, argument: str, source: str) -> None:
    """A hub id is asked for its config now (a small file, cached after), so that a wrong id or no connection
    is a UsageError before anything else loads; a local directory is left alone (check_model_source)."""
    if Path(name).expanduser().exists():
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name)
    except OSError as err:
        raise _hub_error(name, argument, source, err) from err


def _hub_error(name: str, argument: str, source: str, err: OSError) -> UsageError:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UsageError(f"{argument}: {name!r} could not be loaded from the Hugging Face hub: {first_line}",
                      source=source,
                      hint="check the hub id, or pass a local model directory (a run's checkpoint-N)")


def _train(argv: list[str]) -> int:
    config = GRPOCareConfig.from_cli(argv, prog="grpo-care train")
    check_train_inputs(config)  # before the model is loaded
    check_hub_model(config.model_name_or_path, "model_name_or_path", config.describe_source("model_name_or_path"))
    from grpo_care import distributed
    from grpo_care.trainer import train

    try:
        summary = train(config)
    finally:
        distributed.cleanup()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "losses"}, indent=2, default=str))
    return 0


def _eval(argv: list[str]) -> int:
    parser = OneLineArgumentParser(
        prog="grpo-care eval",
        description="Scores a model on annotation files: SEED-Bench-R1's levels (accuracy per level and L3 domain, "
        "and the consistency rate with --judge) or Table 4's six general video benchmarks in Video-R1's "
        "evaluation layout (accuracy, and VSI-Bench's MRA apart); report.json has each level's scores per "
        "problem type. Other config fields (eval_*, video_*, e.g. --eval_video_max_frames 32) may follow as "
        "--field value (`grpo-care train --help` lists them).",
    )
    parser.add_argument("--model", required=True, help="model directory or hub id (a checkpoint-N works)")
    parser.add_argument(
        "--data",
        nargs="+",
        default=None,
        help="annotation files (JSONL/JSON); default: the config's eval_files",
    )
    parser.add_argument("--config", default=None, help="YAML config whose eval/video fields to use")
    parser.add_argument(
        "--data_root", default="", help="dataset root (default: the annotation file's grandparent)"
    )
    parser.add_argument(
        "--max_samples", type=int, default=0, help="score only the first N samples of each file"
    )
    parser.add_argument(
        "--output", default="", help="write the full result (with per-sample records) as JSON"
    )
    parser.add_argument(
        "--output_dir",
        default="",
        help="write report.json (per level / domain, consistency) and samples.jsonl (one line per sample); "
        "a rerun into the same directory resumes: finished samples are not generated again",
    )
    parser.add_argument(
        "--judge",
        default=None,
        help="consistency judge: none, offline, http or pkg.module:factory (default: config's eval_judge)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start over instead of resuming from output_dir/samples.jsonl",
    )
    args, rest = parser.parse_known_args(argv)
    _refuse_unknown_eval_options(parser, rest)
    config = GRPOCareConfig.from_yaml(args.config, rest + [f"model_name_or_path={args.model}"],
                                      overrides_source=COMMAND_LINE)
    # under torchrun: data-parallel, each rank holds the whole model (a training config's fsdp does not apply)
    config.distributed = "ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "none"
    files = args.data or config.eval_files
    if not files:
        parser.error("pass --data FILE [FILE ...] or a --config with eval_files")
    check_model_source(args.model, "--model", f"{ON_COMMAND_LINE} as --model {args.model}")
    for file in files:
        source = f"{ON_COMMAND_LINE} as --data" if args.data else config.describe_source("eval_files")
        check_file(file, "--data" if args.data else "eval_files", source, what="annotation file")
    if args.data_root:
        check_dir(args.data_root, "--data_root", f"{ON_COMMAND_LINE} as --data_root {args.data_root}",
                  what="data root")
    from grpo_care import distributed
    from grpo_care.data import load_samples
    from grpo_care.evaluate import evaluate_files, resume_conflict
    from grpo_care.judge import judge_factory

    spec = args.judge if args.judge is not None else config.eval_judge
    try:
        build_judge = judge_factory(spec, timeout=config.eval_judge_timeout,
                                    max_retries=config.eval_judge_max_retries)
    except ValueError as err:
        source = f"{ON_COMMAND_LINE} as --judge {spec}" if args.judge is not None else config.describe_source(
            "eval_judge")
        raise UsageError(str(err), source=source, hint="pass --judge none, offline, http or "
                         "pkg.module:factory (a module that imports, with that callable)") from err
    for file in files:  # a malformed record: its file and line, before the model loads
        load_samples(file, args.data_root or config.data_root or None, fmt=config.dataset_format,
                     seed=config.seed, template="eval", prompt_style=config.prompt_style, limit=args.max_samples)
    if args.output_dir and not args.overwrite:
        problem = resume_conflict(args.output_dir, config)
        if problem:
            raise UsageError(problem, source=f"{ON_COMMAND_LINE} as --output_dir {args.output_dir}")
    judge = build_judge()
    env = distributed.setup(config)  # one process: nothing to set up
    try:
        model, processor, tokenizer = _load_eval_model(config, env.device, args.model)
        model.to(env.device).eval()
        report = evaluate_files(
            model,
            processor or tokenizer,
            files,
            config,
            output_dir=args.output_dir or None,
            judge=judge,
            data_root=args.data_root or None,
            max_samples=args.max_samples,
            resume=not args.overwrite,
            env=env,
        )
    finally:
        distributed.cleanup()
    results = report.pop("results")
    if env.is_main:
        print(json.dumps(report, indent=2))
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps(results, indent=2))
    return 0


def _load_eval_model(config, device, name: str):
    """load_model; a hub id that the hub cannot serve (no such repo, no connection) is a UsageError."""
    from grpo_care.modeling import load_model

    try:
        return load_model(config, device)
    except OSError as err:
        if Path(name).expanduser().exists():  # a local model that fails to load is not a naming mistake
            raise
        raise _hub_error(name, "--model", f"{ON_COMMAND_LINE} as --model {name}", err) from err


def _refuse_unknown_eval_options(parser, rest: list[str]) -> None:
    """What `grpo-care eval` did not parse must be config fields (`--field value`, `--field=value`,
    `field=value`); anything else is refused here, with the closest eval option or config field."""
    fields = set(GRPOCareConfig.field_names())
    expects_value = False
    for token in rest:
        if expects_value:  # the value of the `--field` before it
            expects_value = False
            continue
        key = token.removeprefix("--").split("=", 1)[0].replace("-", "_")
        expects_value = token.startswith("--") and "=" not in token
        if key in fields:
            continue
        options = [o.removeprefix("--") for o in parser._option_string_actions if o.startswith("--")]
        close = difflib.get_close_matches(key, options + sorted(fields), n=1)
        parser.error(f"unrecognized arguments: {' '.join(rest)}" + (f" (did you mean --{close[0]}?)" if close else ""))


def _demo(argv: list[str]) -> int:
    """Run `grpo_care.demo.main` (a module with main(argv), or a main function of grpo_care.demo)."""
    import importlib

    try:
        target = importlib.import_module("grpo_care.demo.main")
    except ModuleNotFoundError as e:
        if e.name not in ("grpo_care.demo", "grpo_care.demo.main"):
            raise
        target = importlib.import_module("grpo_care.demo") if e.name == "grpo_care.demo.main" else None
    run = getattr(target, "main", None)
    if not callable(run):
        print(
            "grpo-care demo: the demo (grpo_care.demo.main) is not available in this installation yet.",
            file=sys.stderr,
        )
        return 2
    result = run(argv)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
