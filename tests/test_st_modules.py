"""A sentence-transformers pipeline saved by the installed release, with a module besides its
Transformer (a Dense projection after pooling): compress, load, export and merge keep it whole."""

import pytest
import torch
from safetensors.torch import load_file

import weightshare as ws
from weightshare.cli import main
from weightshare.hub import _st_module, detect, side_module_weights
from weightshare.merge import MergeError

SENTENCES = ["Return the number of items.", "Open the file and read it.", "a"]


def _with_dense(minilm_path, dest, seed):
    from sentence_transformers import SentenceTransformer

    modules = list(SentenceTransformer(minilm_path, device="cpu"))
    torch.manual_seed(seed)
    dense = _st_module("Dense")(384, 8)
    model = SentenceTransformer(modules=[*modules[:2], dense, *modules[2:]], device="cpu")
    model.save(str(dest))  # modules.json names the installed release's classes
    return model


@pytest.fixture(scope="module")
def st_dense(minilm_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("st-dense")
    return {"a": (_with_dense(minilm_path, root / "a", 0), root / "a"),
            "b": (_with_dense(minilm_path, root / "b", 0), root / "b"),  # same Dense, its own copy
            "c": (_with_dense(minilm_path, root / "c", 1), root / "c")}  # another Dense


def test_a_pipeline_saved_by_the_installed_release_is_detected(st_dense):
    _, path = st_dense["a"]
    source = detect(path)
    assert source.kind == "sentence-transformers" and source.weights_subdir == ""
    assert [str(f) for f in side_module_weights(path)] == ["2_Dense/model.safetensors"]


def test_compress_keeps_the_dense_module_through_load_and_export(st_dense, tmp_path):
    from sentence_transformers import SentenceTransformer

    model, path = st_dense["a"]
    packed = tmp_path / "packed"
    assert main(["--quiet", "compress", str(path), "--bits", "4", "--data-free", "--granularity", "per_channel",
                 "--out", str(packed)]) == 0
    loaded = ws.load(packed)
    assert isinstance(loaded[2], _st_module("Dense"))
    assert torch.equal(loaded[2].linear.weight, model[2].linear.weight)  # copied, not clustered
    assert main(["--quiet", "export", str(packed), "--out", str(tmp_path / "dense")]) == 0
    exported = SentenceTransformer(str(tmp_path / "dense"), device="cpu")
    want = model.encode(SENTENCES, convert_to_tensor=True)
    got, got_loaded = (m.encode(SENTENCES, convert_to_tensor=True) for m in (exported, loaded))
    assert got.shape == (3, 8)
    torch.testing.assert_close(got, got_loaded, rtol=0, atol=1e-5)
    assert torch.nn.functional.cosine_similarity(got, want).min() > 0.9  # 4-bit encoder, same projection


def test_merge_merges_the_dense_module_with_the_method_and_refuses_another_pooling(st_dense, tmp_path):
    import json
    import shutil

    from sentence_transformers import SentenceTransformer

    (a, pa), (_, pb), (_, pc) = st_dense["a"], st_dense["b"], st_dense["c"]
    out = ws.merge([pa, pb], "linear", out=tmp_path / "merged")  # the same Dense twice: the same pipeline
    merged = SentenceTransformer(str(out), device="cpu")
    torch.testing.assert_close(merged.encode(SENTENCES, convert_to_tensor=True),
                               a.encode(SENTENCES, convert_to_tensor=True), rtol=0, atol=1e-5)
    # two Dense projections: merged by the method (here weighted linear), as the Transformer is (mergekit #286)
    out = ws.merge([pa, pc], "linear", weights=[1.0, 3.0], out=tmp_path / "dense-merged")
    da, dc, got = (load_file(p / "2_Dense" / "model.safetensors") for p in (pa, pc, out))
    assert got.keys() == da.keys()
    for k in da:
        torch.testing.assert_close(got[k], (da[k] + 3 * dc[k]) / 4, rtol=0, atol=1e-6)
    assert SentenceTransformer(str(out), device="cpu").encode(SENTENCES, convert_to_tensor=True).shape == (3, 8)
    # another pooling: refused by name, nothing written
    other = tmp_path / "other-pooling"
    shutil.copytree(pc, other)
    pooling = json.loads((other / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    (other / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    with pytest.raises(MergeError, match=r"other-pooling: sentence-transformers module settings "
                                         r"\['1_Pooling/config.json'\] differ from those of .*a \(a Pooling mode"):
        ws.merge([pa, other], "linear", out=tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
