"""`hf-kvcache prefix`: what a prefix store holds (blocks, bytes, formats, configurations), and clearing it."""

import argparse
import json
import re
from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

from hf_kvcache.prefix.backend import Backend
from hf_kvcache.prefix.codec import CorruptBlock, block_metadata
from hf_kvcache.report import format_table

DESCRIPTION = """\
Inspect or clear a prefix store: the blocks of prompt KV that PrefixCache keeps for reuse. Prints how
many blocks and bytes it holds, per configuration (model + cache + block format fingerprint), format
and block size, and blocks it cannot read; for Redis also the server's memory, eviction policy and
hit/miss counters. Hit rates and fetch latencies of a running program (per tier for a TieredBackend)
come from PrefixCache.stats() in that program, or from a Prometheus endpoint it serves
(hf_kvcache.prefix.metrics.register_metrics).

examples:
  hf-kvcache prefix stats --disk ~/.cache/prompt-kv
  hf-kvcache prefix stats --redis redis://127.0.0.1:6379/0 --json store.json
  hf-kvcache prefix stats --disk ~/.cache/prompt-kv --prometheus /var/lib/node_exporter/prompt_kv.prom
  hf-kvcache prefix stats --redis redis://10.0.0.5:7000/0 --cluster
  hf-kvcache prefix clear --disk ~/.cache/prompt-kv --yes
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prefix",
        help="show what a prefix store (disk folder or Redis) holds, or clear it",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "action", choices=["stats", "clear"], help="stats: print the store's contents; clear: delete them"
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--disk", metavar="FOLDER", help="a DiskBackend folder; e.g. --disk ~/.cache/prompt-kv")
    where.add_argument("--redis", metavar="URL", help="a Redis server (or any cluster node with --cluster)")
    parser.add_argument("--cluster", action="store_true", help="--redis names a node of a Redis Cluster")
    parser.add_argument(
        "--namespace",
        default="hf_kvcache:prefix:",
        help="the RedisBackend prefix of the store's keys (default: hf_kvcache:prefix:)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the statistics as JSON to FILE (- for stdout)")
    parser.add_argument(
        "--prometheus",
        metavar="FILE",
        help="also write blocks and bytes per configuration as Prometheus gauges to FILE (- for stdout), e.g. for "
        "node_exporter's textfile collector (needs prometheus-client: pip install 'hf_kvcache[metrics]')",
    )
    parser.add_argument("--yes", action="store_true", help="confirm `clear` (it deletes every block of the store)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(run=run)


def open_backend(args: argparse.Namespace) -> Backend:
    if args.disk is not None:
        from hf_kvcache.prefix.disk import DiskBackend

        folder = Path(args.disk).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"--disk {args.disk}: {'a file, not a' if folder.exists() else 'no such'} folder")
        return DiskBackend(folder, max_bytes=None)
    from hf_kvcache.prefix.redis_backend import RedisBackend

    return RedisBackend(args.redis, prefix=args.namespace, cluster=args.cluster)


UNREADABLE = "(unreadable)"
LISTED_UNREADABLE = 20  # unreadable entries named in the summary (all of them are counted)
_KEY = re.compile(r"^[0-9a-f]{16,128}$")  # the store's keys: lowercase hex digests
_FIELD_LENGTH = 128  # a header field shown is a printable string up to this long; anything else is garbage


def _field(meta: dict, name: str) -> str:
    value = meta.get(name, "?")
    if not (isinstance(value, str) and 0 < len(value) <= _FIELD_LENGTH and value.isprintable()):
        raise CorruptBlock(f"header field {name} is not a short printable string")
    return value


def printable(text: str) -> str:
    """`text` with every character that is not printable ASCII escaped (`\\xff`, `\\x1b`): keys and reasons come
    from the store and must not reach a terminal as control sequences."""
    return "".join(c if c.isascii() and c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def block_group(key: str, head: bytes) -> tuple[str, str, int | None, str]:
    """(configuration fingerprint, format, tokens per block, layout) of an entry, from its key and the start of
    its bytes. Raises `CorruptBlock` for anything that is not a readable block of a store (a key that is not a
    hex digest, a header that is not a JSON object of short plain strings), never another exception."""
    if not _KEY.match(key):
        raise CorruptBlock("the key is not a lowercase hex digest")
    try:
        meta = block_metadata(head)
    except RecursionError:  # a deeply nested JSON header
        raise CorruptBlock("a header nested too deeply") from None
    tokens = meta.get("tokens", "")
    if isinstance(tokens, str) and tokens.isdecimal() and len(tokens) <= 9:
        tokens = int(tokens)
    elif tokens == "":
        tokens = None
    else:
        raise CorruptBlock("header field tokens is not a number of tokens")
    return _field(meta, "fingerprint")[:16], _field(meta, "format"), tokens, _field(meta, "layout")


def summarize(backend: Backend, progress: bool = True) -> dict:
    """Blocks and bytes per (configuration fingerprint, format, tokens per block, layout), from block headers.
    Entries that are not readable blocks (a garbage header, a key that is not the store's, a planted file) are
    one `(unreadable)` group, and the first `LISTED_UNREADABLE` of them are named with the reason."""
    blocks: Counter = Counter()
    sizes: Counter = Counter()
    unreadable: list[dict] = []
    listing = backend.inventory()
    # disable=None: no bar when stderr is not a terminal (scripts, CI, errors after an empty listing)
    for key, size, head in tqdm(
        listing, desc="reading block headers", unit=" blocks", disable=None if progress else True
    ):
        try:
            group = block_group(key, head)
        except CorruptBlock as error:
            group = (UNREADABLE, "", None, "")
            if len(unreadable) < LISTED_UNREADABLE:
                unreadable.append({"key": printable(key), "bytes": size, "reason": printable(str(error))})
        blocks[group] += 1
        sizes[group] += size
    groups = []
    for group in sorted(blocks, key=lambda group: -sizes[group]):
        fingerprint, block_format, tokens, layout = group
        groups.append(
            {
                "configuration": fingerprint,
                "format": block_format,
                "tokens_per_block": tokens,
                "layout": layout,
                "blocks": blocks[group],
                "bytes": sizes[group],
            }
        )
    return {
        "store": repr(backend),
        "blocks": sum(blocks.values()),
        "bytes": sum(sizes.values()),
        "groups": groups,
        "unreadable": unreadable,
        "server": backend.server_info(),
    }


def table(summary: dict) -> str:
    rows = [
        {
            "blocks": group["blocks"],
            "bytes": group["bytes"],
            "bytes/block": group["bytes"] // group["blocks"],
            "format": group["format"],
            "tokens/block": "" if group["tokens_per_block"] is None else group["tokens_per_block"],
            "configuration": group["configuration"],
            "layout": group["layout"],
        }
        for group in summary["groups"]
    ]
    lines = [f"store: {summary['store']}", format_table(rows) if rows else "(empty)"]
    lines.append(f"total: {summary['blocks']} blocks, {summary['bytes']:,} bytes")
    unreadable = summary.get("unreadable", [])
    lines += [f"unreadable: {entry['key']} ({entry['bytes']:,} bytes): {entry['reason']}" for entry in unreadable]
    lines += [f"server {name}: {value}" for name, value in summary["server"].items()]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    if args.cluster and args.redis is None:
        raise ValueError("--cluster needs --redis URL (a node of the cluster)")
    backend = open_backend(args)
    summary = summarize(backend, progress=not args.no_progress)
    if args.action == "clear":
        if not summary["blocks"]:
            print(f"nothing to delete: {summary['store']} holds no blocks")
            return
        if not args.yes:
            raise ValueError(
                f"clear deletes all {summary['blocks']} blocks ({summary['bytes']:,} bytes) of {summary['store']}; "
                "add --yes to confirm"
            )
        deleted = backend.clear()
        print(f"deleted {deleted} blocks ({summary['bytes']:,} bytes) from {summary['store']}")
        return
    outputs = {}
    if args.json:
        outputs[args.json] = json.dumps(summary, indent=2) + "\n"
    if args.prometheus:
        from hf_kvcache.prefix.metrics import contents_text

        outputs[args.prometheus] = contents_text(summary)
    if "-" in outputs:
        print(outputs.pop("-"), end="")
    else:
        print(table(summary))
    for path, text in outputs.items():
        Path(path).write_text(text, encoding="utf-8")
        print(f"wrote {path}")
