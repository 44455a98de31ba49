"""`hf-kvcache eval`: the evaluation tool on the command line (table, results.json/csv, PNG plots)."""

import argparse
import logging
import os
import signal
from contextlib import contextmanager
from pathlib import Path

import transformers

from hf_kvcache.eval.results import PARTIAL_MAX_BYTES, CacheResult, PartialResults
from hf_kvcache.eval.runner import DEFAULT_CACHES, MODES, evaluate
from hf_kvcache.eval.tasks import TASKS
from hf_kvcache.models import MODEL_HELP, model_folder_or_name
from hf_kvcache.registry import describe_caches
from hf_kvcache.report import format_table
from hf_kvcache.validation import check_int, check_writable

DESCRIPTION = """\
Measure what each KV-cache strategy costs: perplexity (overall and per position bucket), bytes the
cache holds as the text grows, peak process memory, and prefill/decode tokens/s, all as ratios to the
first cache. Writes a table to stdout and, to --output: results.json, results.csv, log_perplexity.png,
cache_memory.png, pareto.png (quality against bytes held, the Pareto front marked) and report.md (the
settings, the table and the figures, to paste into an issue or a paper). Each cache's result is also
saved as soon as it is measured (--resume).

examples:
  hf-kvcache eval
  hf-kvcache eval --dataset wikitext2 --max-tokens 4096 --cache dynamic --cache quantized:bits=2
  hf-kvcache eval --dataset pg19 --mode token --max-tokens 1024 --cache dynamic --cache quantized:bits=4,group_size=64
  hf-kvcache eval --model gemma3-270m --cache dynamic --cache quantized:bits=4   # the second packaged model
  hf-kvcache eval --model ./my-model --dataset notes.jsonl --cache dynamic --cache hf-quantized:backend=hqq,bits=4
  hf-kvcache eval --task long-context  # 16K tokens of a book token by token, past the 8K trained context
  hf-kvcache eval --task long-generation --max-new-tokens 1024 --cache dynamic --cache h2o:budget=128
  hf-kvcache eval --resume            # after an interruption: measure only the caches still missing
  hf-kvcache eval --num-processes 2 --cache dynamic --cache quantized:bits=4 --cache quantized:bits=2
  accelerate launch --multi_gpu --num_processes 4 -m hf_kvcache.cli eval --cache dynamic --cache sink:window=1020
  hf-kvcache eval --model big-model --device-map auto      # one model larger than a GPU, over all of them

With several processes (accelerate or torchrun), the caches are shared out among them (each cache measured
whole by one process, on its own device) and the main process writes one result set; results.json records
who measured what. (`accelerate launch --cpu --num_processes N` starts N processes only through MPI; without
it, use --num-processes N or --multi_gpu, which on a machine without GPUs runs N CPU processes.)
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="measure perplexity, memory and speed of cache strategies on WikiText-2, PG-19 or your text",
        description=DESCRIPTION,
        epilog="cache specs are NAME or NAME:KEY=VALUE,KEY=VALUE; registered caches (parameter: type = default):\n"
        + describe_caches(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default=None,
        help=MODEL_HELP,
    )
    parser.add_argument(
        "--task",
        choices=[*TASK_DEFAULTS, LONG_GENERATION, *TASKS, "retrieval"],
        default="perplexity",
        help="perplexity (default): the text through each cache. long-context: a book token by token far past "
        "the trained context (defaults: --dataset pg19 --mode token --max-tokens 16384 --segment-tokens 2048 and "
        "dense, sink and window caches), with per-segment perplexity and bytes held. long-generation: the full "
        "cache generates --max-new-tokens tokens (default 4096; greedily, or sampled at --temperature) after --context-tokens of a book (default "
        "512), each cache replays them: top-1 agreement with the full model, KL, first departure, bytes, speed. "
        + ", ".join(TASKS)
        + ": accuracy on prompts of --context-tokens built offline from a bundled book (RULER-style); "
        "retrieval: all of them",
    )
    parser.add_argument(
        "--context-tokens", type=int, default=None, help="task prompt length in tokens (default: 2048; tasks only)"
    )
    parser.add_argument("--samples", type=int, default=None, help="samples per task (default: 10; tasks only)")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="answer budget per task sample (default: the task's own; tasks only)",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="wikitext2, pg19, or a local .txt, .jsonl (a 'text' field per line) or .parquet ('text' column) file. "
        "wikitext2/pg19 come from the hub when it is reachable, else from copies bundled with the package "
        "(pg19 then means Crime and Punishment, Project Gutenberg #2554). Default: wikitext2 (long-context: pg19); "
        "e.g. --dataset book.txt",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="evaluate the first N tokens of the text (default: 2048; long-context: 16384); e.g. --max-tokens 4096",
    )
    parser.add_argument(
        "--segment-tokens",
        type=int,
        default=None,
        help="predicted tokens per perplexity segment (default: max-tokens / 8, at most 256; long-context: 2048)",
    )
    parser.add_argument(
        "--mode",
        choices=MODES,
        default=None,
        help="chunk: feed chunks of --chunk-size tokens (a chunk sees its own keys in full precision); "
        "token: one token at a time, each seeing only the cache (slow; no prefill speed). Default: chunk "
        "(long-context: token)",
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="tokens per chunk in chunk mode (default: 64; not with --mode token); e.g. --chunk-size 128",
    )
    parser.add_argument(
        "--cache",
        action="append",
        metavar="SPEC",
        help="a cache spec, repeatable; ratios are to the first one (default: "
        + " ".join(f"--cache {spec}" for spec in DEFAULT_CACHES)
        + "; long-context: "
        + " ".join(f"--cache {spec}" for spec in TASK_DEFAULTS["long-context"]["cache"])
        + "); e.g. --cache dynamic --cache quantized:bits=2,group_size=32",
    )
    parser.add_argument("--device", default=None, help="torch device for the model (default: cpu); e.g. --device cuda")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="model dtype (default: float32); e.g. --dtype bfloat16",
    )
    parser.add_argument(
        "--output",
        default="results/eval",
        help="folder for results.json, results.csv and the plots (default: ./results/eval); e.g. --output runs/kivi",
    )
    parser.add_argument("--seed", type=int, default=0, help="torch seed set before each cache (default: 0)")
    parser.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="long-generation: sample the reference generation at this temperature with --seed (default: 0, "
        "greedy; a small model's greedy output soon loops, e.g. --temperature 0.7 keeps it varied)",
    )
    parser.add_argument(
        "--decode-tokens",
        type=int,
        default=None,
        help="greedy decode steps after the text, timed for decode tokens/s (default: 16)",
    )
    parser.add_argument(
        "--device-map",
        default=None,
        help="spread a model larger than one device over all of them, e.g. --device-map auto (instead of --device)",
    )
    parser.add_argument(
        "--num-processes",
        type=int,
        default=1,
        help="share the caches out among N processes started through accelerate (one per GPU when there are GPUs, "
        "else on the CPU; at most the GPUs, or the CPU cores, of this machine); the same as "
        "`accelerate launch --multi_gpu --num_processes N -m hf_kvcache.cli eval ...`",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse the caches an interrupted run with the same settings, the same model weights and the same "
        "dataset bytes already measured (each is saved in --output/partial/ as soon as it is measured; a saved "
        "result that fails its checks is skipped with a warning and measured again)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars (also transformers' own)")
    parser.set_defaults(run=run, parser=parser)


TASK_DEFAULTS: dict[str, dict] = {
    "perplexity": {
        "dataset": "wikitext2",
        "mode": "chunk",
        "max_tokens": 2048,
        "chunk_size": 64,
        "decode_tokens": 16,
        "cache": list(DEFAULT_CACHES),
    },
    "long-context": {
        "dataset": "pg19",
        "mode": "token",
        "max_tokens": 16384,
        "segment_tokens": 2048,
        "chunk_size": 64,
        "decode_tokens": 16,
        "cache": ["dynamic", "sink:sink_tokens=4,window=1020", "window:window=1024"],
    },
}


LONG_GENERATION = "long-generation"
# Budget 1/8 of the default generation: 512 tokens.
LONG_GENERATION_CACHES = ["dynamic", "sink:sink_tokens=4,window=508", "h2o:budget=512", "tova:budget=512"]
LONG_GENERATION_DEFAULTS = {"dataset": "pg19", "context_tokens": 512, "max_new_tokens": 4096}
LONG_GENERATION_OPTIONS = (
    "--context-tokens",
    "--max-new-tokens",
    "--segment-tokens",
    "--temperature",
    "--seed",
    "--dataset",
    "--cache",
)
RETRIEVAL_CACHES = ["dynamic", "window:window=256", "snapkv:budget=256", "quantized:bits=2"]
RETRIEVAL_DEFAULTS = {"context_tokens": 2048, "samples": 10, "cache": RETRIEVAL_CACHES}
PERPLEXITY_OPTIONS = ("dataset", "max_tokens", "segment_tokens", "mode", "chunk_size", "decode_tokens")
TASK_OPTIONS = ("context_tokens", "samples", "max_new_tokens")


def apply_task_defaults(args: argparse.Namespace) -> None:
    """Fill the options the user left out with the task's defaults."""
    if args.task == LONG_GENERATION:
        defaults = {**LONG_GENERATION_DEFAULTS, "cache": LONG_GENERATION_CACHES}
    else:
        defaults = TASK_DEFAULTS.get(args.task, RETRIEVAL_DEFAULTS)
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.task == LONG_GENERATION and args.segment_tokens is None:
        args.segment_tokens = max(1, args.max_new_tokens // 8) if isinstance(args.max_new_tokens, int) else 1


def refuse(args: argparse.Namespace, message: str) -> None:
    """argparse's own refusal (usage, then one error line, exit status 2) when run from the command line."""
    parser = getattr(args, "parser", None)
    if parser is None:
        raise ValueError(message)
    parser.error(message)


def refuse_options_of_other_modes(args: argparse.Namespace) -> None:
    """An option the chosen task never reads is refused, not ignored: the user meant something by it."""
    if args.task == LONG_GENERATION:
        for name in ("samples", "max_tokens", "mode", "chunk_size", "decode_tokens"):
            if getattr(args, name, None) is not None:
                option = "--" + name.replace("_", "-")
                refuse(
                    args,
                    f"{option} does not apply to --task {LONG_GENERATION}; its options: "
                    + ", ".join(LONG_GENERATION_OPTIONS),
                )
        for name, unused in (("--resume", args.resume), ("--num-processes", args.num_processes != 1)):
            if unused:
                refuse(args, f"{name} does not apply to --task {LONG_GENERATION} (one process, measured whole)")
        return
    if args.temperature is not None:
        refuse(args, f"--temperature does not apply to --task {args.task}; it is an option of --task {LONG_GENERATION}")
    perplexity = args.task in TASK_DEFAULTS
    retrieval = "the retrieval tasks (--task " + ", ".join([*TASKS, "retrieval"]) + ")"
    foreign, owner = (TASK_OPTIONS, retrieval) if perplexity else (PERPLEXITY_OPTIONS, "--task perplexity/long-context")
    for name in foreign:
        if getattr(args, name, None) is not None:
            option = "--" + name.replace("_", "-")
            refuse(args, f"{option} does not apply to --task {args.task}; it is an option of {owner}")
    mode = args.mode or TASK_DEFAULTS.get(args.task, {}).get("mode")
    if perplexity and mode == "token" and args.chunk_size is not None:
        refuse(
            args, f"--chunk-size does not apply to --mode token (--task {args.task}); it is an option of --mode chunk"
        )


def process_limit(device: str | None) -> tuple[int, str]:
    """How many evaluation processes this machine runs, and why: one per GPU, else one per CPU core."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.device_count(), "the GPUs of this machine, one process each"
    return os.cpu_count() or 1, "the CPU cores of this machine, os.cpu_count()"


def writable_folder(folder: str) -> Path:
    """`folder`, created if needed and checked by writing into it, before any work (results are never lost
    to an output path found unusable after an hour of evaluation)."""
    output = Path(folder)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {folder}: is a file, not a folder")
    check_writable(output, f"--output {folder}")
    return output


def relaunch(args: argparse.Namespace, argv: list[str]) -> None:
    """Run this same command in `args.num_processes` processes through accelerate's launcher (in this process,
    so that a worker's death is one line naming it, not the launcher's 40-line traceback).

    Raises:
        RuntimeError: a worker died (which one, its pid, and its signal or exit status).
    """
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from hf_kvcache.prefix.redis_server import free_port

    forwarded = [value for value in argv if not value.startswith("--num-processes")]
    if "--num-processes" in argv:  # the value was a separate word
        index = argv.index("--num-processes")
        forwarded = argv[:index] + argv[index + 2 :]
    command = ["--multi_gpu", "--num_machines", "1", "--num_processes", str(args.num_processes)]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    command += ["-m", "hf_kvcache.cli", *forwarded]
    launch = launch_command_parser().parse_args(command)
    try:
        with quiet_launcher_logs():
            launch_command(launch)
    except ChildFailedError as error:
        raise RuntimeError(describe_failure(error, args.num_processes)) from None
    except SystemExit as exit_:  # the launcher's own exit on a signal (130: Ctrl-C)
        if exit_.code:
            raise RuntimeError(f"{args.num_processes} evaluation processes stopped: exit status {exit_.code}") from None


@contextmanager
def quiet_launcher_logs():
    """torch elastic logs each worker's end ("Sending process ... SIGTERM", "failed (exitcode ...)"); the one
    line of `describe_failure` says it instead."""
    import torch.distributed.run  # noqa: F401  (creates the elastic loggers, each with its own level)

    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict) if name.startswith("torch.")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def describe_failure(error, num_processes: int) -> str:
    """One line for torch elastic's ChildFailedError: the worker that failed first (not one the launcher
    stopped with SIGTERM afterwards), its pid, and its signal or exit status."""
    failures = sorted(error.failures.items(), key=lambda item: (item[1].timestamp, item[0]))
    causes = [item for item in failures if item[1].exitcode != -signal.SIGTERM] or failures
    rank, failure = causes[0]
    how = (
        f"was killed by signal {failure.signal_name()}"
        if failure.exitcode < 0
        else f"exited with status {failure.exitcode}"
    )
    stopped = len(error.failures) - 1
    others = f"; the launcher stopped {stopped} other(s)" if stopped else ""
    return f"evaluation process {rank} of {num_processes} (pid {failure.pid}) {how}{others}"


def run(args: argparse.Namespace) -> None:
    import torch
    from accelerate import PartialState

    refuse_options_of_other_modes(args)
    limit, why = process_limit(args.device)
    check_int("--num-processes", args.num_processes, minimum=1, maximum=limit, maximum_name=f"{limit} ({why})")
    if args.num_processes > 1 and "LOCAL_RANK" not in os.environ:
        relaunch(args, args.argv)
        return
    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    apply_task_defaults(args)
    check_int("--segment-tokens", args.segment_tokens if args.segment_tokens is not None else 1, minimum=1)
    output = writable_folder(args.output)
    if args.no_progress:
        transformers.utils.logging.disable_progress_bar()
    model = model_folder_or_name(args.model)
    if args.task == LONG_GENERATION:
        run_long_generation(args, model, output)
        return
    if args.task not in TASK_DEFAULTS:
        run_tasks(args, model, output, state)
        return
    settings = {
        name: getattr(args, name)
        for name in (
            "model",
            "dataset",
            "max_tokens",
            "mode",
            "chunk_size",
            "seed",
            "decode_tokens",
            "dtype",
            "segment_tokens",
        )
    }
    # A result holds about 60 bytes per token (NLLs, step positions, bytes held): the cap leaves 4x room.
    partial = Resumable(output / "partial", settings, CacheResult, args.resume and state.is_main_process)
    partial.max_bytes = 2**20 + 256 * args.max_tokens
    results = evaluate(
        caches=args.cache,
        model=model,
        dataset=args.dataset,
        max_tokens=args.max_tokens,
        mode=args.mode,
        chunk_size=args.chunk_size,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        decode_tokens=args.decode_tokens,
        bucket_size=args.segment_tokens,
        progress=not args.no_progress and state.is_local_main_process,
        device_map=args.device_map,
        done=partial,
        on_result=lambda result: partial.save(result.cache, result),
    )
    if not state.is_main_process:
        return
    from hf_kvcache.eval.markdown import write_report
    from hf_kvcache.eval.plots import write_plots

    results.write_json(output / "results.json")
    results.write_csv(output / "results.csv")
    plots = write_plots(results, output)
    long_context = args.task == "long-context"
    report = write_report(results, output, plots, command=["hf-kvcache", *args.argv], segments=long_context)
    print(results.table())
    if long_context:
        print("\nper segment (perplexity, and MiB held at its end):\n" + format_table(results.segment_rows()))
    written = [output / "results.json", output / "results.csv", *plots, report]
    print(f"\nwrote {', '.join(str(path) for path in written)}")


def run_tasks(args: argparse.Namespace, model: str | None, output: Path, state) -> None:
    """`--task passkey` (or another retrieval task, or all of them): accuracy per cache, bytes held, speed."""
    from hf_kvcache.eval.markdown import write_markdown_report
    from hf_kvcache.eval.plots import pareto_points, write_pareto
    from hf_kvcache.eval.task_eval import TaskResult
    from hf_kvcache.eval.task_runner import evaluate_tasks

    tasks = list(TASKS) if args.task == "retrieval" else [args.task]
    settings = {
        name: getattr(args, name) for name in ("model", "context_tokens", "samples", "seed", "max_new_tokens", "dtype")
    }
    partial = Resumable(
        output / "partial", {**settings, "tasks": tasks}, TaskResult, args.resume and state.is_main_process
    )
    partial.max_bytes = 2**20 + 16 * 2**10 * args.samples  # a sample record is under 4 KiB
    run = evaluate_tasks(
        args.cache,
        tasks,
        model=model,
        context_tokens=args.context_tokens,
        samples=args.samples,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        dtype=args.dtype,
        device_map=args.device_map,
        progress=not args.no_progress and state.is_local_main_process,
        done=partial,
        on_result=partial.save,
    )
    if not state.is_main_process:
        return
    run.write_json(output / "results.json")
    run.write_csv(output / "results.csv")
    figures = []
    for task in tasks:
        points = pareto_points([r for r in run.results if r.task == task], "accuracy", "mean_cache_bytes", name="spec")
        title = f"{Path(run.model).name}, {task}, {run.samples} samples of {run.context_tokens:,} tokens"
        figures.append(write_pareto(points, output / f"pareto_{task}.png", "accuracy", False, title))
    report = write_markdown_report(
        output,
        f"KV-cache task accuracy: {Path(run.model).name}",
        {
            **settings,
            "tasks": ", ".join(tasks),
            "device": run.device,
            "versions": ", ".join(f"{k} {v}" for k, v in run.versions.items()),
        },
        run.table_rows(),
        notes=[
            "`accuracy`: mean score over the samples (fraction of the expected answers found in the greedy answer); "
            "`cache MiB`: bytes the cache held after answering, mean over samples."
        ],
        figures=figures,
        command=["hf-kvcache", *args.argv],
    )
    print(run.table())
    written = [output / "results.json", output / "results.csv", *figures, report]
    print(f"\nwrote {', '.join(str(path) for path in written)}")


class Resumable:
    """Where a run's results are saved and what `--resume` may reuse, both decided once the run knows its
    identity (the model's weight fingerprint, the data's hashes: see `runner.reusable_results`), so that a
    dataset edited in place or a model folder re-saved with other weights is measured again."""

    def __init__(self, folder: Path, settings: dict, kind: type, resume: bool):
        self.folder, self.settings, self.kind, self.resume = folder, settings, kind, resume
        self.max_bytes = PARTIAL_MAX_BYTES
        self.partial: PartialResults | None = None

    def __call__(self, identity: dict) -> dict:
        self.partial = PartialResults(self.folder, {**self.settings, **identity}, self.max_bytes)
        found = self.partial.load(self.kind) if self.resume else {}
        if found:
            print(f"resuming: {len(found)} result(s) already measured ({', '.join(found)})")
        return found

    def save(self, label: str, result: object) -> None:
        if self.partial is None:
            raise RuntimeError("a result was measured before the run's identity was known")
        self.partial.save(label, result)


def run_long_generation(args: argparse.Namespace, model: str | None, output: Path) -> None:
    """`--task long-generation`: the reference generation, every cache's replay, the tables, results.json,
    results.csv, segments.csv and agreement.png."""
    import csv
    import json

    import torch

    from hf_kvcache.eval.data import load_text, tokenize_text
    from hf_kvcache.eval.long_generation import evaluate_long_generation, write_agreement_plot
    from hf_kvcache.models import load_model, model_title

    check_int("--max-new-tokens", args.max_new_tokens, minimum=1)
    loaded, tokenizer = load_model(model, dtype=args.dtype, device=args.device, device_map=args.device_map)
    prompt = tokenize_text(load_text(args.dataset), tokenizer, args.context_tokens, "--context-tokens")
    torch.manual_seed(args.seed)
    run = evaluate_long_generation(
        loaded,
        prompt,
        args.cache,
        args.max_new_tokens,
        args.segment_tokens,
        model_name=model_title(model),
        progress=not args.no_progress,
        temperature=args.temperature or 0.0,
        seed=args.seed,
    )
    print(format_table(run.rows()))
    print("\nper segment (agreement, mean KL, and MiB held at its end):\n" + format_table(run.segment_rows()))
    (output / "results.json").write_text(json.dumps(run.to_json(), indent=1) + "\n", encoding="utf-8")
    for name, rows in (("results.csv", [r.summary() for r in run.results]), ("segments.csv", run.segment_rows())):
        with open(output / name, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    write_agreement_plot(run, output / "agreement.png", window=args.segment_tokens)
    written = [output / name for name in ("results.json", "results.csv", "segments.csv", "agreement.png")]
    print(f"\nwrote {', '.join(str(path) for path in written)}")
