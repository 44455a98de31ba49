"""`hf-kvcache lm-eval`: the harness's own `run` command with the `hf-kvcache` model type and a cache spec.

Kept apart from `harness.py` so that the command line starts without importing lm-evaluation-harness.
"""

import argparse
import sys
from unittest import mock

from hf_kvcache.models import MODEL_HELP
from hf_kvcache.registry import parse_cache_spec

DESCRIPTION = """\
Score a cache strategy on lm-evaluation-harness tasks: loglikelihood and rolling-loglikelihood requests are fed
through the cache in chunks (so quantization and eviction change the scores), generation requests get a fresh
cache each. Every option after ours is the harness's `lm-eval run` option (its task names, --num_fewshot,
--limit, --batch_size, --include_path, --output_path, --log_samples, ...); results print as the harness's
table and are written in its format.

examples:
  hf-kvcache lm-eval --cache quantized:bits=2 --tasks lambada_openai --limit 100
  hf-kvcache lm-eval --cache window:window=256 --tasks wikitext --output_path results/
  hf-kvcache lm-eval --model ./my-model --cache snapkv:budget=512 --tasks mytask --include_path tasks/
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "lm-eval",
        help="run lm-evaluation-harness tasks through a cache strategy",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cache", default="dynamic", help="a cache spec, e.g. quantized:bits=2 (default: dynamic)")
    parser.add_argument(
        "--model",
        default="packaged",
        help=MODEL_HELP,
    )
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per scoring forward (default: 512)")
    parser.set_defaults(run=run, passed_on=[])  # every other option goes to the harness


def harness_argv(args: argparse.Namespace) -> list[str]:
    """The harness's `run` words: our model type, with the model, the spec's name and each of its settings as
    separate model arguments (the harness splits `model_args` at commas), then the user's options."""
    spec = parse_cache_spec(args.cache)  # a bad spec is refused before the harness loads anything
    model_args = [f"pretrained={args.model}", f"cache={spec.name}"]
    model_args += [f"{key}={value}" for key, value in spec.params.items()]
    if args.chunk_size is not None:
        model_args.append(f"chunk_size={args.chunk_size}")
    rest = [word for word in args.passed_on if word != "--"]
    if "--model" in rest:
        raise ValueError("--model goes before the harness's options here; the harness's model type is hf-kvcache")
    return ["run", "--model", "hf-kvcache", "--model_args", *model_args, *rest]


def run(args: argparse.Namespace) -> None:
    try:
        from lm_eval._cli import HarnessCLI

        import hf_kvcache.eval.harness  # noqa: F401  (registers the model type)
    except ImportError as error:
        raise RuntimeError(
            f"hf-kvcache lm-eval needs lm-evaluation-harness: pip install 'hf_kvcache[harness]' ({error})"
        ) from None
    argv = harness_argv(args)
    with mock.patch.object(sys, "argv", ["lm-eval", *argv]):  # the harness reads its words from sys.argv
        harness = HarnessCLI()
        harness.execute(harness.parse_args())
