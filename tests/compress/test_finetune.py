"""Table fine-tuning by distillation: only the tables move, the held-out loss falls, and what is kept
is what the packed file stores."""

import copy

import pytest
import torch

import weightshare as ws
from weightshare.compress import is_compressible
from weightshare.compress.calibrate import text_batches
from weightshare.compress.finetune import FinetuneConfig, finetune_tables_, learning_rate
from weightshare.corpus import calibration_sentences
from weightshare.sharing.codebook import table_parameters


@pytest.fixture(scope="module")
def minilm(minilm_path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_path, device="cpu")


def test_tables_alone_learn_and_the_best_rounded_tables_are_kept(minilm):
    original = minilm[0].auto_model
    student = copy.deepcopy(original)
    ws.set_progress(False)
    ws.share_(student, ws.CodebookConfig(bits=2), filter_fn=is_compressible)  # data-free 2-bit: much to recover
    tables = table_parameters(student)
    assert len(tables) == 37 + 3  # 37 Linears; word, position and token-type embeddings
    before = {n: t.detach().clone() for n, t in student.named_parameters()}
    labels = {n: b.clone() for n, b in student.named_buffers() if n.endswith("codes")}
    batches = text_batches(minilm.tokenizer, calibration_sentences(40), batch_size=8, max_length=64)
    r = finetune_tables_(student, original, batches, bits=2, config=FinetuneConfig(steps=30, batch_size=8, holdout=0.2))
    assert r["holdout_loss_after"] < 0.9 * r["holdout_loss_before"]  # measured ~0.75x in 30 steps
    assert r["lr"] == learning_rate(2) > learning_rate(3) > learning_rate(4)
    table_ids = {id(t) for t in tables}
    for name, p in student.named_parameters():
        if id(p) in table_ids:
            assert torch.equal(p, p.half().float())  # rounded as the file stores them
        else:
            assert torch.equal(p, before[name]), name  # LayerNorm, biases: untouched
        assert p.requires_grad  # as it was before training
    assert any(not torch.equal(t, before[n]) for n, t in student.named_parameters() if id(t) in table_ids)
    for n, b in student.named_buffers():
        if n in labels:
            assert torch.equal(b, labels[n])  # labels frozen


def test_model_without_codebooks_is_refused(minilm):
    batches = text_batches(minilm.tokenizer, calibration_sentences(4))
    with pytest.raises(ValueError, match="no codebook tables"):
        finetune_tables_(minilm[0].auto_model, minilm[0].auto_model, batches, bits=4)
    with pytest.raises(ValueError, match="FinetuneConfig.holdout"):
        FinetuneConfig(holdout=1.5)


def test_norms_option_trains_layernorms_unrounded_and_nothing_else(minilm):
    original = minilm[0].auto_model
    student = copy.deepcopy(original)
    ws.set_progress(False)
    ws.share_(student, ws.CodebookConfig(bits=2), filter_fn=is_compressible)
    norm_ids = {id(p) for m in student.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
    table_ids = {id(t) for t in table_parameters(student)}
    before = {n: t.detach().clone() for n, t in student.named_parameters()}
    batches = text_batches(minilm.tokenizer, calibration_sentences(40), batch_size=8, max_length=64)
    r = finetune_tables_(student, original, batches, bits=2,
                         config=FinetuneConfig(steps=30, batch_size=8, holdout=0.2, norms=True))
    assert r["holdout_loss_after"] < r["holdout_loss_before"]
    moved = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    by_name = dict(student.named_parameters())
    assert any(id(by_name[n]) in norm_ids for n in moved)  # LayerNorms learned
    assert all(id(by_name[n]) in norm_ids | table_ids for n in moved)  # biases and the rest did not move
    assert any(not torch.equal(by_name[n], by_name[n].half().float()) for n in moved if id(by_name[n]) in norm_ids)
