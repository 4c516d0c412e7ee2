"""Co-training (weightshare.merge.cotrain: sync, config, launcher, worker) on real gloo process groups on localhost.

Every multi-process test has a timeout: a process that does not answer in time fails
the test and is killed, never hangs it.
"""

import json
import os
import socket
import time

import pytest
import torch
from torch import nn

SPAWN_TIMEOUT = 120  # seconds for a whole spawned group, start-up included (2 shared cores)


# ------------------------------------------------------------------------------------ a gloo group that may fail


def _entry(fns, rank, world, port, conn):
    import torch.distributed as dist

    import weightshare as ws

    ws.set_progress(False)
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for i, fn in enumerate(fns):
        try:
            result = fn(rank)
        except BaseException as exc:  # noqa: BLE001  (the test reads it)
            result = f"{type(exc).__name__}: {exc}"
        conn.send((i, result))  # synchronous: delivered even if a later fn ends the process
    conn.close()
    os._exit(0)  # no teardown: after a failure the group may wait on a dead peer


def start(fns, world: int = 2):
    """Start ``world`` spawned gloo processes, each running ``fn(rank)`` for every fn in ``fns`` in turn."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs, readers = [], {}
    for r in range(world):
        recv, send = ctx.Pipe(duplex=False)
        procs.append(ctx.Process(target=_entry, args=(fns, r, world, port, send), daemon=True))
        procs[-1].start()
        send.close()
        readers[recv] = r
    return procs, readers


def collect(started, expect, timeout: float = SPAWN_TIMEOUT) -> dict:
    """{(rank, i): fns[i](rank)} for the keys in ``expect``; every process is gone on return (those
    still running once the expected answers are in are killed at once)."""
    from multiprocessing.connection import wait

    procs, readers = started
    results = {}
    deadline = time.monotonic() + timeout
    try:
        while not set(expect) <= set(results) and readers and time.monotonic() < deadline:
            for conn in wait(list(readers), timeout=max(0.1, deadline - time.monotonic())):
                try:
                    i, value = conn.recv()
                    results[(readers[conn], i)] = value
                except EOFError:  # that process ended
                    del readers[conn]
    finally:
        for p in procs:
            p.join(timeout=max(0.0, min(15.0, deadline - time.monotonic())))
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    missing = set(expect) - set(results)
    assert not missing, f"no answer from (rank, fn) {sorted(missing)} within {timeout} s"
    return results


# ------------------------------------------------------------------------------------ models and data


class Net(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.inp = nn.Linear(6, width)
        self.mid = nn.Linear(width, width)
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.mid(torch.tanh(self.inp(x)))))


SHARED = {"inp.*": "proj.*", "out.weight": "head.weight"}  # mid.* and out.bias stay each worker's own


def net(width: int = 8) -> Net:
    torch.manual_seed(0)
    return Net(width)


def rank_data(rank: int, n: int = 48):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(n, 6, generator=g)
    return x, (x[:, 0] + x[:, 1] * (rank + 1) > 0).long() + (x[:, 2] > 1).long()


def shared_of(model: Net) -> dict:
    return {"inp.weight": model.inp.weight, "inp.bias": model.inp.bias, "out.weight": model.out.weight}


def unshared_of(model: Net) -> dict:
    return {"mid.weight": model.mid.weight, "mid.bias": model.mid.bias, "out.bias": model.out.bias}


def numpy_state(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------ the gloo scenarios


def _scenarios(rank: int) -> dict:
    import torch.distributed as dist

    from weightshare.merge.cotrain import CoTrainer, OuterSGD
    from weightshare.multitask.trainer import TrainConfig, train

    world = dist.get_world_size()
    x, y = rank_data(rank)
    out = {}

    # 1. H = 1, plain full-batch SGD: averaging the shared weights after each step ...
    steps = 5
    a = net()
    ct = CoTrainer(a, SHARED, every=1, steps=steps, timeout=30)
    train(a, x, y, TrainConfig(epochs=steps, optimizer="gd", lr=0.2), on_step=ct.step)
    out["weights_avg"] = numpy_state(a)
    # ... against averaging the shared gradients (all-reduce SUM / world) before each step
    b = net()
    opt = torch.optim.SGD(b.parameters(), lr=0.2)
    shared_b = set(map(id, shared_of(b).values()))
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(b(x), y).backward()
        for p in b.parameters():
            if id(p) in shared_b:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad /= world
        opt.step()
    out["grads_avg"] = numpy_state(b)

    # 2. DiLoCo with outer SGD lr 1, no momentum, against plain averaging (Adam inside, H = 3, 7 steps)
    states = {}
    for name, outer in (("plain", None), ("diloco_lr1", OuterSGD(lr=1.0, momentum=0.0))):
        m = net()
        ct = CoTrainer(m, SHARED, every=3, outer=outer, steps=7, timeout=30)
        train(m, x, y, TrainConfig(epochs=7, optimizer="adam", lr=0.05, batch_size=None), on_step=ct.step)
        states[name] = numpy_state(m)
        out[f"{name}_syncs"] = ct.syncs
    out["plain"], out["diloco_lr1"] = states["plain"], states["diloco_lr1"]

    # 3. After each sync: shared tensors bit-identical across ranks, unshared ones untouched; bytes
    for name, outer in (("plain", None), ("nesterov", OuterSGD(lr=0.7, momentum=0.9))):
        m = net()
        ct = CoTrainer(m, SHARED, every=2, outer=outer, timeout=30)
        snapshots, untouched = [], []
        sync = ct.sync

        def spy():
            before = {k: v.detach().clone() for k, v in unshared_of(m).items()}
            sync()
            untouched.append(all(torch.equal(before[k], v) for k, v in unshared_of(m).items()))
            snapshots.append({k: v.detach().numpy().copy() for k, v in shared_of(m).items()})

        ct.sync = spy
        train(m, x, y, TrainConfig(epochs=3, optimizer="adam", lr=0.05, batch_size=16), on_step=ct.step)  # 9 steps
        ct.finish()  # the 9th step: one more sync
        out[f"{name}_snapshots"], out[f"{name}_untouched"] = snapshots, untouched
        out[f"{name}_stats"] = ct.stats()
        out[f"{name}_payload"] = ct.payload_bytes

    # 4. Bad input: shared subsets that differ in shape, in names, in H: the same error on every rank
    for case in ("shape", "names", "every"):
        m = net(16 if case == "shape" and rank == world - 1 else 8)
        shared = {"inp.*": "proj.*"} if case == "names" and rank == 0 else SHARED
        try:
            CoTrainer(m, shared, every=2 if case == "every" and rank == 1 else 1, timeout=30)
            out[f"error_{case}"] = None
        except ValueError as exc:
            out[f"error_{case}"] = str(exc)
    return out


def _faults(rank: int) -> dict:
    """The last rank stalls past the timeout, then (in a new co-training group) dies; the others report."""
    import torch.distributed as dist

    from weightshare.merge.cotrain import CoTrainer, CoTrainError

    last = rank == dist.get_world_size() - 1
    out = {}
    for mode in ("stalls", "dies"):
        dist.barrier()  # the default group (no short timeout): all meet again before the next case
        ct = CoTrainer(net(), SHARED, every=1, timeout=2)
        out[mode] = {"step": None}
        for step in range(1, 6):
            if last and step == 3:
                if mode == "dies":
                    os._exit(7)  # a crash, no goodbye
                time.sleep(6)  # a hung worker; then it leaves this group for the next case
                break
            t0 = time.monotonic()
            try:
                ct.step()
            except CoTrainError as exc:
                out[mode] = {"step": step, "error": str(exc), "seconds": time.monotonic() - t0, "syncs": ct.syncs}
                break
    return out


@pytest.fixture(scope="module")
def gloo3():
    """Three gloo processes: every scenario, then the faults (after which the last rank is gone)."""
    got = collect(start([_scenarios, _faults], world=3), expect=[(0, 0), (1, 0), (2, 0), (0, 1), (1, 1)])
    return {r: got[(r, 0)] for r in range(3)}, {r: got[(r, 1)] for r in range(2)}


def test_h1_sgd_weight_averaging_equals_gradient_averaging(gloo3):
    gloo3 = gloo3[0]
    for rank, r in gloo3.items():
        assert isinstance(r, dict), r
        for k in r["grads_avg"]:
            assert torch.allclose(torch.from_numpy(r["weights_avg"][k]), torch.from_numpy(r["grads_avg"][k]),
                                  atol=1e-6, rtol=0), (rank, k)
    # the unshared parameters trained on each rank's own data: they differ across ranks
    assert not torch.equal(torch.from_numpy(gloo3[0]["weights_avg"]["mid.weight"]),
                           torch.from_numpy(gloo3[1]["weights_avg"]["mid.weight"]))


def test_diloco_outer_sgd_lr1_without_momentum_equals_plain_averaging(gloo3):
    gloo3 = gloo3[0]
    for rank, r in gloo3.items():
        assert r["plain_syncs"] == r["diloco_lr1_syncs"] == 3  # at steps 3, 6 and the last, 7
        for k in r["plain"]:
            assert torch.allclose(torch.from_numpy(r["plain"][k]), torch.from_numpy(r["diloco_lr1"][k]),
                                  atol=1e-6, rtol=0), (rank, k)


@pytest.mark.parametrize("name", ["plain", "nesterov"])
def test_shared_bit_identical_after_every_sync_and_unshared_untouched(gloo3, name):
    gloo3 = gloo3[0]
    snaps = {rank: r[f"{name}_snapshots"] for rank, r in gloo3.items()}
    assert len(snaps[0]) == 5  # syncs after steps 2, 4, 6, 8 and the finish after 9
    for i in range(5):
        for k in snaps[0][i]:
            for rank in (1, 2):
                assert (snaps[rank][i][k] == snaps[0][i][k]).all() and snaps[rank][i][k].tobytes() == \
                    snaps[0][i][k].tobytes(), (name, i, k, rank)
    for r in gloo3.values():
        assert r[f"{name}_untouched"] == [True] * 5


@pytest.mark.parametrize("name", ["plain", "nesterov"])
def test_bytes_sent_are_shared_elements_times_element_size_times_syncs(gloo3, name):
    gloo3 = gloo3[0]
    shared_elements = 8 * 6 + 8 + 3 * 8  # inp.weight, inp.bias, out.weight
    for r in gloo3.values():
        s = r[f"{name}_stats"]
        assert s["shared_params"] == shared_elements and s["shared_tensors"] == 3 and s["syncs"] == 5
        assert r[f"{name}_payload"] == shared_elements * 4
        assert s["bytes_sent"] == shared_elements * 4 * 5
        assert s["ring_bytes_sent"] == pytest.approx(s["bytes_sent"] * 2 * (3 - 1) / 3)  # what a ring sends per rank
        assert s["bytes_broadcast"] == shared_elements * 4  # rank 0's initial values, once


def test_mismatched_subsets_fail_on_every_rank_with_the_same_message(gloo3):
    gloo3 = gloo3[0]
    for case in ("shape", "names", "every"):
        messages = {r[f"error_{case}"] for r in gloo3.values()}
        assert len(messages) == 1 and None not in messages, (case, messages)
    shape = gloo3[0]["error_shape"]
    assert ("'proj.weight': shapes differ" in shape and "'inp.weight' (8, 6)" in shape
            and "'inp.weight' (16, 6)" in shape)
    assert "rank 0 Net" in shape and "rank 2 Net" in shape
    assert "'head.weight'" in shape  # out.weight (3, 8) against (3, 16): every mismatch, at once
    assert "'head.weight' is held by rank(s) [1, 2]" in gloo3[0]["error_names"] and "not by rank(s) [0]" in \
        gloo3[0]["error_names"]
    assert "every differs across workers: rank 0 1, rank 1 2, rank 2 1" in gloo3[0]["error_every"]


def test_a_worker_that_stalls_or_dies_makes_the_others_stop_with_a_clear_error(gloo3):
    for rank, faults in gloo3[1].items():
        assert isinstance(faults, dict), faults
        for mode, g in faults.items():
            assert g["step"] == 3 and g["syncs"] == 2, (rank, mode, g)
            assert f"rank {rank} of 3 could not complete sync 3" in g["error"]
            assert "a worker stopped (crashed or was killed) or did not arrive within 2 s" in g["error"]
        assert 1.5 < faults["stalls"]["seconds"] < 15  # a hung worker: the timeout
        assert faults["dies"]["seconds"] < 2  # the connection drops: no need to wait for the timeout


# ------------------------------------------------------------------------------------ the library, one process


def test_shared_names_maps_patterns_with_their_stars():
    from weightshare.merge.cotrain import shared_names

    assert shared_names(Net(), SHARED) == {"inp.weight": "proj.weight", "inp.bias": "proj.bias",
                                           "out.weight": "head.weight"}
    assert shared_names(Net(), {"*.bias": "b.*"}) == {"inp.bias": "b.inp", "mid.bias": "b.mid", "out.bias": "b.out"}


def test_shared_names_reports_every_problem_at_once():
    from weightshare.merge.cotrain import shared_names

    with pytest.raises(ValueError) as e:
        shared_names(Net(), {"enc.*": "x.*", "inp.*": "proj.*", "*.weight": "w.*", "out.bias": "one", "mid.bias": "one",
                             "mid.weight": "*"})
    msg = str(e.value)
    assert "'enc.*' matches no parameter of the Net (it has: inp.weight, inp.bias, mid.weight" in msg
    assert "parameter 'inp.weight' is matched by two patterns ('inp.*' and '*.weight')" in msg
    assert "parameters 'out.bias' and 'mid.bias' both map to the shared name 'one'" in msg
    assert "'mid.weight': '*': the shared name has more '*' than the pattern" in msg
    with pytest.raises(ValueError, match="non-empty map"):
        shared_names(Net(), {})


def test_cotrainer_needs_a_process_group_and_sane_arguments():
    from weightshare.merge.cotrain import CoTrainer, OuterSGD

    with pytest.raises(ValueError, match="initialised torch.distributed process group"):
        CoTrainer(Net(), SHARED)
    with pytest.raises(ValueError, match="every"):
        CoTrainer(Net(), SHARED, every=0)
    with pytest.raises(ValueError, match="momentum"):
        OuterSGD(momentum=1.0)


def test_the_readme_names_reach_the_package():
    """README, Co-training: ``weightshare.merge.cotrain.CoTrainer`` and ``torchrun -m weightshare.cotrain``."""
    import weightshare.cotrain as entry
    from weightshare.merge import cotrain
    from weightshare.merge.cotrain.sync import CoTrainer, CoTrainError, OuterSGD, shared_names

    assert (CoTrainer, CoTrainError, OuterSGD, shared_names) == (cotrain.CoTrainer, cotrain.CoTrainError,
                                                                 cotrain.OuterSGD, cotrain.shared_names)
    assert entry.main is cotrain.main


def test_train_calls_on_step_after_every_step():
    from weightshare.multitask.trainer import TrainConfig, train

    seen = []
    x, y = rank_data(0)
    train(Net(), x, y, TrainConfig(epochs=2, batch_size=20), on_step=seen.append)
    assert seen == [1, 2, 3, 4, 5, 6]  # 48 rows in batches of 20: 3 steps an epoch


def test_bench_models_share_the_projection_and_head_shapes():
    from weightshare.bench.cotrain import SHARED as BENCH_SHARED
    from weightshare.merge.cotrain import shared_names
    from weightshare.merge.cotrain.zoo import MODELS, digits_parts

    cnn, gru = MODELS["cnn"](32), MODELS["gru"](32)
    shapes = [{s: tuple(dict(m.named_parameters())[n].shape) for n, s in shared_names(m, BENCH_SHARED).items()}
              for m in (cnn, gru)]
    assert shapes[0] == shapes[1] == {"proj.weight": (32, 8), "proj.bias": (32,), "head.weight": (10, 32),
                                      "head.bias": (10,)}
    x = torch.rand(5, 64)
    assert cnn(x).shape == gru(x).shape == (5, 10)
    parts, (xte, _) = digits_parts(2, 0)
    assert len(parts[0][0]) + len(parts[1][0]) + len(xte) == 1797


# ------------------------------------------------------------------------------------ the config


GOOD = {"sync_every": 2, "seeds": [0], "timeout": 30,
        "workers": [{"model": "cnn", "width": 8, "shared": {"proj.*": "proj.*", "head.*": "head.*"},
                     "train": {"epochs": 1, "batch_size": 64}},
                    {"model": "gru", "width": 8, "shared": {"proj.*": "proj.*", "head.*": "head.*"},
                     "train": {"epochs": 1, "batch_size": 64}}]}


def write(tmp_path, cfg, name="c.yaml"):
    import yaml

    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_a_good_config_reads_with_its_defaults(tmp_path):
    from weightshare.merge.cotrain import check, read_config

    cfg = read_config(write(tmp_path, {**GOOD, "outer": {"lr": 0.5}}))
    assert cfg.sync_every == 2 and cfg.outer.lr == 0.5 and cfg.outer.momentum == 0.9 and cfg.outer.nesterov
    assert (cfg.workers[1].model == "gru" and cfg.workers[1].train.optimizer == "adam"
            and cfg.workers[1].train.lr == 0.003)
    assert cfg.test_size == 0.25 and not cfg.compare_alone and cfg.results is None
    check(cfg, 2)


def test_the_docstring_example_config_is_valid():
    import yaml

    from weightshare.merge.cotrain import config as ct

    example = ct.__doc__.split("Example::")[1].split("A worker naming a model directory")[0]
    cfg = ct.parse_config(yaml.safe_load(example))
    assert cfg.outer.lr == 0.7 and len(cfg.workers) == 2 and cfg.seeds == [0, 1, 2]


def test_config_problems_are_reported_at_once_unknown_keys_by_name(tmp_path):
    from weightshare.merge.cotrain import read_config

    bad = {"sync_evry": 2, "seeds": "0", "test_size": 2, "outer": {"lr": -1, "beta": 1},
           "workers": [{"model": "resnet", "shared": {"proj.*": "proj.*"}, "train": {"lr": "fast", "epoch": 3}},
                       {"model": "gru", "width": 0}]}
    with pytest.raises(ValueError) as e:
        read_config(write(tmp_path, bad))
    msg = str(e.value)
    for part in ("sync_evry: unknown key (did you mean 'sync_every'?)", "sync_every: missing (required)",
                 "seeds: expected a non-empty list", "test_size: expected a fraction in [0.05, 0.5], got 2",
                 "outer.beta: unknown key", "outer.lr: expected a number > 0, got -1",
                 "workers[0].model: expected a built-in model (cnn, gru) or a model directory (none found there), "
                 "got 'resnet'",
                 "workers[0].train.epoch: unknown key (did you mean 'epochs'?)",
                 "workers[0].train.lr: expected a number > 0, got 'fast'",
                 "workers[1].shared: missing (required)", "workers[1].width: expected an integer in 1..4096, got 0"):
        assert part in msg, part
    assert "11 problems" in msg


def test_config_file_errors(tmp_path):
    from weightshare.merge.cotrain import read_config

    path = tmp_path / "bad.yaml"
    path.write_text("workers: [\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        read_config(str(path))
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected: a mapping"):
        read_config(str(path))
    with pytest.raises(ValueError, match="workers: missing"):
        read_config(write(tmp_path, {"sync_every": 1}))
    with pytest.raises(OSError):
        read_config(str(tmp_path / "missing.yaml"))


def test_check_resolves_the_shared_subsets_before_anything_runs(tmp_path):
    from weightshare.merge.cotrain import check, read_config

    cfg = {**GOOD, "workers": [dict(GOOD["workers"][0], width=16, shared={"proj.*": "proj.*", "head.*": "head.*",
                                                                          "encoder.*": "enc.*"}),
                               GOOD["workers"][1]]}
    with pytest.raises(ValueError) as e:
        check(read_config(write(tmp_path, cfg)), 2)
    msg = str(e.value)
    assert ("workers[0].shared: " in msg
            and "'encoder.*' matches no parameter of the DigitsCNN (it has: proj.weight" in msg)
    cfg["workers"][0]["shared"] = GOOD["workers"][0]["shared"]
    with pytest.raises(ValueError) as e:
        check(read_config(write(tmp_path, cfg)), 2)
    assert "shared name 'proj.weight': shapes differ: workers[0] cnn 'proj.weight' (16, 8) vs workers[1] gru " \
           "'proj.weight' (8, 8)" in str(e.value)
    with pytest.raises(ValueError, match="2 workers for 3 processes"):
        check(read_config(write(tmp_path, GOOD)), 3)
    uneven = {**GOOD, "workers": [GOOD["workers"][0], dict(GOOD["workers"][1], train={"epochs": 2})]}
    with pytest.raises(ValueError, match=r"the workers take \[11, 22\] steps"):
        check(read_config(write(tmp_path, uneven)), 2)


def test_entry_point_outside_torchrun_says_how_to_launch(capsys, monkeypatch):
    from weightshare.merge.cotrain import main

    monkeypatch.delenv("RANK", raising=False)
    assert main(["whatever.yaml"]) == 2
    assert "torchrun --nproc_per_node N -m weightshare.cotrain CONFIG" in capsys.readouterr().err


def test_launch_refuses_a_bad_config_before_starting_anything(tmp_path):
    from weightshare.merge.cotrain import launch

    with pytest.raises(ValueError, match="2 workers for 3 processes"):
        launch(write(tmp_path, GOOD), nproc=3)


def test_launch_runs_torchrun_and_rank_0_reports(tmp_path, capfd):
    from weightshare.merge.cotrain import launch

    results = tmp_path / "r.json"
    code = launch(write(tmp_path, {**GOOD, "results": str(results), "compare_alone": True}), nproc=2, timeout=180)
    out, err = capfd.readouterr()
    assert code == 0, err[-2000:]
    assert out.count("co-training, 2 workers, sync every 2 steps") == 1  # rank 0 only
    got = json.loads(results.read_text())
    assert [w["model"] for w in got["workers"]] == ["cnn", "gru"]
    for w in got["workers"]:
        s = w["seeds"][0]
        assert s["syncs"] == 6 and s["shared_params"] == 8 * 8 + 8 + 10 * 8 + 10  # 11 steps: 2, 4, .., 10, 11
        assert s["bytes_sent"] == s["shared_params"] * 4 * s["syncs"]
        assert 0 < s["acc"] <= 1 and 0 < s["acc_alone"] <= 1
