"""weightshare eval: fidelity on the user's data, against slow obvious versions of each figure."""

import json
import math
import shutil

import pytest
import torch

import weightshare as ws
from weightshare import evaluate as ev
from weightshare.cli import main

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def _brute_overlap(a, b, k):
    a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    total = 0.0
    for i in range(len(a)):  # one text at a time: sort the others by similarity, keep the first k
        others = [j for j in range(len(a)) if j != i]
        na = {others[j] for j in torch.argsort(a[others] @ a[i], descending=True)[:k].tolist()}
        nb = {others[j] for j in torch.argsort(b[others] @ b[i], descending=True)[:k].tolist()}
        total += len(na & nb) / k
    return total / len(a)


@pytest.mark.parametrize("n,k", [(40, 5), (1100, 10), (4, 10)])
def test_embedding_fidelity_matches_brute_force(n, k):
    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, 8, generator=g)
    b = a + 0.5 * torch.randn(n, 8, generator=g)
    got = ev.embedding_fidelity(a, b, k)
    cos = [float(torch.nn.functional.cosine_similarity(a[i], b[i], dim=0)) for i in range(n)]
    assert got["cos_mean"] == pytest.approx(sum(cos) / n, rel=1e-6)
    kk = min(k, n - 1)  # n=1100 crosses the 1024-row block
    assert got[f"top{kk}_overlap"] == pytest.approx(_brute_overlap(a, b, kk), abs=1e-12)
    assert ev.embedding_fidelity(a, a, k)[f"top{kk}_overlap"] == 1.0


def test_read_data_formats_and_errors(tmp_path):
    (tmp_path / "t.txt").write_text("one\n\n  two  \n")
    assert ev.read_data(tmp_path / "t.txt") == (["one", "two"], None)
    (tmp_path / "d.csv").write_text('sentence,label\n"a, b",pos\nc,neg\n')
    assert ev.read_data(tmp_path / "d.csv") == (["a, b", "c"], ["pos", "neg"])
    (tmp_path / "d.jsonl").write_text('{"body": "x", "y": 1}\n\n{"body": "z", "y": 0}\n')
    assert ev.read_data(tmp_path / "d.jsonl", text_field="body", label_field="y") == (["x", "z"], [1, 0])
    with pytest.raises(ValueError, match=r"no text field .*fields: body, y.*--text-field"):
        ev.read_data(tmp_path / "d.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n{"text": \n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        ev.read_data(tmp_path / "bad.jsonl")
    (tmp_path / "nolabel.csv").write_text("text,label\nx,1\ny,\n")
    with pytest.raises(ValueError, match="row 3 has no label"):
        ev.read_data(tmp_path / "nolabel.csv")
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        ev.read_data(tmp_path / "latin.txt")
    with pytest.raises(ValueError, match="--eval 'missing.txt': no such file"):
        ev.read_data("missing.txt", flag="--eval")


def _with_tokenizer(model, minilm_path, path):
    model.save_pretrained(path)
    for f in TOKENIZER_FILES:
        if (src := __import__("pathlib").Path(minilm_path) / f).is_file():
            shutil.copy(src, path / f)
    return path


@pytest.fixture(scope="module")
def lm(minilm_path, tmp_path_factory):
    """A small GPT-2 with MiniLM's tokenizer (30522 tokens), and its 3-bit packed copy."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("lm")
    src = _with_tokenizer(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=30522,
                                                     n_positions=128)), minilm_path, root / "src")
    assert main(["--quiet", "compress", str(src), "--bits", "3", "--data-free", "--out", str(root / "p")]) == 0
    return src, root / "p"


def test_perplexity_matches_one_text_at_a_time(lm, monkeypatch):
    from weightshare.corpus import evaluation_sentences

    src, packed = lm
    model, reference = ev.open_model(packed, "PACKED"), ev.open_model(src, "--reference")
    texts = evaluation_sentences(30)
    monkeypatch.setattr(ev, "LOGIT_BUDGET", 30522 * 200)  # several batches, each padded differently
    got = ev.evaluate(model, reference, texts)
    assert got.kind == "causal-lm"
    tok = ws.hub.tokenizer_of(model)
    nll, tokens, agree = {"m": 0.0, "r": 0.0}, 0, 0
    with torch.no_grad():
        for text in texts:  # no padding, no batching: the definition
            inputs = tok(text, truncation=True, max_length=128, return_tensors="pt")  # as the tokenizer feeds it
            ids = inputs["input_ids"]
            top = {}
            for name, m in (("m", model), ("r", reference)):
                logits = m(**inputs).logits[0, :-1].double()
                nll[name] -= float(torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None]).sum())
                top[name] = logits.argmax(-1)
            tokens += ids.shape[1] - 1
            agree += int((top["m"] == top["r"]).sum())
    assert got.metrics["tokens"] == tokens
    assert got.metrics["perplexity"] == pytest.approx(math.exp(nll["m"] / tokens), rel=1e-4)
    assert got.metrics["perplexity_reference"] == pytest.approx(math.exp(nll["r"] / tokens), rel=1e-4)
    assert abs(got.metrics["next_token_agreement"] - agree / tokens) <= 2 / tokens
    assert got.metrics["perplexity"] != got.metrics["perplexity_reference"]  # 3 bits moved the model


@pytest.fixture(scope="module")
def classifier(minilm_path, tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(1)
    root = tmp_path_factory.mktemp("cls")
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"},
                        label2id={"neg": 0, "neu": 1, "pos": 2})
    src = _with_tokenizer(BertForSequenceClassification(config), minilm_path, root / "src")
    assert main(["--quiet", "compress", str(src), "--bits", "2", "--data-free", "--out", str(root / "p")]) == 0
    return src, root / "p"


def test_accuracy_matches_one_text_at_a_time(classifier, tmp_path, capsys):
    from weightshare.corpus import evaluation_sentences

    src, packed = classifier
    texts = evaluation_sentences(40)
    labels = ["neg", "neu", "pos", "1"] * 10  # names through label2id, or class ids
    rows = [json.dumps({"text": t, "label": y}) for t, y in zip(texts, labels)]
    (tmp_path / "d.jsonl").write_text("\n".join(rows))
    capsys.readouterr()
    assert main(["--quiet", "eval", str(packed), "--reference", str(src), "--data", str(tmp_path / "d.jsonl"),
                 "--json", "--batch-size", "7"]) == 0
    got = json.loads(capsys.readouterr().out)
    model, reference = ws.load(packed), ws.hub.load_pretrained(src)
    tok = ws.hub.tokenizer_of(model)
    y = [{"neg": 0, "neu": 1, "pos": 2, "1": 1}[v] for v in labels]
    with torch.no_grad():
        p = [int(model(**tok(t, return_tensors="pt")).logits.argmax()) for t in texts]
        r = [int(reference(**tok(t, return_tensors="pt")).logits.argmax()) for t in texts]
    assert got["kind"] == "classifier" and got["texts"] == 40
    assert got["accuracy"] == pytest.approx(sum(a == b for a, b in zip(p, y)) / 40)
    assert got["accuracy_reference"] == pytest.approx(sum(a == b for a, b in zip(r, y)) / 40)
    assert got["agreement"] == pytest.approx(sum(a == b for a, b in zip(p, r)) / 40)
    (tmp_path / "bad.csv").write_text("text,label\nhello,maybe\n")
    assert main(["--quiet", "eval", str(packed), "--reference", str(src), "--data", str(tmp_path / "bad.csv")]) == 2
    err = capsys.readouterr().err
    assert "label 'maybe' of text 1 is not one of the model's labels (neg, neu, pos)" in err
    assert err.count("\n") == 1


def test_minilm_eval_on_own_text_and_compress_eval(minilm_path, tmp_path, capsys):
    from weightshare.corpus import evaluation_sentences

    (tmp_path / "texts.txt").write_text("\n".join(evaluation_sentences(150)))
    capsys.readouterr()
    out = tmp_path / "mini3"
    assert main(["--quiet", "compress", minilm_path, "--bits", "3", "--data-free", "--out", str(out),
                 "--eval", str(tmp_path / "texts.txt")]) == 0
    printed = capsys.readouterr().out
    assert "sentence-transformers model on 150 texts" in printed and "top10_overlap" in printed
    card = (out / "README.md").read_text()  # the model card says what was measured, as printed
    cos = float(printed.split("top10_overlap")[1].split()[2])
    assert "Measured against" in card and f"cos_mean {cos:.4g}" in card
    assert main(["--quiet", "eval", str(out), "--reference", minilm_path, "--data", str(tmp_path / "texts.txt"),
                 "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["kind"] == "sentence-transformers"
    assert 0.85 < got["cos_mean"] < 0.99 and got["cos_p1"] <= got["cos_mean"]  # data-free 3-bit per-channel floor
    assert 0.5 < got["top10_overlap"] < 1.0
    assert 3.0 < got["bits_per_weight"] < 3.7 and got["size_mb"] < got["reference_size_mb"] / 7
    # the reference against itself: every figure at its ceiling
    assert main(["--quiet", "eval", minilm_path, "--reference", minilm_path, "--data", str(tmp_path / "texts.txt"),
                 "--json", "--k", "5"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["cos_mean"] == pytest.approx(1.0, abs=1e-6) and same["top5_overlap"] == 1.0


def test_bare_encoder_is_mean_pooled(minilm_path, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from weightshare.corpus import evaluation_sentences

    texts = evaluation_sentences(12)
    ref = AutoModel.from_pretrained(minilm_path).eval()
    model = AutoModel.from_pretrained(minilm_path).eval()
    with torch.no_grad():
        model.encoder.layer[0].output.dense.weight.mul_(1.5)
    model._weightshare_source = ws.hub.Source("transformers", minilm_path)
    got = ev.evaluate(model, ref, texts, k=3)
    tok = AutoTokenizer.from_pretrained(minilm_path)
    with torch.no_grad():
        emb = lambda m: torch.cat([m(**tok(t, return_tensors="pt")).last_hidden_state.mean(1) for t in texts])  # noqa: E731
        want = ev.embedding_fidelity(emb(ref), emb(model), 3)
    assert got.kind == "encoder"
    assert got.metrics["cos_mean"] == pytest.approx(want["cos_mean"], abs=1e-5)
    assert got.metrics["top3_overlap"] == want["top3_overlap"]


def test_eval_bad_input_is_one_line_before_loading(lm, minilm_path, tmp_path, capsys):
    src, packed = lm
    (tmp_path / "t.txt").write_text("hello world\n")
    cases = [
        (["eval", str(packed), "--reference", minilm_path, "--data", str(tmp_path / "t.txt")],
         "the model is a causal-lm model and the --reference a sentence-transformers model"),
        (["eval", str(packed), "--reference", str(src), "--data", str(tmp_path / "none.txt")], "no such file"),
        (["eval", str(packed), "--reference", str(tmp_path / "nope"), "--data", str(tmp_path / "t.txt")],
         "--reference"),
        (["eval", str(packed), "--reference", str(src), "--data", str(tmp_path / "t.txt"), "--k", "0"], "--k 0"),
        (["compress", str(src), "--out", str(tmp_path / "o"), "--eval", str(tmp_path / "none.txt")],
         "--eval"),
        (["compress", str(src), "--out", str(tmp_path / "o"), "--text-field", "x"], "give --eval FILE"),
    ]
    for argv, words in cases:
        capsys.readouterr()
        assert main(["--quiet", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_quiet_eval_says_nothing_but_the_report(lm, tmp_path):
    import subprocess
    import sys

    src, packed = lm
    (tmp_path / "t.txt").write_text("hello world\nweight sharing\n")
    proc = subprocess.run([sys.executable, "-m", "weightshare.cli", "--quiet", "eval", str(packed), "--reference",
                           str(src), "--data", str(tmp_path / "t.txt")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no progress bar (transformers' "Loading weights" either), no library warning
    assert "perplexity" in proc.stdout
