"""``weightshare compress --train``: training-time sharing by distillation on the calibration texts, frozen and
packed; the recipe it writes makes it again; bad combinations refused in the flags' words."""

import copy

import numpy as np
import pytest
import torch

import weightshare as ws
from tests.conftest import write_tiny_bert
from weightshare.cli import main
from weightshare.compress import compress, is_compressible
from weightshare.compress.recipe import read_recipe
from weightshare.sharing.codebook import CodebookConfig

WORDS = 60


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer BERT with seeded random weights, a word-level tokenizer and calibration texts of its words."""
    path = write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), WORDS, hidden=32)
    rng = np.random.default_rng(0)
    texts = [" ".join(f"w{i}" for i in rng.integers(0, WORDS, size=rng.integers(4, 12))) for _ in range(96)]
    (path / "calibration.txt").write_text("\n".join(texts) + "\n")
    return path


@pytest.mark.parametrize("mode", ["dkm", "recluster", "soft"])
def test_training_beats_the_one_shot_start_and_the_packed_file_computes_the_trained_model(tiny_bert, tmp_path, mode):
    out = tmp_path / "p"
    model, rep, _ = compress(tiny_bert, out, CodebookConfig(bits=2, train=mode), calibration=tiny_bert /
                             "calibration.txt", finetune_steps=0, epochs=4)
    stats = model._weightshare_training
    assert stats["steps"] == 4 * 6  # 84 training texts (12 held out) in batches of 16
    assert stats["holdout_loss_after"] < stats["holdout_loss_before"]  # better than the one-shot k-means it began as
    one_shot = ws.hub.inner_model(ws.hub.load_pretrained(tiny_bert))
    ws.share_(one_shot, CodebookConfig(bits=2), filter_fn=is_compressible)
    assert rep.bytes_packed == ws.report(one_shot).bytes_packed  # the same codebooks' size as one-shot clustering
    loaded = ws.hub.inner_model(ws.load(out, trainable=True))  # parametrized form: F.linear on the decoded weights
    ids = torch.tensor([[3, 7, 9, 11, 2], [5, 5, 40, 2, 1]])
    mask = (ids != 1).long()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = loaded(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(got, want)
    recipe = read_recipe(out / "weightshare_recipe.yml")  # what made it, as a recipe --recipe takes
    assert recipe.config["train"] == mode and recipe.settings["epochs"] == 4


def test_the_command_line_trains_prints_the_held_out_losses_and_packs(tiny_bert, tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["compress", str(tiny_bert), "--bits", "2", "--calibration", str(tiny_bert / "calibration.txt"),
                 "--train", "dkm", "--epochs", "2", "--finetune-steps", "20", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "trained with sharing (dkm): 12 steps over 2 epochs" in printed and "(frozen)" in printed
    assert (out / "weightshare.safetensors").exists()


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--train", "dkm", "--data-free"], "--train dkm learns from calibration texts: drop --data-free"),
        (["--train", "dkm", "--epochs", "0"], "--epochs 0: expected 1 or more"),
        (["--train", "soft", "--avg-bits", "2.4"], "--train soft: one width for every layer only"),
    ],
)
def test_bad_training_flags_get_one_clear_error_and_write_nothing(tiny_bert, tmp_path, capsys, extra, match):
    args = ["--quiet", "compress", str(tiny_bert), "--bits", "2", "--calibration",
            str(tiny_bert / "calibration.txt"), *extra, "--out", str(tmp_path / "o")]
    if "--data-free" in extra:
        args.remove("--calibration")
        args.remove(str(tiny_bert / "calibration.txt"))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("mode", ["dkm", "recluster", "soft"])
def test_the_frozen_view_computes_what_freeze_keeps_and_leaves_the_model_as_it_was(tiny_bert, mode):
    from weightshare.training import freeze_
    from weightshare.training.base import frozen_view

    model = ws.hub.inner_model(ws.hub.load_pretrained(tiny_bert))
    with torch.no_grad():  # move the latent weights off their k-means start, as training would
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ws.share_(model, CodebookConfig(bits=2, train=mode, dkm_temperature=0.5), filter_fn=is_compressible)
    ids = torch.tensor([[3, 7, 9, 11, 2], [5, 5, 40, 2, 1]])
    with torch.no_grad():
        training = model(input_ids=ids).last_hidden_state
        with frozen_view(model):
            viewed = model(input_ids=ids).last_hidden_state
        assert torch.equal(model(input_ids=ids).last_hidden_state, training)  # the view leaves nothing behind
        freeze_(model)
        assert torch.equal(model(input_ids=ids).last_hidden_state, viewed)
    assert torch.equal(viewed, training) == (mode == "recluster")  # re-clustering trains the merged weights as such


def test_distillation_anneals_an_unannealed_dkm_to_the_share_it_is_given_over_its_steps(tiny_bert):
    from weightshare.compress.calibrate import text_batches
    from weightshare.compress.finetune import DistillConfig, distill_
    from weightshare.training import training_sharing

    source = ws.hub.load_pretrained(tiny_bert)
    model, original = ws.hub.inner_model(source), copy.deepcopy(ws.hub.inner_model(source))
    ws.share_(model, CodebookConfig(bits=2, train="dkm", dkm_temperature=0.2), filter_fn=is_compressible)
    parts = [plist[0] for _, _, plist in training_sharing(model)]
    seen = []
    batches = text_batches(ws.hub.tokenizer_of(source), (tiny_bert / "calibration.txt").read_text().split("\n")[:-1])
    stats = distill_(model, original, batches, DistillConfig(epochs=2, dkm_final=0.25),
                     on_step=lambda k: seen.append([p.temperature for p in parts]))
    assert len(seen) == stats["steps"] == 12
    assert all(t == pytest.approx(0.2 * 0.25) for t in seen[-1])  # the run's last step ends at the given share
    assert all(t == pytest.approx(0.2 * 0.25 ** (1 / 12)) for t in seen[0])
