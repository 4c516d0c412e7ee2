"""bench merge-minilm's own parts: length-sorted embedding, the parameter grid, the kept share."""

import numpy as np
import pytest
import torch

from weightshare.bench import merge_minilm as bench


def test_length_sorted_embedding_gives_each_row_its_own_embedding(minilm_path):
    from weightshare.hub import sentence_encoder
    from weightshare.multitask.trainer import select_rows

    sentences = ["a", "Return the number of items in the container, counting duplicates once.", "Open a file.",
                 "x y", "Compute the greatest common divisor of the two integers given as arguments, if any."] * 3
    enc = sentence_encoder(minilm_path, trainable_layers=0).eval()
    x = dict(enc.preprocess(sentences))
    got = bench._embed(minilm_path, x, batch=4)  # batches that mix lengths once sorted
    with torch.no_grad():
        want = torch.cat([enc(select_rows(x, torch.tensor([i])))["sentence_embedding"] for i in range(len(sentences))])
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


def test_every_tensorwise_method_gets_parameters_it_accepts():
    from weightshare.merge import MERGE_METHODS
    from weightshare.merge.registry import check_params

    for name, spec in MERGE_METHODS.items():
        if not spec.tensorwise or not bench.merges_two(spec):
            continue
        grid = bench.configs(name)
        scales = bench.SCALES_BY_METHOD.get(name, bench.SCALES)
        assert grid and len(grid) == (len(scales) if "scale" in spec.params else 1)
        for params in grid:
            per_model = {k: [v, v] for k, v in params.items() if k in spec.model_params}
            glob = {k: v for k, v in params.items() if k not in spec.model_params}
            assert check_params(spec, 2, spec.uses_base, per_model, glob) == [], (name, params)


def test_kept_share_and_its_bootstrap_error():
    rng = np.random.default_rng(0)
    base = rng.random(400) < 0.7
    finetuned = base | (rng.random(400) < 0.5)  # a fine-tune that fixes about half of the base's errors
    assert bench.kept_share(finetuned, base, finetuned) == 1.0
    assert bench._bootstrap_se(finetuned, base, finetuned, 200) == 0.0  # every resample keeps all of it
    assert bench.kept_share(base, base, finetuned) == 0.0
    halfway = np.where(np.arange(400) % 2 == 0, finetuned, base)
    want = (halfway.mean() - base.mean()) / (finetuned.mean() - base.mean())
    assert bench.kept_share(halfway, base, finetuned) == pytest.approx(want)
    assert 0 < bench._bootstrap_se(halfway, base, finetuned, 200) < 0.2


def test_embedding_from_the_base_prefix_is_the_whole_forward_pass(minilm_path, tmp_path):
    from safetensors.torch import load_file, save_file

    from weightshare.hub import copy_non_weight_files, inner_model, sentence_encoder

    sentences = ["a", "Return the number of items in the container.", "Open a file.", "x y z w"] * 3
    x = dict(sentence_encoder(minilm_path, trainable_layers=0).preprocess(sentences))
    _, prefix = bench._embed(minilm_path, x, batch=5, capture=True)
    weights = load_file(f"{minilm_path}/model.safetensors")
    for name, changed in (("top", "encoder.layer.5.output.dense.weight"),
                          ("low", "encoder.layer.0.output.dense.weight")):
        copy_non_weight_files(minilm_path, tmp_path / name)
        save_file({**weights, changed: weights[changed] * 1.5}, str(tmp_path / name / "model.safetensors"))
        enc = sentence_encoder(tmp_path / name, trainable_layers=0)
        assert prefix.fits(inner_model(enc)) == (name == "top")
        # a model whose frozen layers differ runs whole; either way, the numbers of the whole forward pass
        assert torch.equal(bench._embed(str(tmp_path / name), x, batch=5, prefix=prefix),
                           bench._embed(str(tmp_path / name), x, batch=5))
