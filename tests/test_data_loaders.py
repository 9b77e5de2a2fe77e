from __future__ import annotations

import gzip
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from trustfed import cli
from trustfed.data import (
    Dataset,
    data_manifest,
    load_hf_dataset,
    load_image_folder,
    load_jsonl,
    load_table,
    manifest_hash,
    train_test_split,
)
from trustfed.errors import DataError

CSV = "f1,f2,label\n1,2.5,cat\n3,4,dog\n5,6,cat\n"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---------------------------------------------------------------- errors at the CLI
def test_data_errors_reach_the_cli_as_exit_code_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def failing_app() -> None:
        raise DataError("/d/[x].csv: needs pip install 'trustfed[data]'")

    monkeypatch.setattr(cli, "app", failing_app)
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2 == DataError.exit_code
    err = " ".join(capsys.readouterr().err.split())
    assert "/d/[x].csv" in err and "'trustfed[data]'" in err and "Traceback" not in err


# ---------------------------------------------------------------- tables
def test_csv_classification_defaults(tmp_path: Path) -> None:
    ds = load_table(write(tmp_path / "a.csv", CSV), target="label")
    assert ds.x.dtype == np.float32 and ds.x.shape == (3, 2)
    assert ds.x.tolist() == [[1.0, 2.5], [3.0, 4.0], [5.0, 6.0]]
    assert ds.y.dtype == np.int64 and ds.y.tolist() == [0, 1, 0]  # sorted: cat=0, dog=1
    assert ds.num_classes == 2 and not ds.is_regression


def test_csv_features_and_classes(tmp_path: Path) -> None:
    f = write(tmp_path / "a.csv", CSV)
    ds = load_table(f, features=["f2", "f1"], target="label", classes=["bird", "dog", "cat"])
    assert ds.x[:, 0].tolist() == [2.5, 4.0, 6.0]  # features in the order asked
    assert ds.y.tolist() == [2, 1, 2] and ds.num_classes == 3  # a class absent here still counts


def test_classes_given_as_text_match_integer_labels(tmp_path: Path) -> None:
    f = write(tmp_path / "a.csv", "x,y\n1,0\n2,1\n3,1\n")
    assert load_table(f, target="y", classes=["1", "0"]).y.tolist() == [1, 0, 0]
    assert load_table(f, target="y", classes=[1, 0]).y.tolist() == [1, 0, 0]


def test_regression_targets_are_float32_vectors(tmp_path: Path) -> None:
    ds = load_table(write(tmp_path / "a.csv", CSV), features=["f1"], target="f2", task="regression")
    assert ds.y.dtype == np.float32 and ds.y.shape == (3,) and ds.num_classes == 0 and ds.is_regression
    assert ds.y.tolist() == [2.5, 4.0, 6.0]


def test_normalize_standardises_each_feature(tmp_path: Path) -> None:
    ds = load_table(write(tmp_path / "a.csv", "a,b,y\n1,7,0\n2,7,1\n3,7,0\n"), target="y", normalize=True)
    assert np.allclose(ds.x.mean(axis=0), 0.0, atol=1e-6)
    assert np.allclose(ds.x[:, 0].std(), 1.0) and np.all(ds.x[:, 1] == 0.0)  # constant column: centred only


def test_gzipped_csv_and_parquet(tmp_path: Path) -> None:
    gz = tmp_path / "a.csv.gz"
    gz.write_bytes(gzip.compress(CSV.encode()))
    assert load_table(gz, target="label").y.tolist() == [0, 1, 0]
    pq = tmp_path / "a.parquet"
    pd.DataFrame({"f1": [1, 2], "flag": [True, False], "label": ["b", "a"]}).to_parquet(pq)
    ds = load_table(pq, target="label")
    assert ds.x.tolist() == [[1.0, 1.0], [2.0, 0.0]] and ds.y.tolist() == [1, 0]
    pd.DataFrame({"f1": pd.Series([], dtype="float64"), "label": pd.Series([], dtype="int64")}).to_parquet(pq)
    with pytest.raises(DataError, match=r"a\.parquet: no rows"):
        load_table(pq, target="label")


@pytest.mark.parametrize(
    "name,text,kwargs,needles",
    [
        ("empty.csv", "", {}, ["the file is empty"]),
        ("header.csv", "f1,label\n", {}, ["no rows"]),
        ("a.csv", CSV, {"target": "class"}, ["no column 'class'", "'f1', 'f2', 'label'"]),
        ("a.csv", CSV, {"features": ["f1", "f9"]}, ["no column 'f9'", "'f1', 'f2', 'label'"]),
        ("a.csv", "f1,f2,label\n1,2,a\n3,x y,b\n", {}, ["column 'f2' is not numeric", "row 2", "'x y'"]),
        ("a.csv", "f1,f2,label\n1,2,a\n3,,b\n", {}, ["column 'f2'", "empty, NaN or infinite", "row 2"]),
        ("a.csv", "f1,f2,label\n1,nan,a\n3,4,b\n", {}, ["column 'f2'", "row 1"]),
        ("a.csv", "f1,f2,label\n1,inf,a\n3,4,b\n", {}, ["column 'f2'", "row 1"]),
        ("a.csv", "f1,f2,label\n1,2,a\n3,4,\n", {}, ["column 'label'", "empty or NaN", "row 2"]),
        ("a.csv", CSV, {"classes": ["cat"]}, ["row 2", "label 'dog'", "column 'label'"]),
        ("a.csv", CSV, {"features": ["f1", "label"]}, ["'label' is the target"]),
        ("a.csv", "label\n1\n", {}, ["no feature columns"]),
        ("a.csv", CSV, {"target": "f1", "task": "regression", "features": ["label"]}, ["column 'label'", "'cat'"]),
        ("a.tsv", CSV, {}, ["unsupported table file"]),
        ("bad.csv.gz", "not gzip", {}, ["cannot be read as CSV"]),
    ],
)
def test_table_errors_name_the_file_and_where(
    tmp_path: Path, name: str, text: str, kwargs: dict[str, Any], needles: list[str]
) -> None:
    f = write(tmp_path / name, text)
    with pytest.raises(DataError) as info:
        load_table(f, **{"target": "label", **kwargs})
    message = str(info.value)
    assert str(f) in message
    for needle in needles:
        assert needle in message, message


def test_parquet_wrong_dtype_names_column_row_and_value(tmp_path: Path) -> None:
    f = tmp_path / "t.parquet"
    pd.DataFrame({"when": pd.to_datetime(["2024-01-02", "2024-01-03"]), "label": [0, 1]}).to_parquet(f)
    with pytest.raises(DataError, match=r"t\.parquet: column 'when' holds datetime64.*row 1.*2024-01-02"):
        load_table(f, target="label")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"junk\.parquet: cannot be read as PARQUET"):
        load_table(tmp_path / "junk.parquet", target="label")


def test_table_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.csv: no such file"):
        load_table(tmp_path / "nope.csv", target="y")
    f = write(tmp_path / "a.csv", CSV)
    with pytest.raises(DataError, match="task must be"):
        load_table(f, target="label", task="ranking")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="classes only apply"):
        load_table(f, target="f1", task="regression", classes=[0])
    with pytest.raises(DataError, match="twice"):
        load_table(f, target="label", classes=["cat", "cat"])


def test_missing_extra_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(DataError, match=r"pip install 'trustfed\[data\]'"):
        load_table(write(tmp_path / "a.csv", CSV), target="label")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"pip install 'trustfed\[data\]'"):
        load_hf_dataset(tmp_path)


# ---------------------------------------------------------------- regression datasets
def test_regression_dataset_rules_and_split() -> None:
    x = np.zeros((10, 2), np.float32)
    with pytest.raises(DataError, match="regression targets"):
        Dataset("r", x, np.zeros(10, np.int64), 0)
    with pytest.raises(DataError, match="regression targets"):
        Dataset("r", x, np.zeros((10, 1), np.float32), 0)
    with pytest.raises(DataError, match="num_classes"):
        Dataset("r", x, np.zeros(10, np.int64), -1)
    ds = Dataset("r", x, np.arange(10, dtype=np.float32), 0)
    train, test = train_test_split(ds, 0.3, seed=1)
    assert len(train) == 7 and len(test) == 3 and train.is_regression
    assert sorted(np.concatenate([train.y, test.y]).tolist()) == list(range(10))
    again, _ = train_test_split(ds, 0.3, seed=1)
    assert np.array_equal(again.y, train.y)


# ---------------------------------------------------------------- JSON lines
def test_jsonl_reads_objects_and_skips_blank_lines(tmp_path: Path) -> None:
    f = write(tmp_path / "r.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b", "label": 0, "extra": [1]}\n')
    assert load_jsonl(f, required=["text", "label"]) == [
        {"text": "a", "label": 1},
        {"text": "b", "label": 0, "extra": [1]},
    ]
    gz = tmp_path / "r.jsonl.gz"
    gz.write_bytes(gzip.compress(b'\xef\xbb\xbf{"a": 1}\n'))  # a byte-order mark is tolerated
    assert load_jsonl(gz) == [{"a": 1}]


@pytest.mark.parametrize(
    "content,required,needles",
    [
        (b"", (), ["no records"]),
        (b"\n  \n", (), ["no records"]),
        (b'{"a": 1}\n\n{"a": \n', (), ["line 3 is not valid JSON"]),
        (b'{"a": 1}\n[1, 2]\n', (), ["line 2", "expected a JSON object, got list"]),
        (b'{"a": 1}\n{"b": 2}\n', ("a",), ["line 2", "no key 'a'"]),
        (b'{"a": 1}\n{"a": "\xff"}\n', (), ["line 2 is not UTF-8"]),
    ],
)
def test_jsonl_errors_name_file_and_line(
    tmp_path: Path, content: bytes, required: tuple[str, ...], needles: list[str]
) -> None:
    f = tmp_path / "r.jsonl"
    f.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_jsonl(f, required=required)
    assert str(f) in str(info.value)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_jsonl_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"r\.jsonl: no such file"):
        load_jsonl(tmp_path / "r.jsonl")


# ---------------------------------------------------------------- image folders
def image(path: Path, value: int, size: tuple[int, int] = (12, 10), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color=value if mode != "RGB" else (value, value, value)).save(path)
    return path


def test_image_folder_layout(tmp_path: Path) -> None:
    image(tmp_path / "zebra" / "1.png", 255)
    image(tmp_path / "ant" / "b.png", 0)
    image(tmp_path / "ant" / "nested" / "a.jpg", 0)
    (tmp_path / "ant" / "notes.txt").write_text("ignored")
    (tmp_path / "ant" / ".hidden.png").write_bytes(b"ignored")
    (tmp_path / "ant" / "p.png").write_bytes(_palette_png_with_transparency())
    ds = load_image_folder(tmp_path, size=(6, 4))
    assert ds.x.shape == (4, 3, 6, 4) and ds.x.dtype == np.float32  # [n, c, height, width]
    assert ds.y.tolist() == [0, 0, 0, 1] and ds.num_classes == 2  # ant=0, zebra=1
    assert ds.x.min() >= 0.0 and ds.x.max() <= 1.0 and np.allclose(ds.x[3], 1.0)
    gray = load_image_folder(tmp_path, grayscale=True)
    assert gray.x.shape == (4, 1, 28, 28)


def _palette_png_with_transparency() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "p.png"
        Image.new("P", (5, 5)).save(p, transparency=0)
        return p.read_bytes()


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such folder"):
        load_image_folder(tmp_path / "none")
    with pytest.raises(DataError, match=f"{tmp_path}: no class folders"):
        load_image_folder(tmp_path)
    image(tmp_path / "cat" / "0.png", 10)
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "readme.md").write_text("x")
    with pytest.raises(DataError, match=r"dog: class folder 'dog' has no images"):
        load_image_folder(tmp_path)
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"dog/broken\.jpg: cannot read the image"):
        load_image_folder(tmp_path)
    (tmp_path / "dog" / "broken.jpg").unlink()
    image(tmp_path / "dog" / "wide.png", 1000, mode="I;16")
    with pytest.raises(DataError, match=r"dog/wide\.png: pixels of mode I;16"):
        load_image_folder(tmp_path)
    with pytest.raises(DataError, match="size must be"):
        load_image_folder(tmp_path, size=(0, 3))


# ---------------------------------------------------------------- saved Hugging Face datasets
@pytest.fixture
def saved_hf(tmp_path: Path) -> Path:
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    one = datasets.Dataset.from_dict({"x": [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], "y": [0, 1, 0]})
    one.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": one, "test": one.select([0])}).save_to_disk(str(tmp_path / "dict"))
    return tmp_path


def test_hf_dataset_is_torch_formatted(saved_hf: Path) -> None:
    import torch

    ds = load_hf_dataset(saved_hf / "one")
    assert len(ds) == 3 and isinstance(ds[1]["x"], torch.Tensor) and ds[1]["x"].tolist() == [3.0, 4.0]
    assert int(ds[1]["y"]) == 1
    assert len(load_hf_dataset(saved_hf / "dict", split="test")) == 1


def test_hf_dataset_errors(saved_hf: Path) -> None:
    with pytest.raises(DataError, match=r"dict: holds the splits 'train', 'test'; pass split="):
        load_hf_dataset(saved_hf / "dict")
    with pytest.raises(DataError, match=r"dict: no split 'val'"):
        load_hf_dataset(saved_hf / "dict", split="val")
    with pytest.raises(DataError, match=r"one: holds one dataset .*leave split out"):
        load_hf_dataset(saved_hf / "one", split="train")
    (saved_hf / "plain").mkdir()
    with pytest.raises(DataError, match=r"plain: not a dataset saved with save_to_disk"):
        load_hf_dataset(saved_hf / "plain")
    with pytest.raises(DataError, match="no such folder"):
        load_hf_dataset(saved_hf / "absent")


# ---------------------------------------------------------------- data manifests
def test_manifest_lists_files_without_contents(tmp_path: Path) -> None:
    write(tmp_path / "data" / "b.csv", "secret,1\n")
    write(tmp_path / "data" / "sub" / "a.txt", "hello")
    (tmp_path / "data" / "empty").mkdir()
    big = tmp_path / "data" / "big.bin"
    big.write_bytes(os.urandom(1) * (2_500_000))  # spans several read chunks
    m = data_manifest(tmp_path / "data")
    assert [f["path"] for f in m["files"]] == ["b.csv", "big.bin", "sub/a.txt"]
    assert m["files"][0] == {"path": "b.csv", "size": 9, "sha256": hashlib.sha256(b"secret,1\n").hexdigest()}
    assert m["files"][1]["sha256"] == hashlib.sha256(big.read_bytes()).hexdigest()
    assert "secret" not in json.dumps(m)
    encoded = json.dumps(m, sort_keys=True, separators=(",", ":")).encode()
    assert manifest_hash(m) == hashlib.sha256(encoded).hexdigest()
    assert manifest_hash(dict(reversed(list(m.items())))) == manifest_hash(m)


def test_manifest_of_an_empty_folder(tmp_path: Path) -> None:
    m = data_manifest(tmp_path)
    assert m["files"] == [] and len(manifest_hash(m)) == 64


def test_manifest_roots_and_errors(tmp_path: Path) -> None:
    a = write(tmp_path / "d" / "a.csv", "1")
    b = write(tmp_path / "d" / "x" / "b.csv", "2")
    assert [f["path"] for f in data_manifest(a)["files"]] == ["a.csv"]
    assert [f["path"] for f in data_manifest([b, a])["files"]] == ["a.csv", "x/b.csv"]
    assert [f["path"] for f in data_manifest(b, root=tmp_path)["files"]] == ["d/x/b.csv"]
    with pytest.raises(DataError, match="outside the manifest root"):
        data_manifest(a, root=tmp_path / "d" / "x")
    with pytest.raises(DataError, match=r"nope: no such file or folder"):
        data_manifest(tmp_path / "nope")


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symbolic links here")
def test_manifest_records_links_without_following_them(tmp_path: Path) -> None:
    outside = write(tmp_path / "outside" / "secret.txt", "do not read")
    root = tmp_path / "root"
    write(root / "a.txt", "a")
    (root / "leak").symlink_to(outside)
    (root / "loop").symlink_to(root, target_is_directory=True)
    m = data_manifest(root)
    assert m["files"] == [
        {"path": "a.txt", "size": 1, "sha256": hashlib.sha256(b"a").hexdigest()},
        {"path": "leak", "link": str(outside)},
        {"path": "loop", "link": str(root)},
    ]


NAMES = st.text(alphabet="abcdefghij", min_size=1, max_size=6)


@settings(derandomize=True, max_examples=30, deadline=None)
@given(st.dictionaries(NAMES, st.binary(max_size=40), min_size=1, max_size=5), st.randoms(use_true_random=False))
def test_manifest_hash_tracks_exactly_names_and_bytes(files: dict[str, bytes], rnd: Any) -> None:
    with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
        paths = []
        for root in (Path(d1), Path(d2)):
            paths = [root / f"{name}.bin" for name in files]
            for p, content in zip(paths, files.values(), strict=True):
                p.write_bytes(content)
        base = manifest_hash(data_manifest(Path(d1)))
        assert manifest_hash(data_manifest(Path(d2))) == base  # where the root lies does not matter
        shuffled = list(paths)
        rnd.shuffle(shuffled)
        assert manifest_hash(data_manifest(shuffled, root=Path(d2))) == base  # nor the order of paths
        victim = paths[0]
        content = victim.read_bytes()
        victim.write_bytes(content[:-1] + bytes([content[-1] ^ 1]) if content else b"\0")
        assert manifest_hash(data_manifest(Path(d2))) != base  # one byte changed
        victim.write_bytes(content)
        assert manifest_hash(data_manifest(Path(d2))) == base
        victim.rename(victim.with_name("renamed_" + victim.name))
        assert manifest_hash(data_manifest(Path(d2))) != base  # renamed
        victim.with_name("renamed_" + victim.name).rename(victim)
        (Path(d2) / "new.bin").write_bytes(b"")
        assert manifest_hash(data_manifest(Path(d2))) != base  # a file added


def test_image_folder_with_fixed_classes_keeps_labels_across_sites(tmp_path: Path) -> None:
    from PIL import Image

    from trustfed.data.loaders import load_image_folder

    for name in ("3", "7"):
        (tmp_path / "site" / name).mkdir(parents=True)
        Image.new("L", (4, 4), color=int(name) * 20).save(tmp_path / "site" / name / "a.png")
    classes = [str(d) for d in range(10)]
    ds = load_image_folder(tmp_path / "site", size=(4, 4), grayscale=True, classes=classes)
    assert ds.num_classes == 10 and sorted(ds.y.tolist()) == [3, 7]
    (tmp_path / "site" / "cat").mkdir()
    with pytest.raises(DataError, match="'cat' is not one of the classes"):
        load_image_folder(tmp_path / "site", size=(4, 4), grayscale=True, classes=classes)
