"""Property-based fuzzing of the packed-model format as a security boundary.

DESIGN.md section 4: "A packed model is untrusted input".  Each example takes a real
packed directory (a plain nn.Module, one with a tied weight, a Hugging Face BERT),
mutates its ``weightshare.safetensors`` (the spec JSON in the metadata, the safetensors
header, or raw bytes; see tests/fuzz_helpers.py) and calls ``read_spec``, ``ws.load``
and (for the BERT model) ``ws.export`` on it.  For every call:

(a) it succeeds or raises ``weightshare.PackError``; no other exception escapes
    (safetensors may raise ``pyo3_runtime.PanicException``, a BaseException: caught too);
(b) if it succeeds, the result holds exactly the weights of the unmutated file: the
    checksums cover every stored tensor, so an accepted mutation must change nothing
    that matters (read_spec: the stored tensors; load: the model's weights; export: the
    written model.safetensors);
(c) it writes nothing outside its destination: the whole sandbox (packed copy, a victim
    model directory next to it, the temp directory) is snapshotted before and after,
    and only the export destination may differ.  read_spec and load write nothing at all
    (load's own temp directory must be gone when it returns).

Tests: ``test_fuzz_spec`` / ``test_fuzz_safetensors_header`` / ``test_fuzz_bytes`` draw
mutations with hypothesis; ``test_weights_subdir_never_escapes`` tries every climb and
absolute path in the one path-bearing field; ``test_known_mutation`` keeps each violation
the fuzzers have found as a plain regression case.

Budget: ``WS_FUZZ_EXAMPLES`` (default 400) examples in total, shared out over the fuzz tests;
``WS_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz_pack.py`` runs at least 5000 (a test stops
early at its first failure).  The number run is printed at the end of the module.
Hypothesis runs derandomized (the same examples every run, no example database) unless
``WS_FUZZ_RANDOM=1``.
"""

from __future__ import annotations

import collections
import copy
import json
import math
import os
import resource
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as st_save

import weightshare as ws
from tests import fuzz_helpers as fh
from tests.conftest import TinyNet
from weightshare.pack import read_spec

# ----------------------------------------------------------------------------- budget and settings

TOTAL_EXAMPLES = int(os.environ.get("WS_FUZZ_EXAMPLES", "400"))
# share of the budget per (mutation family, model); the spec is where most of the logic is
SHARES = {"spec": 2, "header": 1, "bytes": 1}
MODELS = ["tiny", "tied", "bert", "composed", "outliers"]


def budget(family: str) -> int:
    """max_examples for one parametrized case, so that all cases together run >= TOTAL_EXAMPLES."""
    return max(1, math.ceil(TOTAL_EXAMPLES * SHARES[family] / (sum(SHARES.values()) * len(MODELS))))


def fuzz_settings(family: str):
    return settings(
        max_examples=budget(family),
        deadline=None,  # one example loads a model: timings vary on a shared machine
        derandomize=os.environ.get("WS_FUZZ_RANDOM") != "1",  # CI: the same examples every run
        database=None,  # nothing written next to the repository
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                               HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


EXAMPLES_RUN: collections.Counter = collections.Counter()  # test name -> examples run (printed at the end)


# ----------------------------------------------------------------------------- the packed models


class Packed:
    """A real packed directory and what a correct reader makes of it.

    A plain class, not a dataclass: hypothesis prints the test's arguments with every
    failure, and would print a dataclass field by field (every tensor).
    """

    def __init__(self, name: str, dir: Path, expected: dict, skeleton, exports: bool):
        self.name = name
        self.dir = dir
        self.data = (dir / fh.FILENAME).read_bytes()  # weightshare.safetensors
        with safe_open(str(dir / fh.FILENAME), framework="pt") as f:
            self.meta = dict(f.metadata())  # safetensors __metadata__
            self.tensors = {k: f.get_tensor(k) for k in f.keys()}  # the stored tensors
        self.spec = json.loads(self.meta["spec"])
        self.header, _ = fh.split_safetensors(self.data)  # the safetensors header, parsed
        self.expected = expected  # name -> weight the loaded model must hold (its plain state_dict)
        self.skeleton = skeleton  # ws.load(path, model=skeleton()) or, when None, ws.load(path)
        self.exports = exports  # whether ws.export is fuzzed too (a plain nn.Module has no config to export)

    def __repr__(self):
        return f"<packed {self.name} model at {self.dir}>"


def _plain_state_dict(model) -> dict:
    """The weights a loaded model computes with: codebooks decoded, as one plain state_dict."""
    inner = model
    if type(model).__name__ == "SentenceTransformer":  # a spec claiming another kind may yield one
        inner = model[0].auto_model
    inner = copy.deepcopy(inner)
    ws.materialize_(inner)
    return {k: v.detach().clone() for k, v in inner.state_dict().items()}


def _finish(name: str, path: Path, expected: dict, skeleton, exports: bool) -> Packed:
    packed = Packed(name, path, expected, skeleton, exports)
    # the unmutated file must pass every check, or the fuzz tests would test nothing
    with tempfile.TemporaryDirectory() as tmp:
        check_entry_points(packed, lambda work: packed.data, Path(tmp), count_as=None)
    return packed


def _build_tiny(root: Path) -> Packed:
    torch.manual_seed(0)
    net = TinyNet()
    ws.share_(net, ws.CodebookConfig(bits=3, granularity="per_channel"))
    path = ws.save(net, root / "tiny")
    return _finish("tiny", path, _plain_state_dict(net), TinyNet, exports=False)


class TiedNet(torch.nn.Module):
    """An LM-like head tied to its embedding (an alias entry), and a same-shaped untied layer next to it."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(30, 12)
        self.other = torch.nn.Linear(12, 30, bias=False)  # weight (30, 12), like emb's: an alias could point here
        self.head = torch.nn.Linear(12, 30, bias=False)
        self.head.weight = self.emb.weight


def _build_tied(root: Path) -> Packed:
    torch.manual_seed(0)
    net = TiedNet()
    # the tied pair gets one codebook (head: an alias of emb); `other` stays dense
    ws.share_(net, ws.CodebookConfig(bits=2, granularity="per_channel"), filter_fn=lambda m, name: name != "other")
    path = ws.save(net, root / "tied")
    return _finish("tied", path, _plain_state_dict(net), TiedNet, exports=False)


def _build_bert(root: Path) -> Packed:
    import transformers

    from weightshare import cli

    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(root / "bert-src")
    out = root / "bert"
    assert cli.main(["--quiet", "compress", str(root / "bert-src"), "--bits", "3", "--out", str(out)]) == 0
    # the reference is the unmutated file as loaded and as exported: the two must agree
    expected = _plain_state_dict(ws.load(out))
    ws.export(out, root / "bert-dense")
    dense = load_file(str(root / "bert-dense" / "model.safetensors"))
    assert sorted(dense) == sorted(expected) and all(torch.equal(dense[k], expected[k]) for k in dense)
    return _finish("bert", out, expected, None, exports=True)


def _composed_net():
    return torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Tanh(), torch.nn.Linear(24, 8))


def _build_composed(root: Path) -> Packed:
    """Composed maps: hashed weights whose buckets are themselves a codebook (nested entries)."""
    torch.manual_seed(0)
    net = _composed_net()
    ws.share_(net, ws.HashConfig(compression=1 / 4))
    ws.share_(net, ws.CodebookConfig(bits=3, granularity="per_tensor"))
    path = ws.save(net, root / "composed")
    return _finish("composed", path, _plain_state_dict(net), _composed_net, exports=False)


def _build_outliers(root: Path) -> Packed:
    """Codebooks with dense-and-sparse outliers (positions and exact values beside each codebook)."""
    from weightshare.compress import compress_model_

    torch.manual_seed(0)
    net = TinyNet()
    g = torch.Generator().manual_seed(0)
    compress_model_(net, ws.CodebookConfig(bits=2), [torch.randint(0, 50, (4, 6), generator=g) for _ in range(2)],
                    outliers=0.05)
    path = ws.save(net, root / "outliers")
    return _finish("outliers", path, _plain_state_dict(net), TinyNet, exports=False)


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-pack")
    return {"tiny": _build_tiny(root), "tied": _build_tied(root), "bert": _build_bert(root),
            "composed": _build_composed(root), "outliers": _build_outliers(root)}


@pytest.fixture(scope="module", autouse=True)
def memory_cap():
    """Cap this process's address space at its current size + 4 GB during the fuzz tests.

    A field that claims a huge tensor must be checked before anything is allocated
    (DESIGN.md section 4).  Without a cap such a bug could take the machine's memory;
    with it, the allocation fails and the MemoryError/RuntimeError shows up as a
    violation of (a).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        vm_bytes = int(f.read().split()[0]) * resource.getpagesize()
    cap = vm_bytes + (4 << 30)
    if hard == resource.RLIM_INFINITY or cap < hard:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture(scope="module", autouse=True)
def print_examples_run(request):
    """Print how many examples each fuzz test ran, at the end of the module (pass or fail)."""
    start = time.perf_counter()
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():  # straight to the terminal, not into captured output
        reporter.write_line("")
        for name, n in sorted(EXAMPLES_RUN.items()):
            reporter.write_line(f"fuzz examples run: {n:6d}  {name}")
        reporter.write_line(f"fuzz examples run: {sum(EXAMPLES_RUN.values()):6d}  in total "
                            f"(WS_FUZZ_EXAMPLES={TOTAL_EXAMPLES}), {time.perf_counter() - start:.1f} s")


# ----------------------------------------------------------------------------- the checks


@contextmanager
def inside_sandbox(box: fh.Sandbox):
    """Point ``tempfile`` and ``~`` into the sandbox during a call, so that whatever they lead to is watched.

    ws.load writes its temporary directory through ``tempfile``; a loader that expanded
    "~" in a drawn path would otherwise write to the real home directory.
    """
    old_tmp, old_home = tempfile.tempdir, os.environ.get("HOME")
    tempfile.tempdir, os.environ["HOME"] = str(box.scratch), str(box.scratch)
    try:
        yield
    finally:
        tempfile.tempdir = old_tmp
        if old_home is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = old_home


def call(fn, *args):
    """(result, None) or (None, exception); any BaseException but KeyboardInterrupt is caught.

    safetensors' Rust panics arrive as pyo3_runtime.PanicException, which is not an
    Exception: a loader must turn them into PackError too.
    """
    try:
        return fn(*args), None
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - see docstring
        return None, exc


def check_refused_or_ok(what: str, exc: BaseException | None) -> None:
    """Invariant (a): only PackError may escape."""
    if exc is not None and not isinstance(exc, ws.PackError):
        # chained with `from exc`, so hypothesis tells distinct bugs apart by where exc was raised
        raise AssertionError(f"(a) {what} raised {type(exc).__module__}.{type(exc).__name__}, not PackError: "
                             f"{str(exc)[:500]}") from exc


def check_same_weights(what: str, got: dict, expected: dict) -> None:
    """Invariant (b): exactly the expected tensors, same dtype, same values."""
    assert sorted(got) == sorted(expected), (
        f"(b) {what} succeeded with other tensors\n  missing: {sorted(set(expected) - set(got))[:5]}"
        f"\n  extra: {sorted(set(got) - set(expected))[:5]}")
    for k, want in expected.items():
        have = got[k]
        assert have.dtype == want.dtype, f"(b) {what}: {k} has dtype {have.dtype}, expected {want.dtype}"
        assert have.shape == want.shape, f"(b) {what}: {k} has shape {tuple(have.shape)}, expected {tuple(want.shape)}"
        assert torch.equal(have, want), f"(b) {what}: {k} differs from the unmutated file's weights"


def check_entry_points(packed: Packed, make_file, root: Path, count_as: str | None,
                       only: str | None = None) -> None:
    """Run read_spec, load and (if packed.exports) export on a mutated copy, checking (a), (b), (c).

    ``make_file(work)`` returns the mutated file's bytes; ``work`` is the sandbox directory
    that absolute paths in a drawn spec are rooted at (see fuzz_helpers.SANDBOX).
    ``only`` runs just that entry point.
    """
    if count_as is not None:
        EXAMPLES_RUN[count_as] += 1
    box = fh.Sandbox(root, packed.dir)
    (box.packed / fh.FILENAME).write_bytes(make_file(box.work))

    calls = [("read_spec", lambda: read_spec(box.packed), None)]
    if packed.skeleton is not None:
        calls.append(("load", lambda: ws.load(box.packed, model=packed.skeleton()), None))
    else:
        calls.append(("load", lambda: ws.load(box.packed), None))
    if packed.exports:
        calls.append(("export", lambda: ws.export(box.packed, box.out), box.out))

    for what, fn, dest in calls:
        if only is not None and what != only:
            continue
        before = box.snapshot()
        with inside_sandbox(box):
            result, exc = call(fn)
        changed = box.changes(before, box.snapshot(), allowed_dir=dest)
        # (c) first: a write outside the destination is the worst outcome, whatever was raised
        where = "outside its destination" if dest else "although it must write nothing"
        assert not changed, (f"(c) {what} changed files {where}: "
                             f"{changed[:8]}" + (f"\n  and raised {type(exc).__name__}: {exc}" if exc else ""))
        check_refused_or_ok(what, exc)
        if exc is not None:
            continue
        if what == "read_spec":
            _, tensors = result
            check_same_weights("read_spec", tensors, packed.tensors)
        elif what == "load":
            check_same_weights("load", _plain_state_dict(result), packed.expected)
        else:
            files = sorted(box.out.rglob("model.safetensors"))
            assert len(files) == 1, f"(b) export succeeded but wrote {len(files)} model.safetensors: {files}"
            check_same_weights("export", load_file(str(files[0])), packed.expected)


def rewrite_metadata(packed: Packed, spec, work: Path) -> bytes:
    """The packed file with the same tensors and ``spec`` (any JSON value) as its metadata spec."""
    meta = dict(packed.meta, spec=fh.encode_spec(json.dumps(spec), work))
    return st_save(packed.tensors, metadata=meta)


# ----------------------------------------------------------------------------- fuzz tests


@pytest.mark.parametrize("model", MODELS)
@fuzz_settings("spec")
@given(data=st.data())
def test_fuzz_spec(packs, model, data):
    """Random edits of the spec JSON (values, deleted and added keys), file rewritten with the same tensors."""
    packed = packs[model]
    mutations = data.draw(fh.spec_mutations(packed.spec), label="spec mutations")
    spec = fh.apply_spec_mutations(packed.spec, mutations)
    with tempfile.TemporaryDirectory() as tmp:
        check_entry_points(packed, lambda work: rewrite_metadata(packed, spec, work), Path(tmp),
                           f"test_fuzz_spec[{model}]")


@pytest.mark.parametrize("model", MODELS)
@fuzz_settings("header")
@given(data=st.data())
def test_fuzz_safetensors_header(packs, model, data):
    """Edits of the safetensors header (dtype, shape, data_offsets, __metadata__, length prefix); body kept."""
    packed = packs[model]
    mutations = data.draw(fh.header_mutations(packed.header), label="header mutations")
    mutated = fh.apply_header_mutations(packed.data, mutations)
    with tempfile.TemporaryDirectory() as tmp:
        check_entry_points(packed, lambda work: mutated, Path(tmp), f"test_fuzz_safetensors_header[{model}]")


@pytest.mark.parametrize("model", MODELS)
@fuzz_settings("bytes")
@given(data=st.data())
def test_fuzz_bytes(packs, model, data):
    """Flipped or overwritten bytes, truncation, appended garbage anywhere in the file."""
    packed = packs[model]
    mutations = data.draw(fh.byte_mutations(packed.data), label="byte mutations")
    mutated = fh.apply_byte_mutations(packed.data, mutations)
    with tempfile.TemporaryDirectory() as tmp:
        check_entry_points(packed, lambda work: mutated, Path(tmp), f"test_fuzz_bytes[{model}]")


# ----------------------------------------------------------------------------- explicit path attacks

# source.weights_subdir is the one path-bearing field: every climb and absolute path,
# with every source kind (a sentence-transformers file legitimately has a subdir)
SUBDIRS = ["..", "../victim", "../../victim", "a/../../victim", "./../victim", "victim/../../victim",
           fh.SANDBOX + "/victim", fh.SANDBOX + "/etc", fh.SANDBOX + "/../victim", "../out2", "../packed"]


# (model, kind) pairs: the BERT file claiming either Hugging Face kind (so that load rebuilds
# the model and export runs), and the plain nn.Module file (loaded into a skeleton)
SUBDIR_CASES = [pytest.param(model, kind, entry, id=f"{kind}-{entry}")
                for model, kind in [("bert", "transformers"), ("bert", "sentence-transformers"), ("tiny", "module")]
                for entry in ["read_spec", "load", "export"]
                if not (model == "tiny" and entry == "export")]


@pytest.mark.parametrize("model,kind,entry", SUBDIR_CASES)
@pytest.mark.parametrize("subdir", SUBDIRS)
def test_weights_subdir_never_escapes(packs, subdir, model, kind, entry):
    """A spec whose weights_subdir climbs out or is absolute: read_spec, load and export write nowhere else."""
    packed = packs[model]
    spec = dict(packed.spec, source={"kind": kind, "weights_subdir": subdir})
    with tempfile.TemporaryDirectory() as tmp:
        check_entry_points(packed, lambda work: rewrite_metadata(packed, spec, work), Path(tmp),
                           "test_weights_subdir_never_escapes", only=entry)


# ----------------------------------------------------------------------------- known cases

# Each mutation the fuzzers above found to break an invariant (at commits 0be9722 and af70672),
# shrunk by hypothesis, kept here so that each is checked on every run whatever the budget.
Q = "encoder.layer.0.attention.self.query.weight"  # a square codebook weight of the BERT model
KNOWN_CASES = [
    # a JSON value of the wrong type where a loader looks it up in a dict or indexes it
    ("dense-dtype-is-a-list", "tiny", "spec", [fh.Replace(("tensors", "fc1.bias", "dtype"), [])]),
    ("codebook-dtype-is-a-list", "tiny", "spec", [fh.Replace(("tensors", "fc1.weight", "dtype"), [])]),
    ("alias-of-a-list", "tiny", "spec", [fh.Replace(("tensors", "conv.bias"), {"map": "alias", "of": []})]),
    ("codebook-shape-empty", "tiny", "spec", [fh.AddKey(("tensors", "emb.weight"), "shape", [])]),
    ("codebook-shape-huge", "bert", "spec", [fh.Replace(("tensors", Q, "shape"), [10**18, 32])]),
    ("spec-is-a-list", "tiny", "spec", [fh.Replace((), [])]),
    ("tensors-is-a-list", "tiny", "spec", [fh.Replace(("tensors",), [])]),
    ("checksums-is-a-list", "tiny", "spec", [fh.Replace(("checksums",), [])]),
    ("weights-subdir-null", "bert", "spec", [fh.Replace(("source", "weights_subdir"), None)]),
    # a field no checksum covers, changed so that the file means something else
    ("alias-retargeted", "tied", "spec",
     [fh.Replace(("tensors", "head.weight"), {"map": "alias", "of": "other.weight"})]),
    ("alias-added", "bert", "spec",
     [fh.Replace(("tensors", "zzz.weight"), {"map": "alias", "of": "embeddings.LayerNorm.bias"})]),
    ("codebook-dtype-float16", "bert", "spec", [fh.Replace(("tensors", Q, "dtype"), "float16")]),
    ("codebook-transposed-square", "bert", "spec", [fh.AddKey(("tensors", Q), "transposed", True)]),
    ("tables-f16-read-as-bf16", "bert", "header", [fh.HeaderEdit(Q + ".__tables", "dtype", "BF16")]),
    # a source that does not fit the directory
    ("kind-module", "bert", "spec", [fh.Replace(("source", "kind"), "module")]),
    ("kind-sentence-transformers", "bert", "spec", [fh.Replace(("source", "kind"), "sentence-transformers")]),
    ("weights-subdir-missing", "bert", "spec", [fh.Replace(("source", "weights_subdir"), "sub")]),
    # the container
    ("length-prefix-huge", "tiny", "header", [fh.LengthPrefix(2**63)]),
    ("truncated-in-header", "bert", "bytes", [fh.Truncate(100)]),
]


def _mutated_file(packed: Packed, family: str, mutations):
    """make_file for check_entry_points: the packed file with ``mutations`` of the given family applied."""
    if family == "spec":
        spec = fh.apply_spec_mutations(packed.spec, mutations)
        return lambda work: rewrite_metadata(packed, spec, work)
    if family == "header":
        data = fh.apply_header_mutations(packed.data, mutations)
    else:
        data = fh.apply_byte_mutations(packed.data, mutations)
    return lambda work: data


@pytest.mark.parametrize("entry", ["read_spec", "load", "export"])
@pytest.mark.parametrize("case,model,family,mutations", [pytest.param(*c, id=c[0]) for c in KNOWN_CASES])
def test_known_mutation(packs, case, model, family, mutations, entry):
    packed = packs[model]
    if entry == "export" and not packed.exports:
        pytest.skip("a plain nn.Module has no config to export")
    with tempfile.TemporaryDirectory() as tmp:
        check_entry_points(packed, _mutated_file(packed, family, mutations), Path(tmp), None, only=entry)


def test_zz_examples_run(request):
    """The budget was spent: at least WS_FUZZ_EXAMPLES examples ran (skipped when a fuzz test failed early)."""
    if request.session.testsfailed:
        pytest.skip("a fuzz test failed, so it stopped before its budget")
    fuzzed = sum(n for name, n in EXAMPLES_RUN.items() if name.startswith("test_fuzz_"))
    if not fuzzed:
        pytest.skip("no fuzz test ran in this session (deselected)")
    assert fuzzed >= TOTAL_EXAMPLES, EXAMPLES_RUN
