"""The ``weightshare`` command: a thin layer over the library.

Each subcommand parses and validates its arguments, calls one library
function, and turns a ValueError into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def _compress(args) -> None:
    from weightshare.compress import compress
    from weightshare.sharing.codebook import CodebookConfig

    config = CodebookConfig(bits=args.bits, granularity=args.granularity, group_size=args.group_size)
    _, rep, seconds = compress(args.src, args.out, config, calibration=args.calibration)
    print(rep if args.verbose else _summary(rep))
    print(f"clustered in {seconds:.2f} s; packed model written to {args.out}")


def _summary(rep) -> str:
    return str(type(rep)(**{**rep.to_dict(layers=False), "layers": []}))


def _inspect(args) -> None:
    import weightshare as ws

    model = ws.load(args.dir)
    rep = ws.report(model)
    if args.json:
        print(json.dumps(rep.to_dict(layers=True)))
    else:
        print(rep)


def _export(args) -> None:
    import weightshare as ws

    ws.export(args.dir, args.out)
    print(f"dense model written to {args.out}")


def _bench(args) -> None:
    from benchmarks import run

    run(args.name, quick=args.quick, as_json=args.json)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="weightshare", description="Weight sharing for neural networks.")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log messages")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="cluster a model's weights into codebooks and write a packed directory")
    c.add_argument("src", help="local transformers or sentence-transformers model directory")
    c.add_argument("--bits", type=int, required=True, help="index bits per weight, 1..8 (tables of 2**bits)")
    c.add_argument("--granularity", default="per_channel", choices=["per_tensor", "per_channel", "per_group"])
    c.add_argument("--group-size", type=int, default=None, help="per_group: input weights per table")
    c.add_argument("--calibration", default=None, metavar="TEXTFILE",
                   help="text file, one text per line: cluster with the importance of each input feature")
    c.add_argument("--out", required=True, help="output directory (new, empty, or a packed model to replace)")
    c.add_argument("--verbose", action="store_true", help="print the per-tensor table")
    c.set_defaults(func=_compress)

    i = sub.add_parser("inspect", help="report of a packed model")
    i.add_argument("dir")
    i.add_argument("--json", action="store_true", help="one JSON object")
    i.set_defaults(func=_inspect)

    e = sub.add_parser("export", help="write a packed model as a plain dense model directory")
    e.add_argument("dir")
    e.add_argument("--out", required=True)
    e.set_defaults(func=_export)

    b = sub.add_parser("bench", help="run a benchmark from benchmarks/ side by side with its references")
    b.add_argument("name", help="kmeans | minilm")
    b.add_argument("--quick", action="store_true", help="a run of under a minute")
    b.add_argument("--json", action="store_true", help="last line of output: one JSON object of the figures")
    b.set_defaults(func=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.WARNING, format="%(levelname)s: %(message)s")
    import weightshare as ws

    ws.set_progress(not args.quiet)
    if args.quiet:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    try:
        args.func(args)
    except ValueError as exc:  # bad input: one clear message, no traceback
        print(f"weightshare {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
