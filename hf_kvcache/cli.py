"""The `hf-kvcache` command line: one sub-command per tool."""

import argparse
import sys

from hf_kvcache import demo
from hf_kvcache.calibration import command as calibrate_command
from hf_kvcache.eval import command as eval_command
from hf_kvcache.eval import harness_command
from hf_kvcache.prefix import command as prefix_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-kvcache",
        description="KV-cache strategies for Hugging Face transformers: try them, measure them.",
        epilog="Run `hf-kvcache COMMAND --help` for the options of each command.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo.add_parser(subparsers)
    eval_command.add_parser(subparsers)
    prefix_command.add_parser(subparsers)
    calibrate_command.add_parser(subparsers)
    harness_command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not hasattr(args, "passed_on"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.passed_on = extra  # a command that hands the rest to another tool's own parser (lm-eval)
    args.argv = argv  # the words after `hf-kvcache`, for a command that starts itself again
    try:
        args.run(args)
    except (ValueError, RuntimeError, OSError) as error:
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())  # one line
        print(f"hf-kvcache {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
