"""Co-training the user's own models and data: data files, model directories, and their errors."""

import json
import re

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import write_tiny_bert
from weightshare.merge.cotrain import check, launch, read_config
from weightshare.merge.cotrain.config import worker_rows, worker_split
from weightshare.merge.cotrain.data import DataError, DataSpec, parse_data, read_rows
from weightshare.merge.cotrain.zoo import TextClassifier, digits_parts

WORDS = 37  # the tiny model's vocabulary: w0 .. w36 (ids 3..39)


def sentences(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Texts of 4-9 words and a label that depends on them (whether w0 or w1 occurs): learnable, not random."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        label = ["pos", "neg"][i % 2]
        words = list(rng.integers(2, WORDS, size=rng.integers(3, 8)))
        words.insert(int(rng.integers(0, len(words))), 0 if label == "pos" else 1)
        texts.append(" ".join(f"w{w}" for w in words))
        labels.append(label)
    return texts, labels


def write_jsonl(path, texts, labels, text="text", label="label"):
    path.write_text("".join(json.dumps({text: t, label: y}) + "\n" for t, y in zip(texts, labels)))
    return str(path)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer BERT with seeded random weights and a word-level tokenizer, saved as transformers saves it."""
    return str(write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), WORDS))


# ------------------------------------------------------------------------------------ data files


def test_jsonl_csv_and_npz_read_to_the_same_rows(tmp_path):
    texts, labels = sentences(12)
    a = read_rows(DataSpec(write_jsonl(tmp_path / "d.jsonl", texts, labels)))
    (tmp_path / "d.csv").write_text("sentence,topic\n" + "".join(f'"{t}",{y}\n' for t, y in zip(texts, labels)))
    b = read_rows(DataSpec(str(tmp_path / "d.csv"), text="sentence", label="topic"))
    assert a.inputs == b.inputs == texts and a.names == b.names == ["neg", "pos"]
    (tmp_path / "e.csv").write_text("id,sentence,class\n" + "".join(f"{i},{t},{y}\n" for i, (t, y) in
                                                                  enumerate(zip(texts, labels))))
    e = read_rows(DataSpec(str(tmp_path / "e.csv")))  # the fields weightshare eval finds by default
    assert e.inputs == texts and e.names == ["neg", "pos"]
    assert a.y.tolist() == b.y.tolist() == [1, 0] * 6
    x = np.arange(24, dtype=np.float32).reshape(12, 2)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([3, 5] * 6))
    c = read_rows(DataSpec(str(tmp_path / "d.npz"), text="x", label="y"))
    assert torch.equal(c.inputs, torch.from_numpy(x)) and c.names == [3, 5] and c.y.tolist() == [0, 1] * 6


def test_listed_labels_fix_the_order_and_csv_integers_are_read_as_the_listed_ones(tmp_path):
    texts, labels = sentences(6)
    a = read_rows(DataSpec(write_jsonl(tmp_path / "d.jsonl", texts, labels), labels=("pos", "neg")))
    assert a.names == ["pos", "neg"] and a.y.tolist() == [0, 1] * 3
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"{t},{i % 2}\n" for i, t in enumerate(texts)))
    b = read_rows(DataSpec(str(tmp_path / "d.csv"), labels=(1, 0)))
    assert b.names == [1, 0] and b.y.tolist() == [1, 0] * 3


def _bad_files(tmp_path):
    j = tmp_path / "d.jsonl"
    yield "jsonl, no label column", lambda: j.write_text('{"text": "a b", "label": "x"}\n{"text": "c"}\n'), \
        DataSpec(str(j)), r"d\.jsonl': record 2 has no label in 'label'"
    yield "jsonl, not JSON", lambda: j.write_text('{"text": "a", "label": 1}\n{oops\n'), \
        DataSpec(str(j)), r"d\.jsonl': line 2 is not JSON"
    yield "jsonl, a list", lambda: j.write_text('[1, 2]\n'), DataSpec(str(j)), \
        r"line 1 is not a JSON object"
    yield "jsonl, empty text", lambda: j.write_text('{"text": "a", "label": 1}\n{"text": " ", "label": 2}\n'), \
        DataSpec(str(j)), r"record 2 has no text in 'text'"
    yield "jsonl, a float label", lambda: j.write_text('{"text": "a", "label": 1.5}\n'), \
        DataSpec(str(j)), r"record 1: a label must be a string or an integer, got 1\.5"
    yield "unknown label", lambda: j.write_text('{"text": "a", "label": "x"}\n' * 2
                                                + '{"text": "b", "label": "z"}\n'), \
        DataSpec(str(j), labels=("x", "y")), \
        r"record 3: unknown label 'z' in column 'label'\n  expected one of data\.labels"
    yield "one label only", lambda: j.write_text('{"text": "a", "label": "x"}\n' * 3), DataSpec(str(j)), \
        r"every row has the label 'x'"
    c = tmp_path / "d.csv"
    yield "csv, no such column", lambda: c.write_text("body,label\nhello,1\n"), DataSpec(str(c)), \
        r"no text field '' \(fields: body, label\); name it with data\.text"
    n = tmp_path / "d.npz"
    yield "npz, object array", lambda: np.savez(n, x=np.array([[1.0]], dtype=object), y=np.array([1])), \
        DataSpec(str(n), "x", "y"), r"array 'x' declares object \(1, 1\).*objects, which are never unpickled"

    def huge():  # a header declaring 10^12 floats over 8 stored bytes: refused before numpy allocates them
        import io
        import zipfile

        head = io.BytesIO()
        np.lib.format.write_array_header_1_0(head, {"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6)})
        with zipfile.ZipFile(n, "w") as z:
            z.writestr("x.npy", head.getvalue() + b"\0" * 8)
            z.writestr("y.npy", head.getvalue() + b"\0" * 8)
    yield "npz, huge header", huge, DataSpec(str(n), "x", "y"), \
        r"array 'x' declares float32 \(1000000, 1000000\), which its 136 stored bytes cannot hold"
    yield "npz, no array", lambda: np.savez(n, feats=np.ones((2, 2))), DataSpec(str(n), "x", "y"), \
        r"no array 'x' \(it has: feats\)"
    yield "npz, NaN", lambda: np.savez(n, x=np.array([[np.nan], [1.0]]), y=np.array([0, 1])), \
        DataSpec(str(n), "x", "y"), "NaN or infinite"
    yield "npz, labels short", lambda: np.savez(n, x=np.ones((3, 2)), y=np.array([0, 1])), DataSpec(str(n), "x", "y"), \
        r"one integer or string label per row of 'x' \(3\)"
    yield "no file", lambda: None, DataSpec(str(tmp_path / "none.jsonl")), r"data\.path: .*none\.jsonl': no such file"


def test_bad_files_are_refused_naming_the_file_the_line_and_the_column(tmp_path):
    cases = list(_bad_files(tmp_path))
    assert len(cases) == 14
    for what, write, spec, message in cases:
        write()
        with pytest.raises(DataError, match=message):
            read_rows(spec)


def test_the_data_key_takes_a_built_in_a_path_or_a_mapping():
    p = []
    assert parse_data("digits", "data", p) == "digits"
    assert parse_data("a.jsonl", "data", p) == DataSpec("a.jsonl")
    assert parse_data({"path": "a.npz"}, "data", p) == DataSpec("a.npz", "x", "y")
    assert parse_data({"path": "a.csv", "labels": ["b", "a"]}, "data", p).labels == ("b", "a")
    assert not p
    assert parse_data("a.parquet", "data", p) is None
    assert parse_data({"path": "a.csv", "colour": 1, "labels": ["a"]}, "workers[1].data", p) is None
    assert p == ["data.path: 'a.parquet': expected a .jsonl, .csv, .npz file (or the built-in digits)",
                 "workers[1].data.colour: unknown key; known keys: path, text, label, labels",
                 "workers[1].data.labels: expected a list of at least 2 distinct labels (strings or integers), "
                 "got ['a']"]


def test_digits_parts_are_the_splits_they_were():
    """The digits now go through the generic split; the parts must be the ones co-training always used."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import StratifiedKFold, train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x / 16.0, y, test_size=0.25, stratify=y, random_state=3)
    folds = [b for _, b in StratifiedKFold(2, shuffle=True, random_state=3).split(xtr, ytr)]
    parts, (gx, gy) = digits_parts(2, 3)
    assert torch.equal(gx, torch.tensor(xte, dtype=torch.float32)) and gy.tolist() == yte.tolist()
    for (px, py), b in zip(parts, folds):
        assert torch.equal(px, torch.tensor(xtr[b], dtype=torch.float32)) and py.tolist() == ytr[b].tolist()


def write_config(tmp_path, cfg, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_workers_get_disjoint_stratified_parts_of_the_common_data_and_all_of_their_own(tmp_path):
    texts, labels = sentences(60)
    common = write_jsonl(tmp_path / "a.jsonl", texts, labels)
    own = write_jsonl(tmp_path / "b.jsonl", *sentences(20, seed=1))
    worker = {"model": "cnn", "shared": {"head.*": "head.*"}}
    cfg = read_config(write_config(tmp_path, {"sync_every": 1, "data": common, "test_size": 0.25,
                                              "workers": [worker, dict(worker, data=own), worker]}))
    plan = worker_rows(cfg)
    assert [at for _, at, _ in plan] == ["data", "workers[1].data", "data"]
    (x0, y0), (t0, _) = worker_split(cfg, plan, 0, seed=0)
    (x2, y2), (t2, _) = worker_split(cfg, plan, 2, seed=0)
    assert t0 == t2 and len(t0) == 15  # one test split of the common data
    assert not set(x0) & set(x2) and not (set(x0) | set(x2)) & set(t0) and len(x0) + len(x2) == 45
    assert abs(int(y0.sum()) - len(y0) / 2) <= 1  # stratified: as many of each label
    (x1, _), (t1, _) = worker_split(cfg, plan, 1, seed=0)
    assert len(x1) == 15 and len(t1) == 5 and not set(x1) & set(texts)


# ------------------------------------------------------------------------------------ model directories


def test_a_text_classifier_pools_over_the_mask_and_reads_a_pipelines_pooling(tiny_bert, tmp_path):
    import shutil

    model = TextClassifier.from_directory(tiny_bert, 3, trainable_layers=1)
    batch = model.encode(["w1 w2 w3 w4", "w5"])
    model.eval()  # no dropout: the two computations must see the same states
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]
    with torch.no_grad():
        h = model.transformer(**batch).last_hidden_state
        want = torch.stack([h[0].mean(0), h[1, 0]]) @ model.head.weight.T + model.head.bias
        assert torch.allclose(model(batch), want, atol=1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "head.weight" in trainable and "transformer.encoder.layer.1.output.dense.weight" in trainable
    assert not any(".layer.0." in n or "embeddings" in n for n in trainable)

    st = tmp_path / "st"
    shutil.copytree(tiny_bert, st)
    (st / "1_Pooling").mkdir()
    (st / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (st / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 16,
                                                              "pooling_mode_cls_token": True}))
    assert TextClassifier.from_directory(str(st), 2).pooling == "cls"
    weighted = {"word_embedding_dimension": 16, "pooling_mode_weightedmean_tokens": True}
    (st / "1_Pooling" / "config.json").write_text(json.dumps(weighted))
    with pytest.raises(ValueError, match="pooling_mode_weightedmean_tokens; co-training reads mean, cls or max"):
        TextClassifier.from_directory(str(st), 2)


def test_a_packed_model_directory_trains_its_tables(tiny_bert, tmp_path):
    """A packed directory loads with its codebook tables as the trainable weights (3-bit per-tensor: 8 entries)."""
    import weightshare as ws
    from weightshare.hub import load_pretrained

    model = load_pretrained(tiny_bert)
    ws.share_(model, ws.CodebookConfig(bits=3, granularity="per_tensor"))
    ws.save(model, tmp_path / "packed")
    clf = TextClassifier.from_directory(str(tmp_path / "packed"), 2)
    tables = {n: p for n, p in clf.named_parameters() if n.endswith("parametrizations.weight.original")}
    assert len(tables) == 2 * 6 + 3 + 1  # 6 Linear a layer, 3 embeddings, the pooler
    assert all(p.shape == (1, 8) and p.requires_grad for p in tables.values())
    before = {n: p.detach().clone() for n, p in tables.items()}
    loss = torch.nn.functional.cross_entropy(clf(clf.encode(["w0 w3", "w1 w4"])), torch.tensor([0, 1]))
    loss.backward()
    torch.optim.SGD([p for p in clf.parameters() if p.requires_grad], lr=0.1).step()
    moved = {n for n, p in tables.items() if not torch.equal(before[n], p)}
    assert moved == {n for n in tables if ".pooler." not in n}  # the classifier pools the states, not BERT's pooler


def test_check_refuses_data_a_model_cannot_read_and_a_directory_that_does_not_load(tiny_bert, tmp_path):
    texts, labels = sentences(40)
    data = write_jsonl(tmp_path / "t.jsonl", texts, labels)
    np.savez(tmp_path / "f.npz", x=np.ones((40, 5), np.float32), y=np.arange(40) % 2)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "bert", "hidden_size": "wide"}')
    shared = {"head.*": "head.*"}
    cases = [
        ({"data": data, "workers": [{"model": "cnn", "shared": shared}]},
         "workers[0].model: cnn reads 8x8 images (64 numbers a row), and the data is text"),
        ({"data": str(tmp_path / "f.npz"), "workers": [{"model": tiny_bert, "shared": shared}]},
         "workers[0].model: a transformers model reads text, and the data holds arrays of numbers"),
        ({"data": str(tmp_path / "f.npz"), "workers": [{"model": "gru", "shared": shared}]},
         "workers[0].model: gru reads 8x8 images (64 numbers a row); the data has 5"),
        ({"data": data, "workers": [{"model": str(broken), "shared": shared}]},
         f"workers[0].model: {str(broken)!r} does not load"),
        ({"data": data, "workers": [{"model": tiny_bert, "shared": shared, "trainable_layers": 5}]},
         "trainable_layers: the model has 2 layers; got 5"),
        ({"data": {"path": data, "labels": ["pos", "other"]}, "workers": [{"model": tiny_bert, "shared": shared}]},
         "cotrain config: data '.*t.jsonl': record 2: unknown label 'neg'"),
    ]
    for extra, message in cases:
        with pytest.raises(ValueError) as e:
            check(read_config(write_config(tmp_path, {"sync_every": 1, **extra})), 1)
        assert message in str(e.value) or re.search(message, str(e.value)), (message, str(e.value))


def test_text_workers_co_train_a_model_directory_on_a_data_file(tiny_bert, tmp_path, capfd):
    """Two processes, the tiny BERT on disjoint halves of a JSONL file, sharing the last layer and the head."""
    texts, labels = sentences(96)
    data = write_jsonl(tmp_path / "t.jsonl", texts, labels)
    shared = {"transformer.encoder.layer.1.*": "last.*", "head.*": "head.*"}
    worker = {"model": tiny_bert, "shared": shared, "train": {"epochs": 3, "batch_size": 12, "lr": 0.003}}
    results = tmp_path / "r.json"
    cfg = {"sync_every": 2, "data": data, "compare_alone": True, "results": str(results), "timeout": 120,
           "workers": [worker, worker]}
    code = launch(write_config(tmp_path, cfg), nproc=2, timeout=300)
    out, err = capfd.readouterr()
    assert code == 0, err[-2000:]
    got = json.loads(results.read_text())
    model = TextClassifier.from_directory(tiny_bert, 2)
    n_shared = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("transformer.encoder.layer.1.",
                                                                                     "head.")))
    for w in got["workers"]:
        s = w["seeds"][0]
        assert s["rows"] == 36 and s["syncs"] == 5  # 3 epochs x 3 steps = 9: syncs at 2, 4, 6, 8 and 9
        assert s["shared_params"] == n_shared and s["bytes_sent"] == n_shared * 4 * s["syncs"]
        assert 0 < s["acc"] <= 1 and 0 < s["acc_alone"] <= 1
    assert got["workers"][0]["model"].endswith(tiny_bert.rstrip("/").split("/")[-1])


# ------------------------------------------------------------------------------------ mutated files

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from([".jsonl", ".csv", ".npz"]), edits=st.lists(
    st.tuples(st.floats(0, 1), st.integers(0, 255), st.sampled_from(["set", "insert", "delete", "truncate"])),
    min_size=1, max_size=4))
def test_a_mutated_data_file_is_read_or_refused_with_one_data_error(tmp_path, kind, edits):
    """Bytes changed, inserted, deleted or cut anywhere in a real data file: the reader returns rows that hold
    together (one label per input, every label index in range) or raises a DataError, never anything else."""
    texts, labels = sentences(8)
    path = tmp_path / f"d{kind}"
    if kind == ".jsonl":
        write_jsonl(path, texts, labels)
    elif kind == ".csv":
        path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in zip(texts, labels)))
    else:
        np.savez(path, x=np.arange(16, dtype=np.float32).reshape(8, 2), y=np.array([0, 1] * 4))
    data = bytearray(path.read_bytes())
    for where, byte, op in edits:
        i = min(int(where * len(data)), max(len(data) - 1, 0))
        if op == "set" and data:
            data[i] = byte
        elif op == "insert":
            data.insert(i, byte)
        elif op == "delete" and data:
            del data[i]
        elif op == "truncate":
            del data[i:]
    path.write_bytes(bytes(data))
    spec = DataSpec(str(path), "x", "y") if kind == ".npz" else DataSpec(str(path))
    try:
        rows = read_rows(spec)
    except DataError:
        return
    n = len(rows.inputs)
    assert n == len(rows.y) >= 2 and 0 <= int(rows.y.min()) and int(rows.y.max()) < len(rows.names)
