"""Data-free post-training clustering: every Linear and Embedding weight gets codebooks.

LayerNorm weights, biases and buffers stay as they are: they are a tiny part of
the model and quantising them costs accuracy for almost no bytes.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path

from torch import nn

from weightshare import hub, pack
from weightshare.compress.budget import parse_size, plan_model
from weightshare.compress.calibrate import importance_from_texts, read_texts, sequential_codebooks_, text_batches
from weightshare.compress.finetune import DistillConfig, FinetuneConfig, distill_, finetune_tables_
from weightshare.compress.recipe import apply_settings, read_recipe, resolve
from weightshare.corpus import calibration_sentences
from weightshare.hub import is_transposed_linear
from weightshare.report import Report, report
from weightshare.sharing.codebook import TABLE_DTYPES, CodebookConfig, codebook_model_
from weightshare.space import share_

__all__ = ["compress", "compress_model_", "is_compressible"]

log = logging.getLogger(__name__)


def is_compressible(module: nn.Module, name: str) -> bool:
    """The modules post-training compression clusters: Linear (and transformers' Conv1D), Embedding, Conv2d."""
    return isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d)) or is_transposed_linear(module)


METHODS = ("gptq", "wkmeans")


def compress_model_(model: nn.Module, config: CodebookConfig, calibration: list | None = None,
                    method: str = "gptq", finetune_steps: int = 0, target_bytes: int | None = None,
                    avg_bits: float | None = None, outliers: float = 0.0, configs: dict | None = None,
                    dense: set[str] | frozenset = frozenset(), finetune_norms: bool = False,
                    epochs: int = 10) -> nn.Module:
    """Cluster a loaded transformers model, SentenceTransformer or any ``nn.Module`` in place.

    ``calibration``: texts (a transformers model with its tokenizer) or, for any module,
    a list of its input batches (tensors, tuples of positional inputs, dicts of keyword
    inputs).  Without it the clustering is data-free.  With it,
    ``method="gptq"`` (the default) fits each layer's tables and labels to its inputs,
    block after block with the earlier blocks already compressed
    (``calibrate.sequential_codebooks_``); ``method="wkmeans"`` weights each weight's
    k-means by the second moment of its input feature (``calibrate.importance_from_texts``).
    ``finetune_steps`` > 0 then trains the tables by distillation against the model as it
    was (``finetune.finetune_tables_``: labels frozen, early stopping on held-out texts or batches;
    any module's output is matched by relative squared error), and with
    ``finetune_norms`` the LayerNorm weights and biases too.
    ``target_bytes`` (the packed file's size) or ``avg_bits`` (bits per compressed weight,
    tables counted) chooses each tensor's width instead of ``config.bits`` (``budget.py``);
    the plan is kept as ``model._weightshare_bit_plan``.
    ``outliers`` (gptq with calibration only): the fraction of each tensor's weights kept
    exact in a sparse side tensor (dense-and-sparse); the budget counts their bytes.
    ``config.train`` ("recluster", "dkm" or "soft"; ``--train``): training-time sharing instead of a
    one-shot fit.  The codebooks start from exact k-means of the weights, then the whole model trains for
    ``epochs`` on the calibration data by the same distillation as table fine-tuning, its sharing moving
    as it trains, and is frozen (``finetune.distill_``); ``finetune_steps`` then fine-tunes the frozen
    tables.  Its statistics are kept as ``model._weightshare_training``.
    ``configs`` maps module names to their own config (a recipe's ``layers``); modules in
    ``dense`` stay uncompressed.  Linear, Embedding and Conv2d weights are compressed
    (GPTQ treats a Conv2d as the Linear it is over its unfolded patches).
    """
    if method not in METHODS:
        raise ValueError(f"compression method\n  expected one of: {', '.join(METHODS)}\n  got: {method!r}")
    if isinstance(finetune_steps, bool) or not isinstance(finetune_steps, int) or finetune_steps < 0:
        raise ValueError(f"finetune_steps\n  expected: a non-negative integer\n  got: {finetune_steps!r}")
    if finetune_steps and not calibration:
        raise ValueError("table fine-tuning needs calibration data\n"
                         "  expected: calibration=... (texts, or the module's input batches) with finetune_steps")
    _check_fraction(outliers)
    if outliers and (not calibration or method != "gptq"):
        raise ValueError("--outliers needs calibration and the gptq method\n"
                         "  expected: --calibration FILE (or the built-in corpus) and --method gptq")
    inner = hub.inner_model(model)
    batches = None
    texts = calibration is not None and all(isinstance(t, str) for t in calibration)
    if calibration is not None and not texts:  # any nn.Module: its own input batches
        batches = list(calibration)
        if not batches:
            raise ValueError("calibration: no batches\n  expected: at least one input batch")
        if method != "gptq":
            raise ValueError("calibration batches (not texts) work with method='gptq'\n"
                             "  wkmeans takes texts for a transformers model")
    elif calibration:
        tokenizer = hub.tokenizer_of(model)
        limit = getattr(getattr(inner, "config", None), "max_position_embeddings", None)
        batches = text_batches(tokenizer, calibration, max_length=min(limit, 512) if isinstance(limit, int) else None)
    chosen = (lambda m, n: n not in dense and is_compressible(m, n)) if dense else is_compressible
    if config.train is not None:
        return _train_sharing(model, inner, config, batches, texts, chosen, epochs, finetune_steps, finetune_norms,
                              target_bytes is not None or avg_bits is not None or bool(configs) or bool(outliers))
    configs, bits = dict(configs or {}), config.bits
    if (target_bytes is not None or avg_bits is not None) and configs:
        raise ValueError("a size budget and per-layer bits\n  expected: one of them (the budget chooses every width)")
    if target_bytes is not None or avg_bits is not None:
        configs, plan = plan_model(inner, config, batches, target_bytes=target_bytes, avg_bits=avg_bits,
                                   filter_fn=chosen, outliers=outliers)
        model._weightshare_bit_plan = plan
        numels = {n: inner.get_submodule(n).weight.numel() for n in plan.bits}
        bits = max(1, round(plan.average_bits(numels)))
    original = copy.deepcopy(inner) if finetune_steps else None  # the teacher: the model as it was
    if batches is None and not configs:
        share_(inner, config, filter_fn=chosen)
    elif batches is not None and method == "gptq":
        sequential_codebooks_(inner, config, batches, filter_fn=chosen, configs=configs, outliers=outliers)
        codebook_model_(inner, config, filter_fn=chosen, configs=configs)  # what GPTQ cannot take (Conv1d/3d)
    else:
        importance = (importance_from_texts(inner, tokenizer, calibration, filter_fn=chosen)
                      if batches is not None else None)
        codebook_model_(inner, config, filter_fn=chosen, importance=importance, configs=configs)
    if finetune_steps:
        finetune_tables_(inner, original, batches, bits, FinetuneConfig(steps=finetune_steps, norms=finetune_norms),
                         table_dtype=TABLE_DTYPES[config.table_dtype], texts=texts)
    return model


def _train_sharing(model, inner, config, batches, texts, chosen, epochs, finetune_steps, finetune_norms,
                   per_layer: bool) -> nn.Module:
    """compress_model_ with ``config.train``: share with training-time codebooks, train the whole model by
    distillation against itself as it was, freeze, then (``finetune_steps``) fine-tune the frozen tables."""
    if batches is None:
        raise ValueError(f"--train {config.train}: training-time sharing learns from calibration data\n"
                         "  expected: --calibration FILE (or the built-in corpus), not --data-free")
    if per_layer:
        raise ValueError(f"--train {config.train}: one width for every layer only\n"
                         "  expected: no --target-size, --avg-bits, --outliers or recipe layers with --train")
    original = copy.deepcopy(inner)  # the teacher: the model as it was
    share_(inner, config, filter_fn=chosen)
    model._weightshare_training = distill_(inner, original, batches, DistillConfig(epochs=epochs), texts=texts)
    if finetune_steps:
        finetune_tables_(inner, original, batches, config.bits,
                         FinetuneConfig(steps=finetune_steps, norms=finetune_norms),
                         table_dtype=TABLE_DTYPES[config.table_dtype], texts=texts)
    return model


def _check_fraction(outliers) -> None:
    if isinstance(outliers, bool) or not isinstance(outliers, (int, float)) or not 0 <= outliers < 0.5:
        raise ValueError("--outliers\n  expected: a fraction of the weights in [0, 0.5), e.g. 0.005\n"
                         f"  got: {outliers!r}")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model")


def _has_tokenizer(model: nn.Module) -> bool:
    """Whether ``model`` came with a tokenizer of its own (transformers builds an empty one from a bare
    config, which answers every text with unknown tokens or none)."""
    if getattr(model, "tokenizer", None) is not None:
        return True
    source = getattr(model, "_weightshare_source", None)
    return source is not None and _tokenizer_files(source)


def _tokenizer_files(source: hub.Source) -> bool:
    """Whether the model folder holds tokenizer files (where a sentence-transformers model keeps them too)."""
    folders = {Path(source.path), Path(source.path) / source.weights_subdir}
    return any((folder / f).is_file() for folder in folders for f in _TOKENIZER_FILES)


BUILTIN = "builtin"  # calibration="builtin": the deterministic built-in corpus (text models)
BUILTIN_SENTENCES = 256


def _given_texts(calibration) -> list[str] | None:
    """The calibration texts the caller gave (a file, a list), or None (data-free, or the built-in corpus,
    which needs the model's tokenizer to be known first)."""
    if calibration is None or (isinstance(calibration, str) and calibration == BUILTIN):
        return None
    if isinstance(calibration, (list, tuple)):
        texts = [str(t) for t in calibration if str(t).strip()]
        if not texts:
            raise ValueError("calibration: no texts\n  expected: at least one non-empty text")
        return texts
    return read_texts(calibration)


def _calibration_name(calibration, builtin: bool, texts) -> str | None:
    """What the recipe records as the calibration: texts handed over in Python have no name it could give."""
    if builtin:
        return "builtin"
    if texts is None:
        return "none"
    return None if isinstance(calibration, (list, tuple)) else str(calibration)


def compress(src: str | os.PathLike, out: str | os.PathLike, config: CodebookConfig,
             calibration: str | os.PathLike | list[str] | None = None,
             method: str = "gptq", finetune_steps: int = 0, target_size: int | str | None = None,
             avg_bits: float | None = None, outliers: float = 0.0,
             recipe: str | os.PathLike | None = None, finetune_norms: bool = False,
             evaluate_on: tuple[list[str], list | None] | None = None,
             stream: bool | None = None, distributed: bool = False, timeout: float | None = None,
             max_shard_size: int | str = pack.DEFAULT_MAX_SHARD_SIZE,
             epochs: int = 10) -> tuple[nn.Module | None, Report | None, float]:
    """Load ``src``, cluster its weights with ``config``, write the packed directory ``out``.

    ``calibration``: None (data-free), a text file (one text per line), a list of
    texts, or ``"builtin"``: the built-in deterministic corpus (256 sentences of the
    Python standard library's documentation) for a model with a tokenizer, data-free
    otherwise.  ``method``, ``finetune_steps``, ``epochs`` (with ``config.train``): see
    ``compress_model_`` (table fine-tuning is skipped, with a note, where there is no calibration).
    ``target_size`` (``8MB``, bytes) or ``avg_bits``: mixed widths under that budget; ``outliers``: see
    ``compress_model_``; ``recipe``: a YAML file (``recipe.py``) whose keys replace these arguments and which
    sets bits and granularity per layer and keeps layers dense; the written
    ``weightshare.safetensors`` is never larger than ``target_size``.  ``evaluate_on``: ``(texts, labels or
    None)`` to measure the compressed model against ``src`` (``weightshare.evaluate``) before it is written; the
    result goes into the model card and onto the model as ``_weightshare_evaluation``.  Returns ``(model, report,
    seconds spent clustering, calibration included)``.  Everything that can be
    checked (config, method, source directory, output path, calibration file) is
    checked before the model is loaded.

    Data-free compression (no calibration texts, no size budget; a recipe's layers allowed) streams by
    default (``stream=None``): the checkpoint is read, clustered and written one tensor at a time and the
    model never exists whole in memory (``stream.py``; the packed file is the same, byte for byte).
    Calibrated GPTQ compression (no table fine-tuning, no size budget) streams one transformer block at a
    time (``blockwise.py``: the blocks' outputs on the calibration texts carry one block to the next), and
    the returned model is None (``ws.load(out)`` loads what was written).  ``stream=False`` loads the model
    whole; ``stream=True`` refuses work that cannot stream.  ``distributed``: this process is one of several
    torchrun started (``distributed.py``; streamed work only): they share the clustering, rank 0 writes ``out``
    and returns the report, the others return ``(None, None, seconds)``; ``timeout``: seconds a process waits for
    another before it stops with an error naming it.  A packed file larger than ``max_shard_size`` is written
    in shards with an index (``pack.save``).
    """
    plan = None
    if recipe is not None:  # checked whole before anything else
        plan = read_recipe(recipe)
        config = plan.base_config(config)
        given = apply_settings(plan, calibration=calibration, method=method, finetune_steps=finetune_steps,
                               target_size=target_size, avg_bits=avg_bits, outliers=outliers,
                               finetune_norms=finetune_norms, epochs=epochs)
        calibration, method, finetune_steps = given["calibration"], given["method"], given["finetune_steps"]
        epochs = given["epochs"]
        finetune_norms = given["finetune_norms"]
        target_size, avg_bits, outliers = given["target_size"], given["avg_bits"], given["outliers"]
    if method not in METHODS:
        raise ValueError(f"compression method\n  expected one of: {', '.join(METHODS)}\n  got: {method!r}")
    if target_size is not None and avg_bits is not None:
        raise ValueError("compress: --target-size and --avg-bits\n  expected: one of them")
    target_bytes = parse_size(target_size) if target_size is not None else None
    _check_fraction(outliers)
    source = hub.detect(src)
    out = Path(out)
    pack.check_dest(out, source.path)  # before any work: save checks it again
    builtin = isinstance(calibration, str) and calibration == BUILTIN
    texts = _given_texts(calibration)
    data_free = texts is None and not (builtin and _tokenizer_files(source))
    if data_free and finetune_steps:
        log.info("no calibration texts: table fine-tuning skipped")
        finetune_steps = 0
    if config.train is not None and data_free:
        raise ValueError(f"--train {config.train}: training-time sharing learns from calibration data\n"
                         "  expected: --calibration FILE (or the built-in corpus for a model with a tokenizer), "
                         "not --data-free")
    why = _why_not_streamed(data_free, target_bytes, avg_bits, outliers, evaluate_on, method, finetune_steps)
    if config.train is not None:
        why = why or "training-time sharing trains the whole model"
    if distributed and not data_free:
        why = why or "calibration runs through the model block after block"
    if distributed and (why or stream is False):
        raise ValueError(f"compress: several processes share streamed work only, and {why or 'stream=False'}\n"
                         "  expected: data-free compression (--data-free) without a size budget, or one process")
    if stream is not False and not why:
        from weightshare.compress import stream as streaming

        ss, why = streaming.open_source(src)
        if ss is None and distributed:
            raise ValueError(f"compress: several processes share streamed work only, and {src} cannot stream: {why}")
        if ss is not None:
            configs, dense = resolve(plan, ss.model, config, is_compressible) if plan else ({}, set())
        if ss is not None and not data_free:  # calibrated: one transformer block at a time (blockwise.py)
            from weightshare.compress import blockwise

            work = streaming.plan(ss, config, is_compressible, configs, dense)
            lay, why = blockwise.layout(ss, work)
            if lay is not None and not _tokenizer_files(ss.source):
                lay, why = None, "it has no tokenizer files"
            ss = ss if lay is not None else None
        if ss is not None:
            if not data_free and texts is None:  # the built-in corpus
                texts = calibration_sentences(BUILTIN_SENTENCES)
            settings = {"bits": config.bits, "granularity": config.granularity, "group_size": config.group_size,
                        "calibration": _calibration_name(calibration, builtin, texts),
                        "method": None if data_free else method,
                        "finetune_steps": 0, "finetune_norms": finetune_norms, "outliers": outliers,
                        "target_size": None, "avg_bits": None}
            def records(rep, seconds):
                return compress_records(src, settings, plan, rep, seconds)

            if distributed:
                from weightshare.compress import distributed as ranks

                timeout = ranks.DEFAULT_TIMEOUT if timeout is None else timeout
                ranks.init(timeout)
                rep, seconds = ranks.compress_distributed(ss, out, config, is_compressible, configs, dense, records,
                                                          timeout, max_shard_size)
                return None, rep, seconds
            if data_free:
                rep, seconds = streaming.compress_streamed(ss, out, config, is_compressible, configs, dense, records,
                                                           max_shard_size=max_shard_size)
                log.info("clustered in %.2f s (streamed)", seconds)
                return None, rep, seconds
            try:
                rep, seconds = blockwise.compress_blockwise(ss, out, config, is_compressible, texts, configs, dense,
                                                            records, outliers=outliers, max_shard_size=max_shard_size,
                                                            work=work)
                log.info("clustered in %.2f s (block by block)", seconds)
                return None, rep, seconds
            except (ValueError, OSError, MemoryError):
                raise  # the source, the disk or the machine: loading the model whole would not help
            except Exception as exc:  # an architecture the replay of its blocks does not fit; nothing was written
                if stream:
                    raise RuntimeError(f"compress: calibrating {src} block by block failed: {exc}\n  expected: "
                                       "stream=None or False to load the model whole") from exc
                why = f"calibrating block by block failed ({type(exc).__name__}: {exc})"
    if stream:
        raise ValueError(f"compress: cannot stream {src}: {why}\n  expected: stream=None or False to load it whole")
    if why and stream is None:
        (log.warning if "failed" in why else log.info)("compressing with the model loaded whole: %s", why)
    model = hub.load_pretrained(src)
    configs, dense = resolve(plan, hub.inner_model(model), config, is_compressible) if plan else ({}, set())
    if builtin:
        if _has_tokenizer(model):
            texts = calibration_sentences(BUILTIN_SENTENCES)
        else:
            log.info("no tokenizer: compressing data-free (pass calibration batches through compress_model_)")
    if finetune_steps and not texts:
        log.info("no calibration texts: table fine-tuning skipped")
        finetune_steps = 0
    t0 = time.perf_counter()
    compress_model_(model, config, texts, method=method, finetune_steps=finetune_steps, target_bytes=target_bytes,
                    avg_bits=avg_bits, outliers=outliers, configs=configs, dense=dense, finetune_norms=finetune_norms,
                    epochs=epochs)
    seconds = time.perf_counter() - t0
    if target_bytes is not None and (size := pack.file_size(model)) > target_bytes:  # checked before writing
        raise ValueError(f"--target-size: the packed file would be {size:,} bytes, above {target_bytes:,}\n"
                         "  this is a bug in the size prediction; ask for a slightly smaller size")
    log.info("clustered in %.2f s", seconds)
    rep = report(model)
    # every setting a rerun would otherwise take from the flags' defaults
    settings = {"bits": config.bits, "granularity": config.granularity, "group_size": config.group_size,
                "calibration": _calibration_name(calibration, builtin, texts), "method": method if texts else None,
                "finetune_steps": finetune_steps, "finetune_norms": finetune_norms, "outliers": outliers,
                "target_size": target_size, "avg_bits": avg_bits}
    if config.train is not None:  # the training that shaped the codebooks (CodebookConfig never stores it)
        settings.update(train=config.train, epochs=epochs)
    evaluation = None
    if evaluate_on is not None:
        from weightshare.evaluate import evaluate

        evaluation = evaluate(model, hub.load_pretrained(src), *evaluate_on)
        model._weightshare_evaluation = evaluation
    pack.save(model, out, records=compress_records(src, settings, plan, rep, seconds, evaluation),
              max_shard_size=max_shard_size)
    return model, rep, seconds


def _why_not_streamed(data_free: bool, target_bytes, avg_bits, outliers, evaluate_on, method: str,
                      finetune_steps: int) -> str:
    """Why a compression needs the model whole ("" when it can stream)."""
    if not data_free and method != "gptq":
        return f"the {method} method weighs every layer in one pass through the whole model"
    if not data_free and finetune_steps:
        return "table fine-tuning trains every table at once"
    if data_free and outliers:
        return "outliers need calibration"
    if target_bytes is not None or avg_bits is not None:
        return "a size budget weighs every tensor's error before any is clustered"
    if evaluate_on is not None:
        return "the evaluation runs the compressed model"
    return ""


def compress_records(src, settings: dict, plan, rep, seconds: float, evaluation=None) -> dict[str, str]:
    """How a packed model was made: ``weightshare_recipe.yml`` (a recipe ``--recipe`` accepts, every setting the
    run used) and a model card ``README.md`` in place of the source's."""
    from importlib.metadata import version

    import yaml

    recipe = {k: v for k, v in settings.items() if v is not None}
    if plan is not None:
        if plan.layers:
            recipe["layers"] = [{"match": glob, **over} for glob, over in plan.layers]
        if plan.dense:
            recipe["dense"] = list(plan.dense)
    text = yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None)
    card = "\n".join([
        "---", "tags: [weightshare, codebook, palettization]", "---", "",
        f"# {Path(str(src)).name}, compressed to codebooks", "",
        f"Made with weightshare {version('weightshare')} from `{src}` (`weightshare compress`) in {seconds:.0f} s: "
        f"{rep.bits_per_weight:.2f} bits per compressed weight, tables counted; {rep.bytes_packed / 1e6:.2f} MB "
        f"packed. It loads with `weightshare.load(DIR)`, or, once `weightshare` is imported, with transformers' "
        "`from_pretrained` or `SentenceTransformer(DIR)`; `weightshare export DIR --out DENSE` writes a plain "
        "model.", "",
        "Settings (`weightshare_recipe.yml`; `weightshare compress SRC --recipe weightshare_recipe.yml` makes it "
        "again):", "", "```yaml", text.rstrip(), "```", ""])
    if evaluation is not None:
        figures = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in evaluation.metrics.items())
        card += (f"\nMeasured against `{src}` on {evaluation.texts} texts (`weightshare eval`, {evaluation.kind}): "
                 f"{figures}.\n")
    return {"weightshare_recipe.yml": text, "README.md": card}
