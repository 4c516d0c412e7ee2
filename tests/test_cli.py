"""End to end on the real all-MiniLM-L6-v2: compress, inspect, export, load, bad input."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

import weightshare as ws
from weightshare.cli import main
from weightshare.pack import FILENAME


@pytest.fixture(scope="module")
def packed(minilm_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "mini4"
    # the default calibration (the built-in corpus, GPTQ codebooks); fine-tuning has its own tests
    assert main(["--quiet", "compress", minilm_path, "--bits", "4", "--granularity", "per_channel",
                 "--finetune-steps", "0", "--out", str(out)]) == 0
    return out


def test_inspect_json(packed, capsys):
    capsys.readouterr()
    assert main(["--quiet", "inspect", str(packed), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["params_virtual"] == 22_713_216
    assert r["sharing_ratio"] == pytest.approx(r["params_virtual"] / r["params_stored"])
    assert 4.0 < r["bits_per_weight"] < 4.7  # 4-bit indices plus fp16 tables
    assert r["bytes_packed"] < r["bytes_dense"] / 6
    size = (packed / FILENAME).stat().st_size
    assert r["bytes_packed"] <= size <= 1.02 * r["bytes_packed"]
    assert {layer["map"] for layer in r["layers"]} == {"codebook", "dense"}


def test_load_export_and_fidelity(packed, minilm_path, tmp_path):
    from sentence_transformers import SentenceTransformer

    from weightshare.corpus import evaluation_sentences

    loaded = ws.load(packed)
    assert isinstance(loaded, SentenceTransformer)
    assert main(["--quiet", "export", str(packed), "--out", str(tmp_path / "dense")]) == 0
    dense = SentenceTransformer(str(tmp_path / "dense"), device="cpu")
    original = SentenceTransformer(minilm_path, device="cpu")
    sentences = evaluation_sentences(100)
    e_loaded = loaded.encode(sentences, convert_to_tensor=True)
    e_dense = dense.encode(sentences, convert_to_tensor=True)
    e_orig = original.encode(sentences, convert_to_tensor=True)
    assert torch.allclose(e_loaded, e_dense, atol=1e-5)  # export is the packed model, unchanged
    cos = torch.nn.functional.cosine_similarity(e_orig, e_dense)
    assert cos.mean() >= 0.965  # data-free 4-bit per-channel quality floor
    assert cos.min() >= 0.85


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transformers_directory_round_trip(minilm_path, tmp_path, dtype):
    from transformers import AutoModel

    src = tmp_path / "bert"
    src.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(f"{minilm_path}/{name}", src / name)
    # a checkpoint saved in bf16 loads, clusters and exports in bf16
    AutoModel.from_pretrained(minilm_path).to(dtype).save_pretrained(src)
    from weightshare import hub

    model = hub.load_pretrained(src)
    assert model.dtype == dtype
    ws.share_(model, ws.CodebookConfig(bits=3, granularity="per_tensor"), filter_fn=ws.compress.is_compressible)
    ws.save(model, tmp_path / "p")
    loaded = ws.load(tmp_path / "p")
    assert type(loaded).__name__ == "BertModel"
    assert torch.equal(loaded.encoder.layer[3].output.dense.weight, model.encoder.layer[3].output.dense.weight)
    ws.export(tmp_path / "p", tmp_path / "d")
    plain = AutoModel.from_pretrained(str(tmp_path / "d"))
    assert plain.dtype == dtype
    assert torch.equal(plain.encoder.layer[3].output.dense.weight, model.encoder.layer[3].output.dense.weight)
    assert plain.encoder.layer[3].output.dense.weight.unique().numel() <= 8


def _bad_model_dir(tmp_path, minilm_path):
    d = tmp_path / "weird"
    d.mkdir()
    cfg = json.loads(open(f"{minilm_path}/config.json").read())
    cfg["model_type"] = "no-such-model"
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize(
    "make_args,match",
    [
        (lambda t, m: ["compress", str(t / "missing"), "--bits", "4", "--out", str(t / "o")],
         "model directory not found"),
        (lambda t, m: ["compress", str(t), "--bits", "4", "--out", str(t / "o")], "not a model directory"),
        (lambda t, m: ["compress", str(_bad_model_dir(t, m)), "--bits", "4", "--out", str(t / "o")],
         "unknown model_type"),
        (lambda t, m: ["compress", m, "--bits", "9", "--out", str(t / "o")], "--bits 9: expected 1..8"),
        (lambda t, m: ["compress", m, "--bits", "4", "--granularity", "per_group", "--group-size", "5",
                       "--data-free", "--out", str(t / "o")], "--group-size 5 does not divide its rows of 384"),
        (lambda t, m: ["compress", m, "--bits", "4", "--granularity", "per_group", "--out", str(t / "o")],
         "--granularity per_group needs --group-size"),
        (lambda t, m: ["compress", m, "--bits", "4", "--calibration", str(t / "none.txt"), "--out", str(t / "o")],
         "calibration file not found"),
        (lambda t, m: ["compress", m, "--bits", "4", "--data-free", "--calibration", str(t / "none.txt"),
                       "--out", str(t / "o")], "--data-free and --calibration"),
        (lambda t, m: ["compress", m, "--bits", "4", "--finetune-steps", "-1", "--out", str(t / "o")],
         "--finetune-steps"),
        (lambda t, m: ["compress", m, "--target-size", "8XB", "--out", str(t / "o")], "--target-size '8XB': expected"),
        (lambda t, m: ["export", str(t / "p"), "--max-shard-size", "0", "--out", str(t / "o")],
         "--max-shard-size 0: expected a positive size"),
        (lambda t, m: ["inspect", str(t)], "no weightshare.safetensors"),
        (lambda t, m: ["bench", "nosuch"], "unknown benchmark"),
    ],
)
def test_bad_input_one_clear_error(minilm_path, tmp_path, capsys, make_args, match):
    args = make_args(tmp_path, minilm_path)
    assert main(["--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing half-written
    # in the command line's words, said once
    assert "CodebookConfig" not in err and "filter_fn" not in err and f"error: {args[0]}:" not in err


def test_tampered_file_exit_code_in_a_real_process(packed, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(packed, bad)
    data = bytearray((bad / FILENAME).read_bytes())
    data[-10] ^= 0xFF
    (bad / FILENAME).write_bytes(bytes(data))
    proc = subprocess.run([sys.executable, "-m", "weightshare.cli", "--quiet", "inspect", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "checksum mismatch" in proc.stderr and "Traceback" not in proc.stderr


def test_gpt2_with_tied_head_and_conv1d_compresses(tmp_path):
    # most causal LMs tie lm_head to the input embedding; the CLI has no filter_fn to
    # untangle that, so the tie must be kept: one codebook, written once, tied on load
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    src = tmp_path / "lm"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=500, n_positions=64,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(src)
    assert main(["--quiet", "compress", str(src), "--bits", "3", "--out", str(tmp_path / "p")]) == 0
    trainable = ws.load(tmp_path / "p", trainable=True)
    assert (trainable.lm_head.parametrizations.weight.original
            is trainable.transformer.wte.parametrizations.weight.original)
    attn = trainable.transformer.h[0].attn.c_attn  # transformers' Conv1D, weight (in, out): tables per output column
    assert hasattr(attn, "parametrizations") and attn.weight.shape == (32, 96)
    assert all(col.unique().numel() <= 8 for col in attn.weight.detach().t())
    packed = ws.load(tmp_path / "p")  # the packed modules: one set of indices for the head and the embedding
    assert packed.lm_head.indices is packed.transformer.wte.indices
    assert type(packed.transformer.h[0].attn.c_attn).__name__ == "CodebookLinear"
    assert torch.equal(packed.transformer.h[0].attn.c_attn.weight, attn.weight.detach())
    assert main(["--quiet", "export", str(tmp_path / "p"), "--out", str(tmp_path / "d")]) == 0
    dense = AutoModelForCausalLM.from_pretrained(str(tmp_path / "d"))
    assert dense.lm_head.weight is dense.transformer.wte.weight
    ids = torch.randint(0, 500, (2, 8))
    with torch.no_grad():
        assert torch.allclose(packed(ids).logits, dense(ids).logits, atol=1e-5)
        assert torch.allclose(trainable(ids).logits, dense(ids).logits, atol=1e-5)


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"weightshare {version('weightshare')}\n"
    assert ws.__version__ == version("weightshare")


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_before_or_after_the_subcommand_in_a_real_process(packed, where):
    args = ["inspect", str(packed), "--json"]
    args = ["--quiet", *args] if where == "before" else [*args, "--quiet"]
    proc = subprocess.run([sys.executable, "-m", "weightshare.cli", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and isinstance(json.loads(lines[0]), dict)


@pytest.mark.parametrize("argv,quiet,verbose", [
    (["--quiet", "inspect", "d"], True, False),
    (["inspect", "d", "--quiet"], True, False),
    (["--verbose", "export", "d", "--out", "o"], False, True),
    (["export", "d", "--out", "o", "--verbose"], False, True),
    (["inspect", "d"], False, False),
])
def test_global_options_parse_before_or_after(argv, quiet, verbose):
    from weightshare.cli import build_parser

    args = build_parser().parse_args(argv)
    assert (getattr(args, "quiet", False), getattr(args, "verbose", False)) == (quiet, verbose)


def test_quiet_and_verbose_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--quiet", "inspect", "d", "--verbose"])
    assert exc.value.code == 2
    assert "--quiet and --verbose" in capsys.readouterr().err


def test_bench_help_lists_the_benchmarks(capsys):
    from weightshare.bench import NAMES

    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "load" in NAMES and all(name in out for name in NAMES)


@pytest.mark.parametrize("where", ["before", "after"])
def test_compress_verbose_prints_the_per_tensor_table(tmp_path, capsys, where):
    import logging

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=500, n_positions=64,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(tmp_path / "lm")
    args = ["compress", str(tmp_path / "lm"), "--bits", "3"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert "attn.c_attn.weight" not in capsys.readouterr().out
    level = logging.getLogger("weightshare").level
    try:
        verbose = ["--verbose", *args] if where == "before" else [*args, "--verbose"]
        assert main([*verbose, "--out", str(tmp_path / "verbose")]) == 0
    finally:
        logging.getLogger("weightshare").setLevel(level)  # main() configures logging for a whole process
    assert "attn.c_attn.weight" in capsys.readouterr().out


def test_compress_records_how_it_was_made(tmp_path):
    """The packed folder holds the run's settings as a recipe that compress accepts (and that makes the same
    tensors again), and a model card in place of the source's."""
    from transformers import BertConfig, BertModel

    from weightshare.compress.recipe import read_recipe
    from weightshare.pack import PackedFile

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "README.md").write_text("the source's own card")
    out = tmp_path / "p"
    assert main(["--quiet", "compress", str(tmp_path / "src"), "--bits", "3", "--granularity", "per_group",
                 "--group-size", "16", "--data-free", "--out", str(out)]) == 0
    plan = read_recipe(out / "weightshare_recipe.yml")
    assert plan.config == {"bits": 3, "granularity": "per_group", "group_size": 16}
    assert plan.settings == {"calibration": "none", "finetune_steps": 0, "finetune_norms": False, "outliers": 0.0}
    card = (out / "README.md").read_text()
    assert "weightshare compress" in card and "bits per compressed weight" in card
    assert main(["--quiet", "compress", str(tmp_path / "src"), "--recipe", str(out / "weightshare_recipe.yml"),
                 "--out", str(tmp_path / "again")]) == 0
    first, again = (out / FILENAME).read_bytes(), (tmp_path / "again" / FILENAME).read_bytes()
    n = int.from_bytes(first[:8], "little")  # the header's metadata order is safetensors' own (a hash map)
    assert first[8 + n:] == again[8 + n:]  # the same tensors, byte for byte
    assert PackedFile(out).spec == PackedFile(tmp_path / "again").spec


def test_inspect_without_config_reads_the_file_alone(packed, tmp_path, capsys):
    """A packed file without config.json (or a plain nn.Module's) is reported from the file; where a model can be
    built, the file's counts equal the built model's."""
    from weightshare.report import report_file

    want, got = ws.report(ws.load(packed)), report_file(packed)
    for key in ("params_virtual", "params_stored", "bytes_dense", "bytes_packed", "bits_per_weight"):
        assert getattr(got, key) == getattr(want, key), key
    assert [(r.name, r.map, r.detail, r.params_stored, r.bytes_packed) for r in got.layers] == \
        [(r.name, r.map, r.detail.removesuffix(" (packed)"), r.params_stored, r.bytes_packed) for r in want.layers]
    # hashed buckets clustered into a table (a map's state made by another map) and a plain nn.Module
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))  # noqa: E731
    net = ws.share_(ws.share_(make(), ws.HashConfig(compression=1 / 8)),
                    ws.CodebookConfig(bits=3, granularity="per_tensor"))
    ws.save(net, tmp_path / "hc")
    r = ws.report(net)
    capsys.readouterr()
    assert main(["--quiet", "inspect", str(tmp_path / "hc"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["from_file_only"] is True
    for key in ("params_virtual", "params_stored", "bytes_packed", "bits_per_weight"):
        assert printed[key] == pytest.approx(getattr(r, key)), key


@pytest.mark.parametrize("argv,words", [
    (["bench", "nope"], "unknown benchmark: expected one of: kmeans"),
    (["compress", "/nonexistent-model", "--out", "x"], "model directory not found: got: '/nonexistent-model'"),
    (["inspect", "/"], "not a packed model"),
    (["compress", "/nonexistent-model", "--bits", "9", "--out", "x"], "--bits 9: expected 1..8"),
])
def test_cli_errors_are_one_line(argv, words, capsys):
    capsys.readouterr()
    assert main(["--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"weightshare {argv[0]}: error: ") and words in err
    assert err.count("\n") == 1 and "Error" not in err and "CodebookConfig" not in err, err
