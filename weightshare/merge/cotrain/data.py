"""Co-training data: the built-in ``digits``, or the user's own labelled file.

A config names its data at the top level (split into one disjoint stratified part per worker,
and one test split every worker is scored on) or per worker (that worker's own file, its own
test split)::

    data: digits                  # built-in: scikit-learn's 8x8 digits
    data: reviews.jsonl           # a file, with the default columns
    data:
      path: reviews.csv           # .jsonl or .csv: a text column and a label column;
      text: sentence              #   .npz: a float array of features and an array of labels
      label: category             # the text (or features) and label columns / arrays
      labels: [neg, pos]          # optional: the label set, in order; a row with another label is refused

Text files are read by ``weightshare.evaluate.read_data`` (the one reader of labelled text, also
behind ``weightshare eval``): by default the text is the first of its ``TEXT_FIELDS`` a file has
(``text``, ``sentence``, ...) and the label the first of its ``LABEL_FIELDS``; ``.npz`` arrays
default to ``x`` and ``y``.  The labels are the file's distinct labels, sorted, unless ``labels``
lists them.  A file is untrusted input: every row is checked (columns present, text a non-empty
string, label known) and a problem is reported with its file, row and column before any process
starts; ``.npz`` headers are checked before numpy allocates what they declare, and no pickle is
ever loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["DataSpec", "Rows", "parse_data", "read_rows", "split_parts", "split_test", "BUILT_IN"]

BUILT_IN = ("digits",)
DATA_KEYS = ("path", "text", "label", "labels")
SUFFIXES = (".jsonl", ".csv", ".npz")
MAX_ROWS = 10_000_000  # rows a data file may hold


@dataclass(frozen=True)
class DataSpec:
    """A labelled file and the columns (arrays, for ``.npz``) holding the inputs and the labels."""

    path: str
    text: str | None = None  # None: read_data's default fields (npz: "x")
    label: str | None = None  # (npz: "y")
    labels: tuple | None = None

    @property
    def kind(self) -> str:
        return Path(self.path).suffix.lower()


@dataclass
class Rows:
    """A data set: ``inputs`` (a list of texts, or a float tensor of features), ``y`` (label indices)
    and ``names`` (the label of each index)."""

    inputs: list[str] | torch.Tensor
    y: torch.Tensor
    names: list

    @property
    def is_text(self) -> bool:
        return isinstance(self.inputs, list)

    def take(self, idx: np.ndarray) -> tuple:
        x = [self.inputs[i] for i in idx] if self.is_text else self.inputs[torch.as_tensor(idx)]
        return x, self.y[torch.as_tensor(idx)]


def parse_data(raw, at: str, problems: list[str]) -> str | DataSpec | None:
    """``data`` as written in the config: a built-in name, a file path, or a mapping (``DATA_KEYS``).
    Checks the form only; the file is read by ``read_rows``."""
    if isinstance(raw, str) and raw in BUILT_IN:
        return raw
    if isinstance(raw, str):
        raw = {"path": raw}
    if not isinstance(raw, dict):
        problems.append(f"{at}: expected a built-in data set ({', '.join(BUILT_IN)}), a file path, or a mapping "
                        f"({', '.join(DATA_KEYS)}); got {raw!r}")
        return None
    bad = [k for k in raw if k not in DATA_KEYS]
    for k in bad:
        problems.append(f"{at}.{k}: unknown key; known keys: {', '.join(DATA_KEYS)}")
    path = raw.get("path")
    if not isinstance(path, str) or not path:
        problems.append(f"{at}.path: expected a file path ({', '.join(SUFFIXES)}), got {path!r}")
        return None
    if Path(path).suffix.lower() not in SUFFIXES:
        problems.append(f"{at}.path: {path!r}: expected a {', '.join(SUFFIXES)} file (or the built-in "
                        f"{', '.join(BUILT_IN)})")
        return None
    npz = Path(path).suffix.lower() == ".npz"
    text, label = raw.get("text", "x" if npz else None), raw.get("label", "y" if npz else None)
    ok = not bad
    for key, value in (("text", text), ("label", label)):
        if value is not None and (not isinstance(value, str) or not value):
            problems.append(f"{at}.{key}: expected a column name, got {value!r}")
            ok = False
    labels = raw.get("labels")
    if labels is not None:
        if not (isinstance(labels, list) and len(labels) >= 2
                and all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in labels)
                and len(set(labels)) == len(labels)):
            problems.append(f"{at}.labels: expected a list of at least 2 distinct labels (strings or integers), "
                            f"got {labels!r}")
            ok = False
    return DataSpec(path, text, label, None if labels is None else tuple(labels)) if ok else None


class DataError(ValueError):
    """A data file that cannot be used: says which file, row and column."""


def read_rows(spec: DataSpec, at: str = "data") -> Rows:
    """Read and check ``spec``'s file; every problem is a ``DataError`` naming ``at`` (the config key),
    the file, and the row and column."""
    path = Path(spec.path)
    if not path.is_file():
        raise DataError(f"{at}.path: {spec.path!r}: no such file")
    if spec.kind == ".npz":
        inputs, raw_labels = _read_npz(path, spec, at)
    else:
        inputs, raw_labels = _read_text(path, spec, at)
    if len(raw_labels) < 2:
        raise DataError(f"{at} {spec.path!r}: {len(raw_labels)} row(s); expected at least 2 labelled rows")
    names = list(spec.labels) if spec.labels is not None else sorted(set(raw_labels), key=lambda v: (str(type(v)), v))
    index = {v: i for i, v in enumerate(names)}
    for row, v in enumerate(raw_labels):
        if v not in index:
            where = {".npz": f"row {row}", ".csv": f"row {row + 2}"}.get(spec.kind, f"record {row + 1}")
            raise DataError(f"{at} {spec.path!r}: {where}: unknown label {v!r} in column {spec.label or 'label'!r}\n"
                            f"  expected one of {at}.labels: {names}")
    if len(names) < 2:
        raise DataError(f"{at} {spec.path!r}: every row has the label {names[0]!r}; expected at least 2 labels")
    y = torch.tensor([index[v] for v in raw_labels], dtype=torch.long)
    return Rows(inputs, y, names)


def _read_text(path: Path, spec: DataSpec, at: str) -> tuple[list[str], list]:
    """Texts and labels of a .jsonl / .csv file through ``evaluate.read_data``; labels must be strings or integers
    (a CSV holds strings: "1" is the label 1 when ``labels`` lists integers)."""
    from weightshare.evaluate import LABEL_FIELDS, read_data

    try:
        texts, labels = read_data(path, spec.text, spec.label, flag=at, field_flags=(f"{at}.text", f"{at}.label"))
    except ValueError as exc:
        raise DataError(str(exc)) from None
    if labels is None:
        raise DataError(f"{at} {spec.path!r}: no label field (looked for: {', '.join(LABEL_FIELDS)}); "
                        f"name it with {at}.label")
    if len(labels) > MAX_ROWS:
        raise DataError(f"{at} {spec.path!r}: {len(labels):,} rows; at most {MAX_ROWS:,}")
    for i, v in enumerate(labels):
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            where = f"row {i + 2}" if spec.kind == ".csv" else f"record {i + 1}"  # read_data's words for a row
            raise DataError(f"{at} {spec.path!r}: {where}: a label must be a string or an integer, got {v!r}")
    if spec.labels is not None and spec.kind == ".csv":
        as_text = {str(v): v for v in spec.labels}
        labels = [as_text.get(v, v) for v in labels]
    return texts, labels


MAX_NPZ_VALUES = 1 << 31  # values an .npz array may hold: its header is checked against this before np.load allocates


def _npz_header(zf, name: str, spec: DataSpec, at: str) -> None:
    """Check an .npz member's .npy header before numpy allocates what it declares: a plain dtype (no objects),
    a shape within MAX_NPZ_VALUES, and a stored size that holds that many bytes."""
    from numpy.lib import format as npy

    info = zf.getinfo(f"{name}.npy")
    with zf.open(info) as f:
        version = npy.read_magic(f)
        shape, _, dtype = (npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0)(f)
    count = math.prod(shape)
    if dtype.hasobject or count > MAX_NPZ_VALUES or count * dtype.itemsize > info.file_size:
        raise DataError(f"{at} {spec.path!r}: array {name!r} declares {dtype} {shape}, which its "
                        f"{info.file_size:,} stored bytes cannot hold (or objects, which are never unpickled)")


def _read_npz(path: Path, spec: DataSpec, at: str):
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
            for name, key in ((spec.text, "text"), (spec.label, "label")):
                if name not in names:
                    raise DataError(f"{at} {spec.path!r}: no array {name!r} (it has: {', '.join(names)})\n"
                                    f"  name the array with {at}.{key}")
                _npz_header(zf, name, spec, at)
        with np.load(path, allow_pickle=False) as z:
            x, y = z[spec.text], z[spec.label]
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - zipfile, zlib and numpy raise many types on a damaged file
        raise DataError(f"{at} {spec.path!r}: not a readable .npz of arrays ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if x.dtype.kind not in "fiu" or x.ndim < 2 or x.shape[0] == 0:
        raise DataError(f"{at} {spec.path!r}: array {spec.text!r} must be numbers with one row per sample, "
                        f"got {x.dtype} {x.shape}")
    if y.ndim != 1 or y.shape[0] != x.shape[0] or y.dtype.kind not in "iuU":
        raise DataError(f"{at} {spec.path!r}: array {spec.label!r} must hold one integer or string label per row of "
                        f"{spec.text!r} ({x.shape[0]}), got {y.dtype} {y.shape}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{at} {spec.path!r}: array {spec.text!r} holds NaN or infinite values")
    labels = [v.item() if hasattr(v, "item") else v for v in y]
    return torch.from_numpy(x.reshape(x.shape[0], -1)), labels


def split_test(y: torch.Tensor, test_size: float, seed: int, at: str) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows): a stratified split fixed by ``seed`` (in scikit-learn's shuffled order, which
    ``split_parts`` then cuts)."""
    from sklearn.model_selection import train_test_split

    rows = np.arange(len(y))
    _enough(y, 2, math.ceil(1 / min(test_size, 1 - test_size)), at)
    train, test = train_test_split(rows, test_size=test_size, stratify=y.numpy(), random_state=seed)
    return np.asarray(train), np.asarray(test)


def split_parts(y: torch.Tensor, rows: np.ndarray, parts: int, seed: int, at: str) -> list[np.ndarray]:
    """``rows`` cut into ``parts`` disjoint stratified parts (scikit-learn's StratifiedKFold), fixed by ``seed``."""
    from sklearn.model_selection import StratifiedKFold

    if parts == 1:
        return [rows]
    _enough(y[torch.as_tensor(rows)], parts, parts, at)
    folds = StratifiedKFold(parts, shuffle=True, random_state=seed).split(rows, y[torch.as_tensor(rows)].numpy())
    return [rows[b] for _, b in folds]


def _enough(y: torch.Tensor, parts: int, need: int, at: str) -> None:
    counts = torch.bincount(y)
    small = [(i, int(c)) for i, c in enumerate(counts) if 0 < c < need]
    if small:
        raise DataError(f"{at}: label index {small[0][0]} has only {small[0][1]} row(s); a stratified split into "
                        f"{parts} parts needs at least {need} of each label\n"
                        "  add rows, merge rare labels, or use fewer workers")
