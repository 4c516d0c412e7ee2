"""The ``weightshare`` command: a thin layer over the library.

Each subcommand parses and validates its arguments, calls one library
function, and turns a ValueError into one line on stderr and exit code 2.
Global options (``--quiet``, ``--verbose``) work before or after the subcommand.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from importlib.metadata import version


def _check_compress_flags(args) -> None:
    """Every flag that can be checked alone, in the flag's own words, before anything is loaded."""
    from weightshare.compress.budget import parse_size

    if not 1 <= args.bits <= 8:
        raise ValueError(f"--bits {args.bits}: expected 1..8 (index bits per weight; tables have 2**bits entries)")
    if args.granularity == "per_group" and args.group_size is None:
        raise ValueError("--granularity per_group needs --group-size G (input weights that share one table)")
    if args.group_size is not None and args.granularity != "per_group":
        raise ValueError(f"--group-size {args.group_size} goes with --granularity per_group "
                         f"(got --granularity {args.granularity})")
    if args.group_size is not None and args.group_size < 1:
        raise ValueError(f"--group-size {args.group_size}: expected a positive number of weights")
    if args.finetune_steps < 0:
        raise ValueError(f"--finetune-steps {args.finetune_steps}: expected 0 or more (0 skips fine-tuning)")
    if args.data_free and args.calibration:
        raise ValueError("--data-free and --calibration: expected one of them (or neither: the built-in corpus)")
    if args.target_size is not None and args.avg_bits is not None:
        raise ValueError("--target-size and --avg-bits: expected one of them")
    if args.target_size is not None:
        parse_size(args.target_size, "--target-size")
    if args.avg_bits is not None and not 0 < args.avg_bits <= 32:
        raise ValueError(f"--avg-bits {args.avg_bits}: expected a number of bits per weight above 0")
    if (args.text_field or args.label_field) and not args.eval:
        raise ValueError("--text-field / --label-field name fields of the --eval file: give --eval FILE")
    if args.nproc < 1:
        raise ValueError(f"--nproc {args.nproc}: expected 1 or more processes")
    if args.timeout <= 0:
        raise ValueError(f"--timeout {args.timeout}: expected seconds above 0")
    if args.nproc > 1 and (args.calibration or args.target_size is not None or args.avg_bits is not None or args.eval):
        raise ValueError("--nproc shares data-free work only (no --calibration, --target-size, --avg-bits or --eval):"
                         " add --data-free, or use one process")
    if args.epochs < 1:
        raise ValueError(f"--epochs {args.epochs}: expected 1 or more passes over the calibration texts")
    if args.train and args.data_free:
        raise ValueError(f"--train {args.train} learns from calibration texts: drop --data-free (or --train)")
    if args.train and args.nproc > 1:
        raise ValueError(f"--train {args.train} runs in one process: drop --nproc")
    if not 0 <= args.outliers < 1:
        raise ValueError(f"--outliers {args.outliers}: expected a fraction of the weights, 0 <= f < 1 (0.005: 0.5 %)")


# library messages that name a Python field where the command line has a flag
_FLAG_WORDS = (("CodebookConfig.bits", "--bits"), ("CodebookConfig.group_size", "--group-size"),
               ("group_size=", "--group-size "), ("max_shard_size", "--max-shard-size"),
               ("give this tensor another granularity", "give this tensor its own in a --recipe layers: entry"))


_IMPORT_CHATTER = ("torchao", "torch.utils._pytree")


def _compress(args) -> None:
    from weightshare.compress import compress, distributed
    from weightshare.compress.cluster import BUILTIN
    from weightshare.sharing.codebook import CodebookConfig

    _check_compress_flags(args)
    _shard_size(args.max_shard_size)
    if args.nproc > 1 and not distributed.in_torchrun():
        argv = _without_nproc(args.argv)
        code = distributed.launch(argv, args.nproc)
        if code:
            print(f"weightshare compress: error: a process of the {args.nproc} failed (exit {code}); its message is "
                  "above, nothing was written", file=sys.stderr)
            raise SystemExit(code)
        return
    texts = labels = None
    if args.eval:  # read before the model loads: a bad file costs nothing
        from weightshare.evaluate import read_data

        texts, labels = read_data(args.eval, args.text_field, args.label_field, flag="--eval")
    config = CodebookConfig(bits=args.bits, granularity=args.granularity, group_size=args.group_size,
                            train=args.train)
    calibration = None if args.data_free else args.calibration or BUILTIN
    ranks = distributed.in_torchrun()
    try:
        model, rep, seconds = compress(args.src, args.out, config, calibration=calibration, method=args.method,
                                       finetune_steps=args.finetune_steps, target_size=args.target_size,
                                       avg_bits=args.avg_bits, outliers=args.outliers, recipe=args.recipe,
                                       finetune_norms=args.finetune_norms,
                                       evaluate_on=None if texts is None else (texts, labels),
                                       distributed=ranks, timeout=args.timeout,
                                       max_shard_size=_shard_size(args.max_shard_size), epochs=args.epochs)
    except distributed.RankError as exc:
        raise ValueError(str(exc)) from None
    except ValueError as exc:
        if not args.eval:
            raise
        raise ValueError(str(exc).replace("--data", "--eval")) from None  # the measurement's data file is --eval here
    if rep is None:  # a process of a distributed run other than rank 0: rank 0 reports
        return
    plan = getattr(model, "_weightshare_bit_plan", None)
    if plan is not None:
        from collections import Counter

        widths = Counter(plan.bits.values())
        print("bits per tensor: " + ", ".join(f"{n} x {b}-bit" for b, n in sorted(widths.items()))
              + " (--verbose lists them)")
    print(rep if getattr(args, "verbose", False) else _summary(rep))
    trained = getattr(model, "_weightshare_training", None)
    if trained is not None:
        print(f"trained with sharing ({args.train}): {trained['steps']} steps over {trained['epochs']} epochs, "
              f"held-out distillation loss {trained['holdout_loss_before']:.4f} -> {trained['holdout_loss_after']:.4f}"
              " (frozen)")
    print(f"clustered in {seconds:.2f} s; packed model written to {args.out}")
    evaluation = getattr(model, "_weightshare_evaluation", None)
    if evaluation is not None:
        print(evaluation)


def _shard_size(value: str) -> int | str:
    """--max-shard-size in bytes (500MB, 1.5GiB, 2000000), checked before any work: huggingface_hub's splitter
    takes the integer, whatever unit the user wrote."""
    from weightshare.compress.budget import parse_size

    return parse_size(int(value) if isinstance(value, str) and value.strip().isdigit() else value, "--max-shard-size")


def _without_nproc(argv: list[str]) -> list[str]:
    """The compress command line a process of ``--nproc`` runs: without the subcommand and --nproc."""
    out, skip, command = [], False, False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif a.startswith("--nproc="):
            continue
        elif a == "compress" and not command:
            command = True
        else:
            out.append(a)
    return out


def _check_eval_flags(args) -> None:
    if args.k < 1:
        raise ValueError(f"--k {args.k}: expected 1 or more nearest neighbours")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: expected 1 or more texts")


def _eval(args) -> None:
    from weightshare.evaluate import evaluate, open_model, read_data

    _check_eval_flags(args)
    texts, labels = read_data(args.data, args.text_field, args.label_field)  # before any model loads
    result = evaluate(open_model(args.dir, "PACKED"), open_model(args.reference, "--reference"), texts, labels,
                      k=args.k, batch_size=args.batch_size)
    print(json.dumps(result.to_dict()) if args.json else result)


def _summary(rep) -> str:
    return str(type(rep)(**{**rep.to_dict(layers=False), "layers": []}))


def _inspect(args) -> None:
    import weightshare as ws
    from weightshare import kernels
    from weightshare.pack import PackedFile
    from weightshare.report import report_file

    with PackedFile(args.dir) as pf:  # a model is built where its config is there to build it from
        sub = pf.source["weights_subdir"]
        buildable = pf.source["kind"] != "module" and (pf.root / sub / "config.json").is_file()
    rep = ws.report(ws.load(args.dir)) if buildable else report_file(args.dir)
    if args.json:
        print(json.dumps({**rep.to_dict(layers=True), "kernel": kernels.isa(), "kernel_detail": kernels.describe(),
                          "from_file_only": not buildable}))
    else:
        print(rep)
        if not buildable:
            print("(read from the packed file alone: no config.json to build the model from; buffers count as "
                  "dense tensors, bytes in memory unknown)")
        print(f"kernel on this machine: {kernels.describe()}")


def _export(args) -> None:
    import weightshare as ws

    ws.export(args.dir, args.out, max_shard_size=_shard_size(args.max_shard_size))
    print(f"dense model written to {args.out}")


def _merge(args) -> None:
    from weightshare.merge import merge
    from weightshare.merge.config import merge_from_config, read_config

    kwargs = read_config(args.config)  # the whole config is checked before anything is opened
    if not args.dry_run and not args.out:
        raise ValueError("merge: --out\n  expected: a new or empty directory for the merged model (or --dry-run)")
    if args.dry_run:
        print(json.dumps({k: v for k, v in kwargs.items() if v is not None}, indent=2, default=str))
        if "slices" not in kwargs:  # a frankenmerge's slices are checked when it runs
            _print_plan(merge(**kwargs, plan=True, strict=args.strict))
        return
    merge_from_config(args.config, args.out, strict=args.strict)
    what = f"{len(kwargs['slices'])} slices" if "slices" in kwargs else f"{len(kwargs['models'])} models"
    print(f"merged model ({kwargs['method']}, {what}) written to {args.out}")


def _print_plan(plan: dict) -> None:
    """The parameters that vary by tensor (gradients, filters), one line per tensor; or that none do."""
    first = next(iter(plan.values()), {})
    varying = [k for k in first if any(p[k] != first[k] for p in plan.values())]
    if not varying:
        print(f"every one of the {len(plan)} float tensors merges with the same parameters")
        return
    def fmt(v) -> str:
        if isinstance(v, list):
            return "[" + ", ".join(map(fmt, v)) + "]"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    width = max(map(len, plan))
    print(f"{'tensor':<{width}}  " + "  ".join(varying))
    for name, p in plan.items():
        print(f"{name:<{width}}  " + "  ".join(fmt(p[k]) for k in varying))


def _cotrain(args) -> None:
    from weightshare.merge.cotrain import launch

    code = launch(args.config, nproc=args.nproc, quiet=getattr(args, "quiet", False))
    if code:
        raise SystemExit(code)


def _bench(args) -> None:
    from weightshare.bench import run

    run(args.name, quick=args.quick, as_json=args.json, plot=args.plot, size=args.size)


def _global_options(default) -> argparse.ArgumentParser:
    """``--quiet`` and ``--verbose``, for the main parser and (default SUPPRESS) every subparser.

    With SUPPRESS a subparser sets an option only when it is given after the
    subcommand, so it does not overwrite one given before it.
    """
    g = argparse.ArgumentParser(add_help=False)
    g.add_argument("--quiet", action="store_true", default=default, help="no progress bars or log messages")
    g.add_argument("--verbose", action="store_true", default=default,
                   help="info log messages; compress prints the per-tensor table")
    return g


def _data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-field", default=None, metavar="NAME",
                   help="csv/jsonl: the field holding the text (default: text, sentence, sentence1, content or prompt)")
    p.add_argument("--label-field", default=None, metavar="NAME",
                   help="csv/jsonl: the field holding the label (default: label, labels, class or target, if present)")


def _one_line(message: str) -> str:
    """A library message ("what\n  expected: ...\n  got: ...") as one line; a list of problems keeps one line each."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if len(lines) <= 1 or any(line.startswith("- ") for line in lines):
        return message
    return lines[0].rstrip(":") + ": " + "; ".join(lines[1:])


def _add_compress(sub, common: list) -> None:
    """`weightshare compress`: its flags are most of the CLI."""
    c = sub.add_parser("compress", parents=common,
                       help="cluster a model's weights into codebooks and write a packed directory")
    c.add_argument("src", help="local transformers or sentence-transformers model directory")
    c.add_argument("--bits", type=int, default=4,
                   help="index bits per weight, 1..8 (tables of 2**bits; default 4); a size budget overrides it")
    c.add_argument("--target-size", default=None, metavar="SIZE",
                   help="the packed file's size (8MB, 7.5MiB, bytes): each tensor gets the width that buys the most "
                        "fidelity per byte; the file lands below SIZE, within 1%%")
    c.add_argument("--avg-bits", type=float, default=None, metavar="B",
                   help="a size budget in bits per compressed weight, tables counted (as `inspect` reports it)")
    c.add_argument("--granularity", default="per_channel", choices=["per_tensor", "per_channel", "per_group"])
    c.add_argument("--group-size", type=int, default=None, help="per_group: input weights per table")
    c.add_argument("--calibration", default=None, metavar="TEXTFILE",
                   help="text file, one text per line, that the layers are fit to (default for text models: a "
                        "built-in deterministic corpus of 256 sentences of the Python documentation)")
    c.add_argument("--method", default="gptq", choices=["gptq", "wkmeans"],
                   help="with calibration: gptq fits tables and labels to each layer's inputs, block after block "
                        "(error-compensating, the default); wkmeans weights k-means by input feature importance")
    c.add_argument("--data-free", action="store_true", help="no calibration: plain k-means of the weights")
    c.add_argument("--finetune-steps", type=int, default=150, metavar="N",
                   help="with calibration: train the tables for about N steps to reproduce the original model's "
                        "outputs (labels frozen; stops early when held-out calibration texts stop improving); "
                        "0 skips it (default 150)")
    c.add_argument("--finetune-norms", action="store_true",
                   help="while fine-tuning the tables, train the LayerNorm weights and biases too (stored dense)")
    c.add_argument("--train", default=None, choices=["recluster", "dkm", "soft"],
                   help="training-time sharing: start from k-means, then train the whole model on the calibration "
                        "texts to reproduce the original (distillation) while its clusters move, and freeze it: "
                        "dkm (differentiable k-means), recluster (re-clustered as the weights move) or soft (a "
                        "learned Gaussian-mixture prior); then --finetune-steps fine-tunes the frozen tables")
    c.add_argument("--epochs", type=int, default=10, metavar="N",
                   help="with --train: passes over the calibration texts (default 10; Adam 5e-4, batches of 16)")
    c.add_argument("--outliers", type=float, default=0.0, metavar="FRACTION",
                   help="with calibration (gptq): keep this fraction of each tensor's weights, the most sensitive, "
                        "exact in a sparse side tensor (0.005: +0.24 bits per weight; default 0)")
    c.add_argument("--recipe", default=None, metavar="YAML",
                   help="bits and granularity per layer (glob on module names), layers kept dense, and any of the "
                        "settings above; its keys replace the flags (see weightshare/compress/recipe.py)")
    c.add_argument("--out", required=True, help="output directory (new, empty, or a packed model to replace)")
    c.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="a packed file larger than SIZE is written as weightshare-0000K-of-0000N.safetensors shards "
                        "with weightshare.safetensors.index.json, as save_pretrained shards (default 5GB)")
    c.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="data-free work on N processes of this machine, one thread each (torchrun); across machines "
                        "run `torchrun --nnodes M --nproc_per_node N ... -m weightshare.compress SRC ...` on each. "
                        "The output is the same, byte for byte")
    c.add_argument("--timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="with several processes: how long one waits for another before the run stops with an error "
                        "naming it (default 1800)")
    c.add_argument("--eval", default=None, metavar="FILE",
                   help="at the end, measure the packed model against SRC on FILE, as `weightshare eval` does")
    _data_options(c)
    c.set_defaults(func=_compress)


def build_parser() -> argparse.ArgumentParser:
    from weightshare.bench import NAMES  # the package is already imported: weightshare.cli lives in it

    p = argparse.ArgumentParser(prog="weightshare", description="Weight sharing for neural networks.",
                                parents=[_global_options(False)])
    p.add_argument("--version", action="version", version=f"weightshare {version('weightshare')}")
    sub = p.add_subparsers(dest="command", required=True)
    common = [_global_options(argparse.SUPPRESS)]

    _add_compress(sub, common)

    v = sub.add_parser("eval", parents=common,
                       help="measure a compressed model against the model it came from, on your data")
    v.add_argument("dir", metavar="PACKED", help="the compressed model (a packed directory, or any model directory)")
    v.add_argument("--reference", required=True, metavar="SRC", help="the model it was made from")
    v.add_argument("--data", required=True, metavar="FILE",
                   help="one text per line; or .csv / .jsonl with a text field (and a label field for classifiers)")
    v.add_argument("--json", action="store_true", help="one JSON object")
    v.add_argument("--k", type=int, default=10, help="embedding models: nearest neighbours compared (default 10)")
    v.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    _data_options(v)
    v.set_defaults(func=_eval)

    i = sub.add_parser("inspect", parents=common, help="report of a packed model")
    i.add_argument("dir")
    i.add_argument("--json", action="store_true", help="one JSON object")
    i.set_defaults(func=_inspect)

    e = sub.add_parser("export", parents=common, help="write a packed model as a plain dense model directory")
    e.add_argument("dir")
    e.add_argument("--out", required=True, help="new or empty directory")
    e.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="split weights into model-0000N-of-0000M.safetensors shards of at most SIZE "
                        "(e.g. 500MB), with model.safetensors.index.json, as save_pretrained does (default 5GB)")
    e.set_defaults(func=_export)

    m = sub.add_parser("merge", parents=common, help="merge models as a mergekit-style YAML config says")
    m.add_argument("config", help="YAML: merge_method, base_model, models: [{model, parameters}], parameters, dtype")
    m.add_argument("--out", required=False, help="new or empty directory for the merged model")
    m.add_argument("--dry-run", action="store_true",
                   help="check the config and the models' headers; print the merge it asks for and the parameters "
                        "each tensor gets where they vary; read no tensor")
    m.add_argument("--strict", action="store_true",
                   help="a parameter's filter that matches no tensor name is an error (default: a warning)")
    m.set_defaults(func=_merge)

    t = sub.add_parser("cotrain", parents=common,
                       help="co-train one model per process from a YAML config (wraps torchrun)")
    t.add_argument("config", help="YAML: sync_every, outer, seeds, workers: [{model, width, shared, train}]")
    t.add_argument("--nproc", type=int, default=None, help="processes on this machine (default: one per worker)")
    t.set_defaults(func=_cotrain)

    b = sub.add_parser("bench", parents=common, formatter_class=argparse.RawTextHelpFormatter,  # names unbroken
                       help=f"run a benchmark ({', '.join(NAMES)}) side by side with its references")
    b.add_argument("name", metavar="NAME", help="one of:\n" + "\n".join(f"  {n}" for n in NAMES))
    b.add_argument("--quick", action="store_true", help="a run of under 45 s on 2 cores: fewer repetitions, "
                   "epochs or sentences (each benchmark says what it cut)")
    b.add_argument("--json", action="store_true", help="last line of output: one JSON object of the figures")
    b.add_argument("--plot", default=None, metavar="PNG",
                   help="minilm: write the size-vs-fidelity (Pareto) chart, one line per method (needs matplotlib)")
    b.add_argument("--size", default=None, metavar="NAME",
                   help="scale: the model size, 1b (default) or 7b")
    b.set_defaults(func=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # compress --nproc hands it to its processes
    quiet, verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
    if quiet and verbose:
        parser.error("expected at most one of --quiet and --verbose, got both")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.command == "bench":
        # a shared machine: OpenMP threads that spin-wait between parallel regions distort timings;
        # OpenMP reads this when torch loads, which is below (weightshare imports torch lazily)
        if "OMP_WAIT_POLICY" not in os.environ and "torch" not in sys.modules:
            os.environ["_WEIGHTSHARE_OMP_BEFORE_TORCH"] = "1"  # bench.run says so: set in time for this process
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=logging.ERROR if quiet else logging.WARNING, format="%(levelname)s: %(message)s")
    if verbose:  # our own info messages, not every library's
        logging.getLogger("weightshare").setLevel(logging.INFO)
    else:  # what other libraries say about themselves on import (torchao's missing CUDA kernels, torch's
        # deprecations seen while torchao loads, through transformers' quantizers) is nothing a user can act on
        for name in _IMPORT_CHATTER:
            logging.getLogger(name).setLevel(logging.ERROR)
    import weightshare as ws

    ws.set_progress(not quiet)
    if quiet:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    try:
        args.func(args)
    except ValueError as exc:  # bad input: one clear message, no traceback, in the command line's words
        message = str(exc).removeprefix(f"{args.command}: ")  # said once, by the prefix below
        for python, flag in _FLAG_WORDS:
            message = message.replace(python, flag)
        print(f"weightshare {args.command}: error: {_one_line(message)}", file=sys.stderr)
        return 2
    except OSError as exc:  # the machine said no (permissions, disk full): say what and where
        print(f"weightshare {args.command}: error: {exc.strerror or exc}: {exc.filename or ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
