"""``python -m shards build|verify``: the command line over ``shards.build`` and ``shards.verify``.

Exit codes: 0 fine, 1 ``verify`` found problems, 2 bad arguments or input (a message
naming the path, no traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .build import SAMPLES_PER_SHARD, SourceError, build_shards, format_report
from .verify import load_indexes, verify_index


def _positive_int(text: str) -> int:
    """Accepts ``1e9`` too, since byte limits are easier to read that way."""
    try:
        value = int(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shards", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="pack a folder of images into WebDataset tar shards")
    build.add_argument("src", help="folder of class sub-folders (labelled) or of images (unlabelled)")
    build.add_argument("out", help="folder to write the shards and <prefix>-index.json into")
    build.add_argument("--prefix", default="train", help="shard set name: <prefix>-NNNNNN.tar (default: train)")
    build.add_argument("--samples-per-shard", type=_positive_int, default=None, metavar="N",
                       help=f"close a shard after N samples (default: {SAMPLES_PER_SHARD}, fewer for a small folder so that "
                            "the default pretraining's loader workers each get a shard)")  # fmt: skip
    build.add_argument("--bytes-per-shard", type=_positive_int, default=1_000_000_000, metavar="BYTES",
                       help="keep a shard file within BYTES (default: 1e9)")
    build.add_argument(
        "--shuffle", action=argparse.BooleanOptionalAction, default=True,
        help="shuffle the file list before sharding so classes mix across shards",
    )
    build.add_argument("--seed", type=int, default=0, help="shuffle seed (default: 0)")
    layout = build.add_mutually_exclusive_group()
    layout.add_argument("--labelled", dest="labelled", action="store_const", const=True,
                        help="treat SRC's sub-folders as classes (default: detect)")
    layout.add_argument("--unlabelled", dest="labelled", action="store_const", const=False,
                        help="ignore folder names: no .cls members")
    build.add_argument("--max-per-class", type=_positive_int, default=None, metavar="N",
                       help="keep the first N decodable images per class after the shuffle")
    build.add_argument("--source", default=None, help="where the images came from, stored in the index")
    build.add_argument("--workers", type=_positive_int, default=_cores(), metavar="N",
                       help=f"processes reading and checking images (default: this machine's cores, {_cores()}); "
                            "the shards are the same for any N")  # fmt: skip
    build.add_argument("--max-side", type=_positive_int, default=None, metavar="S",
                       help="store images whose longer side exceeds S resized to S (JPEG quality 95); "
                            "others untouched (default: all untouched)")  # fmt: skip
    build.add_argument("--resume", action="store_true",
                       help="continue an interrupted build of the same settings: finished shards are kept")

    verify = commands.add_parser("verify", help="check shards against their index")
    verify.add_argument("out", help="folder holding shards and *-index.json")
    verify.add_argument("--prefix", default=None, help="only this shard set (default: every index in OUT)")
    return parser


def _build(args: argparse.Namespace) -> int:
    index = build_shards(
        args.src, args.out,
        prefix=args.prefix,
        samples_per_shard=args.samples_per_shard,
        bytes_per_shard=args.bytes_per_shard,
        shuffle=args.shuffle,
        seed=args.seed,
        labelled=args.labelled,
        max_per_class=args.max_per_class,
        source=args.source,
        workers=args.workers,
        max_side=args.max_side,
        resume=args.resume,
    )
    print(format_report(index, args.out))
    return 0


def _verify(args: argparse.Namespace) -> int:
    indexes, problems = load_indexes(args.out, args.prefix)
    for index in indexes:
        found = verify_index(Path(args.out), index)
        print(f"{index.prefix}: {len(index.shards)} shard(s), {index.total} samples, {len(found)} problem(s)")
        problems += found
    for problem in problems:
        print(problem)
    if problems:
        print(f"verify: {len(problems)} problem(s) in {args.out}", file=sys.stderr)
        return 1
    print(f"verify: {args.out} OK")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _build(args) if args.command == "build" else _verify(args)
    except SourceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: completed shards are kept, the partial one was removed; --resume continues",
              file=sys.stderr)  # fmt: skip
        return 130


if __name__ == "__main__":
    sys.exit(main())
