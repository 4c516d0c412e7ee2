"""Multi-task training: every method trains on digits; Δp; folds; bad input."""

import pytest
import torch
from torch import nn

from weightshare.multitask import METHODS, MultiTaskModel, TrainConfig, delta_p, fit


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    return x, {"digit": y, "parity": y % 2, "large": (y >= 5).long()}


def factory():
    trunk = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
    return MultiTaskModel(trunk, {"digit": nn.Linear(64, 10), "parity": nn.Linear(64, 2), "large": nn.Linear(64, 2)})


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_three_tasks_on_digits(digits, method):
    x, targets = digits
    result = fit(factory, x, targets, method=method, config=TrainConfig(epochs=8, batch_size=128, lr=3e-3))
    acc = result.metrics
    assert acc["digit"] > 0.8 and acc["parity"] > 0.8 and acc["large"] > 0.8, acc
    assert result.seconds_per_epoch > 0


def test_cross_validation_uses_stratified_folds(digits):
    x, targets = digits
    result = fit(factory, x, targets, method="ew", config=TrainConfig(epochs=3, lr=3e-3), cv=3)
    assert len(result.folds) == 3 and set(result.metrics) == {"digit", "parity", "large"}


def test_training_is_deterministic_with_a_seed(digits):
    x, targets = digits
    runs = [fit(factory, x, targets, method="pcgrad", config=TrainConfig(epochs=2, lr=3e-3, seed=4)).metrics
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_delta_p_is_the_mean_relative_improvement():
    assert delta_p({"a": 0.9, "b": 0.5}, {"a": 0.9, "b": 0.5}) == 0.0
    assert delta_p({"a": 0.99, "b": 0.5}, {"a": 0.9, "b": 0.5}) == pytest.approx(5.0)  # (+10 % + 0) / 2
    assert delta_p({"err": 0.1}, {"err": 0.2}, higher_is_better={"err": False}) == pytest.approx(50.0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="magic"), "expected one of: .*aligned_mtl.*uw"),
    (dict(targets={"digit": torch.zeros(3, dtype=torch.long)}), "3 labels for 1797 inputs"),
])
def test_bad_input_is_named(digits, kwargs, match):
    x, targets = digits
    args = dict(method="ew", targets=targets)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fit(factory, x, args.pop("targets"), config=TrainConfig(epochs=1), **args)


def test_heads_that_do_not_fit_the_labels_or_the_tasks_are_named(digits):
    x, targets = digits
    wrong = lambda: MultiTaskModel(nn.Linear(64, 8), {"digit": nn.Linear(8, 3), "parity": nn.Linear(8, 2),  # noqa: E731
                                                      "large": nn.Linear(8, 2)})
    with pytest.raises(ValueError, match="head 'digit' does not match its labels"):
        fit(wrong, x, targets, config=TrainConfig(epochs=1))
    with pytest.raises(ValueError, match="heads .* are not the tasks"):
        fit(factory, x, {"digit": targets["digit"]}, config=TrainConfig(epochs=1))


class TokenTrunk(nn.Module):
    """A stand-in for a transformer: reads {"input_ids", "attention_mask"}, mean-pools embeddings."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64 * 17, 16)
        self.widths = []

    def forward(self, batch):
        self.widths.append(batch["input_ids"].shape[1])
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return {"sentence_embedding": (self.emb(batch["input_ids"]) * mask).sum(1) / mask.sum(1)}


def test_tokenizer_output_is_batched_and_cut_to_each_batch_longest_row(digits):
    # digits as "sentences": token i of a row says "pixel i has value v" (64 x 17 words), rows cut to varying lengths
    x, targets = digits
    ids = (x * 16).round().long() + 17 * torch.arange(64)
    lengths = torch.randint(40, 65, (len(ids),), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(64)[None] < lengths[:, None]).long()
    inputs = {"input_ids": ids * mask, "attention_mask": mask, "modality": "text"}
    trunks = []

    def make():
        trunks.append(TokenTrunk())
        return MultiTaskModel(trunks[-1], {"parity": nn.Linear(16, 2), "large": nn.Linear(16, 2)})

    rows = torch.arange(800)  # enough to learn from, few enough to keep the test quick
    result = fit(make, {k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()},
                 {"parity": targets["parity"][rows], "large": targets["large"][rows]}, "upgrad",
                 TrainConfig(epochs=8, batch_size=64, lr=3e-2))
    assert result.metrics["parity"] > 0.8 and result.metrics["large"] > 0.8, result.metrics
    widths = trunks[0].widths
    # every batch was cut to its own longest row: never wider, and narrower than 64 for some batch
    assert max(widths) <= 64 and min(widths) < 64


def test_unlabelled_rows_cost_nothing_and_are_not_scored(digits):
    from weightshare.multitask import IGNORE
    from weightshare.multitask.trainer import fold_splits

    x, targets = digits
    partial = targets["parity"].clone()
    partial[torch.arange(len(x)) % 3 != 0] = IGNORE
    tasks = {"digit": targets["digit"], "parity": partial}
    small = lambda: MultiTaskModel(nn.Linear(64, 32), {"digit": nn.Linear(32, 10), "parity": nn.Linear(32, 2)})  # noqa: E731
    models = []

    def make():
        models.append(small())
        return models[-1]

    # one full-batch SGD step equals the step on CE(digit) + CE(parity over its labelled rows only)
    fit(make, x, tasks, "ew", TrainConfig(epochs=1, optimizer="gd", lr=0.5, seed=2))
    train_idx, test_idx = (torch.as_tensor(i) for i in fold_splits(targets["digit"], None, 0.2, 2)[0])
    torch.manual_seed(2)
    ref = small()
    out = ref(x[train_idx])
    labelled = train_idx[partial[train_idx] != IGNORE]
    loss = nn.functional.cross_entropy(out["digit"], targets["digit"][train_idx]) + nn.functional.cross_entropy(
        ref(x[labelled])["parity"], partial[labelled])
    loss.backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.5 * p.grad
    for a, b in zip(models[0].parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)
    # scored on labelled held-out rows only: the accuracy is a multiple of 1 / (labelled held-out rows)
    r = fit(small, x, tasks, "ew", TrainConfig(epochs=2, lr=3e-3, seed=2))
    n = int((partial[test_idx] != IGNORE).sum())
    assert abs(r.metrics["parity"] * n - round(r.metrics["parity"] * n)) < 1e-9 and n < len(test_idx)


def test_batches_without_a_task_label_train_without_nan(digits):
    from weightshare.multitask import IGNORE

    x, targets = digits
    few = torch.full_like(targets["parity"], IGNORE)
    few[::40] = targets["parity"][::40]  # ~45 labelled rows: most batches of 16 have no parity label at all
    r = fit(factory, x, {"digit": targets["digit"], "parity": few, "large": targets["large"]}, "pcgrad",
            TrainConfig(epochs=1, batch_size=16, lr=3e-3))
    assert 0 <= r.metrics["parity"] <= 1


def test_a_task_with_no_labelled_samples_in_a_fold_is_named(digits):
    from weightshare.multitask import IGNORE

    x, targets = digits
    sparse = torch.full_like(targets["parity"], IGNORE)
    sparse[:3] = targets["parity"][:3]  # three labelled rows cannot reach the held-out side of five folds
    with pytest.raises(ValueError, match="task 'parity' has no labelled samples in the .* part of fold"):
        fit(factory, x, {"digit": targets["digit"], "parity": sparse, "large": targets["large"]}, "ew",
            TrainConfig(epochs=1), cv=5)


def test_explicit_splits_and_kept_models_reproduce_the_reported_accuracy(digits):
    from weightshare.multitask import evaluate

    x, targets = digits
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(3))
    splits = [(idx[:1200], idx[1200:]), (idx[600:], idx[:600])]
    r = fit(factory, x, targets, "ew", TrainConfig(epochs=2, lr=3e-3), cv=splits, keep_models=True)
    assert len(r.models) == 2 and [len(t) for _, t in r.splits] == [597, 600]
    for model, (_, test), fold in zip(r.models, splits, r.folds):
        assert evaluate(model, x, targets, test) == fold
    with pytest.raises(ValueError, match="index arrays in 0..1796"):
        fit(factory, x, targets, "ew", TrainConfig(epochs=1), cv=[(idx[:10], torch.tensor([5000]))])
