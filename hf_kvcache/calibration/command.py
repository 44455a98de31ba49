"""`hf-kvcache calibrate`: a per-layer bit profile (key and value widths) for a model, from a short calibration,
TriAttention's query statistics (`--query-statistics`) or the prefix store's transform codec (`--transform-codec`)."""

import argparse
import time
from pathlib import Path

import transformers

from hf_kvcache.models import MODEL_HELP
from hf_kvcache.quant.profile import METRIC_LABEL, BitProfile, check_budget, check_choices
from hf_kvcache.report import format_table
from hf_kvcache.validation import check_int, check_writable

DESCRIPTION = """\
Choose every layer's key and value code widths for `QuantizedCache` (KVTuner-style mixed precision,
https://arxiv.org/abs/2502.04420). For each layer, each width of --choices and each of keys and values,
one chunked pass over the calibration text measures how much the predictions degrade when only that
layer's keys (or values) are quantized at that width: by default the mean KL divergence of the next-token
distribution from the full-precision one (--metric kl), or the mean NLL increase on the text (--metric nll),
in nats per token. Assuming the layers' degradations add up, the widths with the least sum whose mean over
layers of (key bits + value bits) / 2 is at most --average-bits are chosen exactly (a multiple-choice
knapsack). Cost: layers x 2 x len(choices) passes of --tokens tokens (the packaged 30-layer SmolLM2-135M,
512 tokens, choices 2 3 4: 180 passes, about 6 min on one CPU core).

Prints a table per layer (sensitivity per width, chosen widths) and writes the profile as JSON to --output;
use it with `--cache quantized:profile=PATH` (and the same --cache-settings, if any).

With --query-statistics it calibrates TriAttention (https://arxiv.org/abs/2604.04921) instead: one chunked
forward over the text records, per full-attention layer and query head, the mean query before RoPE and the
mean norm of each rotated channel pair, written as JSON to --output (default query-statistics.json); use it
with `--cache triattention:budget=256,statistics=PATH`.

With --transform-codec it calibrates the prefix store's transform codec (KVTC, https://arxiv.org/abs/2511.01815):
one chunked forward, then per layer the principal components of its keys (taken out of RoPE) and of its values,
written as safetensors to --output (default transform-codec.safetensors), keyed to the model's weights; use it
with `PrefixCache(backend, codec=TransformCodec(CodecCalibration.load(PATH), model, average_bits=2))`.

examples:
  hf-kvcache calibrate --average-bits 2.5 --output profile-2.5bits.json
  hf-kvcache calibrate --average-bits 3 --choices 2 3 4 8 --tokens 1024 --output profile-3bits.json
  hf-kvcache calibrate --model ./my-model --dataset notes.txt --cache-settings residual_length=64,group_size=32
  hf-kvcache calibrate --reuse profile-2.5bits.json --average-bits 3 --output profile-3bits.json  # no passes
  hf-kvcache eval --cache quantized:bits=2,key_bits=3 --cache quantized:profile=profile-2.5bits.json
  hf-kvcache calibrate --query-statistics --dataset wikitext2 --tokens 2048 --output query-statistics.json
  hf-kvcache eval --task long-generation --cache triattention:budget=256,statistics=query-statistics.json
  hf-kvcache calibrate --transform-codec --tokens 4096 --output transform-codec.safetensors

The default text is pg19 (Crime and Punishment when the hub is unreachable), not WikiText-2, so that a
profile is not calibrated on the text `hf-kvcache eval` measures it on.
"""

DEFAULTS = {"dataset": "pg19", "tokens": 512, "chunk_size": 64, "cache_settings": None, "model": None, "metric": "kl"}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="calibrate a model: per-layer key/value widths for the quantized cache (default), TriAttention's query "
        "statistics (--query-statistics) or the prefix store's transform codec (--transform-codec)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default=None,
        help=MODEL_HELP,
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="calibration text: wikitext2, pg19, or a local .txt, .jsonl (a 'text' field per line) or .parquet "
        "('text' column) file (default: pg19); e.g. --dataset notes.txt",
    )
    parser.add_argument(
        "--tokens", type=int, default=None, help="calibrate on the first N tokens of the text (default: 512)"
    )
    what = parser.add_mutually_exclusive_group()
    what.add_argument(
        "--query-statistics",
        action="store_true",
        help="calibrate TriAttention's per-head query statistics (one forward over the text) instead of a bit "
        "profile; the bit-profile options (--average-bits, --choices, --metric, --cache-settings, --reuse) do not apply",
    )
    what.add_argument(
        "--transform-codec",
        action="store_true",
        help="calibrate the prefix store's transform codec (principal components of every layer's keys before "
        "RoPE and values; one forward over the text) instead of a bit profile; the bit-profile options do not apply",
    )
    parser.add_argument(
        "--average-bits",
        type=float,
        default=None,
        help="budget: mean over layers of (key bits + value bits) / 2, between the narrowest and widest of "
        "--choices (default: 2.5)",
    )
    parser.add_argument(
        "--choices",
        type=int,
        nargs="+",
        default=None,
        metavar="BITS",
        help="widths a layer's keys or values may take, from 2 3 4 8 (default: 2 3 4; with --reuse, the widths "
        "the profile measured)",
    )
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="tokens per forward in the calibration passes (default: 64)"
    )
    parser.add_argument(
        "--metric",
        choices=["kl", "nll"],
        default=None,
        help="the sensitivity the widths are chosen by (default: kl): kl, the mean KL divergence of the next-token "
        "distribution from the full-precision one; nll, the mean NLL increase on the text (noisier: for one "
        "layer it is mostly a first-order, text-dependent term; see hf_kvcache.calibration.bit_profiles)",
    )
    parser.add_argument(
        "--cache-settings",
        default=None,
        metavar="KEY=VALUE,...",
        help="QuantizedCache settings to calibrate with (group_size, key_group_size, residual_length, sink_tokens, "
        "rotate, key_outliers; default: the cache's defaults); e.g. --cache-settings residual_length=64",
    )
    parser.add_argument(
        "--reuse",
        default=None,
        metavar="PROFILE",
        help="choose the widths again from the sensitivities measured in PROFILE (a JSON written by this command) "
        "for another --average-bits or a subset of its --choices, without any pass",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="where to write the result (default: profile.json; query-statistics.json with --query-statistics; "
        "transform-codec.safetensors with --transform-codec)",
    )
    parser.add_argument("--device", default=None, help="torch device for the model (default: cpu); e.g. --device cuda")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="model dtype (default: float32)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars (also transformers' own)")
    parser.set_defaults(run=run)


def writable_file(path: str) -> Path:
    """`path`, checked before any work: not a folder, and its folder (created if needed) writable."""
    output = Path(path)
    if output.is_dir():
        raise ValueError(f"--output {path}: is a folder; give a file name, e.g. {output / 'profile.json'}")
    check_writable(output.parent, f"--output {path}")
    return output


def parse_settings(text: str | None) -> dict[str, object]:
    """`KEY=VALUE,...` as QuantizedCache settings, typed as in a cache spec (`quantized:KEY=VALUE,...`)."""
    from hf_kvcache.calibration.bit_profiles import calibration_settings
    from hf_kvcache.registry import parse_cache_spec

    if not text:
        return {}
    try:  # names first, so that a wrong one is named against the calibration settings, not every cache parameter
        calibration_settings(**dict.fromkeys(item.split("=", 1)[0].strip() for item in text.split(",")))
    except ValueError as error:
        raise ValueError(f"--cache-settings {text}: {error}") from None
    return parse_cache_spec(f"quantized:{text}").params


BIT_PROFILE_OPTIONS = ("average_bits", "choices", "metric", "cache_settings", "reuse")


def run(args: argparse.Namespace) -> None:
    if args.query_statistics:
        run_query_statistics(args)
        return
    if args.transform_codec:
        run_transform_codec(args)
        return
    if args.average_bits is None:
        args.average_bits = 2.5
    if args.output is None:
        args.output = "profile.json"
    reused = None
    if args.reuse is not None:
        given = [name for name in DEFAULTS if getattr(args, name) is not None]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise ValueError(f"--reuse takes the measured sensitivities from {args.reuse}: {flags} cannot apply")
        reused = BitProfile.load(args.reuse)
    default_choices = reused.choices if reused is not None and reused.choices else (2, 3, 4)
    choices = check_choices(default_choices if args.choices is None else args.choices, name="--choices")
    check_budget(args.average_bits, choices, name="--average-bits")
    for name, value in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    check_int("--tokens", args.tokens, minimum=2)
    check_int("--chunk-size", args.chunk_size, minimum=1)
    settings = parse_settings(args.cache_settings)
    output = writable_file(args.output)
    if args.no_progress:
        transformers.utils.logging.disable_progress_bar()
    if reused is not None:
        profile = reused.with_budget(args.average_bits, choices)
    else:
        profile = calibrate(args, choices, settings)
    profile.save(output)
    print(format_table(profile.layer_rows()))
    print(f"\n{summary(profile)}")
    print(f"wrote {output}; use it with --cache quantized:profile={output}")


def summary(profile: BitProfile) -> str:
    """One line: average bits and budget, the additive estimate of the metric, and what it was calibrated on."""
    budget = f" (budget {profile.budget_bits:g})" if profile.budget_bits is not None else ""
    parts = [f"average bits {profile.average_bits:.4g}{budget}"]
    if profile.estimated_loss is not None:
        label = METRIC_LABEL[profile.metric]
        parts.append(f"estimated {label} {profile.estimated_loss:.4g} nats/token (sum over the chosen widths)")
    if profile.reference_nll is not None:
        parts.append(f"full-precision NLL {profile.reference_nll:.4g}")
    calibrated = f"calibrated on {profile.tokens:,} tokens of {profile.source or 'an unnamed text'}"
    parts.append(calibrated + (f" in {profile.seconds:.0f} s" if profile.seconds is not None else ""))
    return "; ".join(parts)


def calibrate(args: argparse.Namespace, choices: tuple[int, ...], settings: dict[str, object]) -> BitProfile:
    """Load the model and the text, then run `calibrate_bit_profile` with a progress bar over its passes."""
    from tqdm.auto import tqdm

    from hf_kvcache.calibration.bit_profiles import calibrate_bit_profile, calibration_passes
    from hf_kvcache.eval.data import load_text, tokenize_text
    from hf_kvcache.models import load_model, model_folder_or_name

    model, tokenizer = load_model(model_folder_or_name(args.model), dtype=args.dtype, device=args.device)
    text = load_text(args.dataset)
    input_ids = tokenize_text(text, tokenizer, args.tokens, option="--tokens")
    with tqdm(
        total=calibration_passes(model.config, choices), desc="calibrating", unit="pass", disable=args.no_progress
    ) as bar:
        return calibrate_bit_profile(
            model,
            input_ids,
            args.average_bits,
            choices,
            chunk=args.chunk_size,
            progress=bar.update,
            source=f"{text.dataset} ({text.source})",
            metric=args.metric,
            **settings,
        )


def load_for_one_pass(args: argparse.Namespace, flag: str, default_output: str) -> tuple:
    """For a calibration of one forward over the text (`flag`): refuse the bit-profile options, fill in the
    defaults, check the output, then load the model and the text. Returns (output, model, input_ids, source)."""
    from hf_kvcache.eval.data import load_text, tokenize_text
    from hf_kvcache.models import load_model, model_folder_or_name

    given = [name for name in BIT_PROFILE_OPTIONS if getattr(args, name) is not None]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ValueError(f"{flag} calibrates no bit profile: {flags} cannot apply")
    for name in ("dataset", "tokens", "chunk_size", "model"):
        if getattr(args, name) is None:
            setattr(args, name, DEFAULTS[name])
    check_int("--tokens", args.tokens, minimum=2)
    check_int("--chunk-size", args.chunk_size, minimum=1)
    output = writable_file(args.output or default_output)
    if args.no_progress:
        transformers.utils.logging.disable_progress_bar()
    model, tokenizer = load_model(model_folder_or_name(args.model), dtype=args.dtype, device=args.device)
    text = load_text(args.dataset)
    input_ids = tokenize_text(text, tokenizer, args.tokens, option="--tokens")
    return output, model, input_ids, f"{text.dataset} ({text.source})"


def run_query_statistics(args: argparse.Namespace) -> None:
    """`--query-statistics`: load the model and the text, calibrate, print a table per layer, write the file."""
    from tqdm.auto import tqdm

    from hf_kvcache.calibration.query_statistics import calibrate_query_statistics

    output, model, input_ids, source = load_for_one_pass(args, "--query-statistics", "query-statistics.json")
    with tqdm(total=input_ids.shape[1], desc="calibrating", unit="tok", disable=args.no_progress) as bar:
        statistics = calibrate_query_statistics(model, input_ids, args.chunk_size, bar.update, source=source)
    statistics.save(output)
    rows = [
        {
            "layer": layer,
            "query heads": center.shape[0],
            # |center| / |mean component norms|, in [0, 1]: 1 when every query sits on its head's center
            "concentration": float(
                (center.norm(dim=-1) / statistics.component_norms[layer].norm(dim=-1).clamp(min=1e-12)).mean()
            ),
        }
        for layer, center in sorted(statistics.centers.items())
    ]
    print(format_table(rows))
    print(
        f"\ncalibrated on {statistics.tokens:,} tokens of {statistics.source} in {statistics.seconds:.0f} s; wrote "
        f"{output}; use it with --cache triattention:budget=256,statistics={output}"
    )


def run_transform_codec(args: argparse.Namespace) -> None:
    """`--transform-codec`: load the model and the text, calibrate, print what each budget keeps, write the file."""
    from tqdm.auto import tqdm

    from hf_kvcache.calibration.transform_codec import calibrate_transform_codec
    from hf_kvcache.prefix.transform_codec import allocate_bits

    output, model, input_ids, source = load_for_one_pass(args, "--transform-codec", "transform-codec.safetensors")
    began = time.perf_counter()
    with tqdm(total=input_ids.shape[1], desc="calibrating", unit="tok", disable=args.no_progress) as bar:
        calibration = calibrate_transform_codec(model, input_ids, args.chunk_size, progress=bar.update, source=source)
    seconds = time.perf_counter() - began
    calibration.save(output)
    rows = []
    for layer, (keys, values) in enumerate(zip(calibration.keys, calibration.values)):
        row = {"layer": layer, "features": keys.variances.numel()}
        for kind, decorrelation in (("keys", keys), ("values", values)):
            for bits in (1, 2):  # the share of the variance the components given bits carry
                kept = allocate_bits(decorrelation.variances, bits) > 0
                share = decorrelation.variances[kept].sum() / decorrelation.variances.sum().clamp(min=1e-30)
                row[f"{kind} variance kept @{bits} bits"] = f"{float(share):.3f}"
        rows.append(row)
    print(format_table(rows))
    print(
        f"\ncalibrated on {calibration.tokens:,} tokens of {source} in {seconds:.0f} s; wrote {output}; use it with "
        f"PrefixCache(backend, codec=TransformCodec(CodecCalibration.load({str(output)!r}), model, average_bits=2))"
    )
