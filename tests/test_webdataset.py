"""webdataset shards read in place: the sample rule against the webdataset package, hand-written expectations,
one-line errors, and the same index and image cache as the JSONL route over the same samples untarred."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import from_dict
from pipeline.data.image_source import open_image
from pipeline.data.index import DatasetIndex
from pipeline.data.prepare import PrepareConfig, run_prepare
from pipeline.data.readers import DatasetConfig, read_dataset
from pipeline.data.webdataset import key_and_extension
from pipeline.errors import InputError
from pipeline.paths import ArtifactPaths
from pipeline.store.image_cache import open_image_cache


def webdataset():
    """The webdataset package (the dev extra): its TarWriter writes the test shards and its sample rule is the
    oracle of kdpipe's, so the tests that use it skip without it."""
    return pytest.importorskip("webdataset", reason="the shards are written by webdataset's own TarWriter")


def jpeg(seed: int, size=(40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# (shard, key, image bytes, caption or None, split): shard 0 is train, shard 1 test; sample 2 has no caption
SAMPLES = [(0, f"{i:06d}", jpeg(i), f"caption of sample {i}" if i != 2 else None) for i in range(5)]
SAMPLES += [(1, f"{i:06d}", jpeg(i), f"test caption {i}") for i in range(5, 8)]


def write_shards(root: Path, samples=SAMPLES) -> list[Path]:
    (root / "shards").mkdir(parents=True, exist_ok=True)
    shards = sorted({s for s, *_ in samples})
    wds = webdataset()
    for shard in shards:
        with wds.TarWriter(str(root / "shards" / f"{shard:05d}.tar")) as sink:
            for s, key, image, caption, *_ in samples:
                if s == shard:
                    sample = {"__key__": key, "jpg": image, "json": {"key": key}}
                    if caption is not None:
                        sample["txt"] = caption
                    sink.write(sample)
    return [root / "shards" / f"{s:05d}.tar" for s in shards]


def untar_with_jsonl(root: Path, shards: list[Path]) -> Path:
    """The JSONL route: each shard untarred into a directory named after it, one line per image."""
    lines = []
    for shard, split in zip(shards, ("train", "test")):
        target = shard.with_suffix("")
        with tarfile.open(shard) as tar:
            # the "data" filter where this Python has it (3.11.4+; the project supports 3.11.0+): these are our
            # own shards, so without it the members land where they say, as they would with it
            tar.extractall(target, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        for _shard, key, _, caption in (x for x in SAMPLES if f"{x[0]:05d}" == target.name):
            image = f"shards/{target.name}/{key}.jpg"
            lines.append({"image": image, "caption": caption or "", "split": split})
    path = root / "untarred.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def wds_config(shards, **extra) -> DatasetConfig:
    raw = {"format": "webdataset", "annotations": {"train": str(shards[0]), "test": str(shards[1])}, **extra}
    return from_dict(DatasetConfig, raw, "prepare.dataset")


def test_the_sample_rule_is_webdatasets():
    wds = webdataset()
    names = ["a/b.c.jpg", "000001.jpg", "000001.seg.png", "x/y/z.TXT", "noext", "dir.d/file", ".hidden.jpg", "k.json"]
    for name in names:
        theirs = wds.tariterators.base_plus_ext(name)
        assert key_and_extension(name) == (None if theirs == (None, None) else theirs), name


def test_shards_give_hand_written_index_rows(tmp_path):
    shards = write_shards(tmp_path)
    index = read_dataset(wds_config(shards))
    assert index.image_root == tmp_path / "shards"
    assert index.image_id.tolist()[:3] == ["00000/000000.jpg", "00000/000001.jpg", "00000/000002.jpg"]
    assert index.image_path.tolist() == ["00000.tar"] * 5 + ["00001.tar"] * 3
    assert index.image_split.tolist() == ["train"] * 5 + ["test"] * 3
    assert index.caption_text.tolist()[:2] == ["caption of sample 0", "caption of sample 1"]
    assert index.split("train").unpaired_image.tolist() == [2]
    with tarfile.open(shards[1]) as tar:
        info = tar.getmember("000006.jpg")
    ref = index.image_ref(6)
    assert (ref.container, ref.member, ref.offset, ref.length) == ("tar", "000006.jpg", info.offset_data, info.size)
    with open_image(ref) as im:
        im.load()
        with Image.open(io.BytesIO(SAMPLES[6][2])) as expected:
            assert np.array_equal(np.asarray(im), np.asarray(expected))


def test_json_captions_and_image_key_alternatives(tmp_path):
    (tmp_path / "s").mkdir()
    with webdataset().TarWriter(str(tmp_path / "s" / "a.tar")) as sink:
        sink.write({"__key__": "k1", "png": jpeg(1), "json": {"captions": ["one", "two"]}})
        sink.write({"__key__": "k2", "jpg": jpeg(2), "json": {"captions": "three"}})
        sink.write({"__key__": "k3", "jpg": jpeg(3), "json": {"captions": None}})
    cfg = from_dict(
        DatasetConfig,
        {
            "format": "webdataset",
            "annotations": str(tmp_path / "s" / "*.tar"),
            "default_split": "train",
            "webdataset": {"image_key": "jpg;png", "caption_key": "json", "caption_field": "captions"},
        },
        "prepare.dataset",
    )
    index = read_dataset(cfg)
    assert index.image_id.tolist() == ["a/k1.png", "a/k2.jpg", "a/k3.jpg"]
    assert list(zip(index.caption_text.tolist(), index.caption_image.tolist())) == [
        ("one", 0),
        ("two", 0),
        ("three", 1),
    ]


def test_shard_errors_are_one_line_naming_shard_and_sample(tmp_path):
    shards = write_shards(tmp_path)
    with pytest.raises(InputError, match=r"00000.tar sample 000000: no 'png' member \(it has: jpg, json, txt\)"):
        read_dataset(wds_config(shards, webdataset={"image_key": "png"}))
    dup = write_shards(tmp_path / "dup", [(0, "k", jpeg(0), "a"), (1, "k", jpeg(1), "b")])
    with pytest.raises(InputError, match=r"00001.tar sample k: image '00001/k.jpg'|listed twice") as err:
        read_dataset(wds_config([dup[0], dup[0]]))
    assert "listed twice" in str(err.value)
    blank = write_shards(tmp_path / "blank", [(0, "k", jpeg(0), "  "), (1, "j", jpeg(1), "b")])
    with pytest.raises(InputError, match=r"00000.tar sample k: empty caption"):
        read_dataset(wds_config(blank))
    gz = tmp_path / "c.tar.gz"
    with tarfile.open(gz, "w:gz") as tar:
        tar.add(shards[0], arcname="x.tar")
    with pytest.raises(InputError, match="c.tar.gz: not an uncompressed tar file"):
        read_dataset(wds_config([gz, shards[1]]))


def test_webdataset_route_equals_the_jsonl_route_over_the_untarred_samples(tmp_path):
    """prepare + extract over the shards and over the same samples untarred (one JSONL line per image): the same
    image ids, splits, captions, unpaired rows, content hashes, image cache pixels and feature store rows; only
    the columns that say where the bytes are (path, member, offset, length), and so the fingerprint, differ."""
    from extract_helpers import TinyTeacher

    from pipeline.extract.config import ExtractConfig
    from pipeline.extract.run import run_extract
    from pipeline.store.features import open_store

    shards = write_shards(tmp_path)
    jsonl = untar_with_jsonl(tmp_path, shards)
    image = {"resize": 24, "crop": 16}
    wds_dataset = {**_raw(wds_config(shards)), "name": "d", "image_root": str(tmp_path)}  # ids shards/00000/...
    via_wds = from_dict(PrepareConfig, {"dataset": wds_dataset, "image": image}, "prepare")
    via_jsonl = from_dict(
        PrepareConfig,
        {"dataset": {"format": "jsonl", "annotations": str(jsonl), "name": "d"}, "image": image},
        "prepare",
    )
    a, b = ArtifactPaths(tmp_path / "wds"), ArtifactPaths(tmp_path / "jsonl")
    run_prepare(via_wds, a)
    run_prepare(via_jsonl, b)
    ia, ib = DatasetIndex.load(a.index_dir), DatasetIndex.load(b.index_dir)
    for column in ("image_id", "image_split", "caption_text", "caption_image", "image_sha256"):
        assert getattr(ia, column).tolist() == getattr(ib, column).tolist(), column
    assert ia.image_id.tolist()[0] == "shards/00000/000000.jpg"
    assert ia.image_member is not None and ib.image_member is None and ia.fingerprint != ib.fingerprint
    ca, cb = open_image_cache(a.images), open_image_cache(b.images)
    for split in ("train", "test"):
        assert np.array_equal(ca.split(split), cb.split(split))
        assert ca.split(split).any()
    cfg = ExtractConfig(store_dtype="float32", chunk_rows=2, image_batch_size=2, num_workers=1)
    run_extract(ia, cfg, a.features, teacher=TinyTeacher())
    run_extract(ib, cfg, b.features, teacher=TinyTeacher())
    sa, sb = open_store(a.features), open_store(b.features)
    for split in ("train", "test"):
        for key in ("image_emb", "text_emb", "text_image", "image_id"):
            x, y = np.asarray(getattr(sa.split(split), key)), np.asarray(getattr(sb.split(split), key))
            assert np.array_equal(x, y), (split, key)
        assert np.asarray(sa.split(split).image_emb).any()


def _raw(cfg: DatasetConfig) -> dict:
    return {"format": cfg.format, "annotations": {k: str(v) for k, v in cfg.annotations.items()}}


def test_a_corrupt_member_is_named_by_shard_and_member(tmp_path):
    shards = write_shards(tmp_path)
    index = read_dataset(wds_config(shards))
    ref = index.image_ref(6)
    data = bytearray(shards[1].read_bytes())
    data[ref.offset + 20 : ref.offset + ref.length] = b"\0" * (ref.length - 20)  # the JPEG's scan data gone
    shards[1].write_bytes(bytes(data))
    cfg = from_dict(
        PrepareConfig, {"dataset": _raw(wds_config(shards)), "image": {"resize": 24, "crop": 16}}, "prepare"
    )
    with pytest.raises(InputError, match=r"00001.tar member 000006.jpg: .*; set prepare.on_bad_image: skip"):
        run_prepare(cfg, ArtifactPaths(tmp_path / "w"))
    skip = from_dict(
        PrepareConfig,
        {"dataset": _raw(wds_config(shards)), "image": {"resize": 24, "crop": 16}, "on_bad_image": "skip"},
        "prepare",
    )
    run_prepare(skip, ArtifactPaths(tmp_path / "w"))
    report = json.loads((tmp_path / "w" / "index" / "bad_images.json").read_text())
    assert [(r["image_id"], r["member"], Path(r["file"]).name) for r in report] == [
        ("00001/000006.jpg", "000006.jpg", "00001.tar")
    ]


def test_a_rewritten_shard_is_rehashed_and_only_its_changed_member_decoded_again(tmp_path, monkeypatch):
    from pipeline.data import prepare as prep

    shards = write_shards(tmp_path)
    cfg = from_dict(
        PrepareConfig, {"dataset": _raw(wds_config(shards)), "image": {"resize": 24, "crop": 16}}, "prepare"
    )
    paths = ArtifactPaths(tmp_path / "w")
    run_prepare(cfg, paths)
    changed = [x if x[1] != "000001" else (x[0], x[1], jpeg(99), x[3]) for x in SAMPLES]
    write_shards(tmp_path, changed)  # same layout, one image's bytes differ
    decoded = []
    real = prep.decode_block
    monkeypatch.setattr(prep, "decode_block", lambda refs, *a: decoded.extend(r.member for r in refs) or real(refs, *a))
    summary = run_prepare(cfg, paths)
    assert summary["status"] == "updated" and decoded == ["000001.jpg"]


def test_extract_names_a_corrupt_member_by_shard_and_member(tmp_path):
    from extract_helpers import TinyTeacher

    from pipeline.extract.config import ExtractConfig
    from pipeline.extract.run import run_extract

    shards = write_shards(tmp_path)
    index = read_dataset(wds_config(shards))
    ref = index.image_ref(6)
    data = bytearray(shards[1].read_bytes())
    data[ref.offset + 20 : ref.offset + ref.length] = b"\0" * (ref.length - 20)
    shards[1].write_bytes(bytes(data))
    with pytest.raises(
        InputError, match=r"00001.tar member 000006.jpg: cannot read image \(.*\); set extract.on_bad_image"
    ):
        run_extract(index, ExtractConfig(num_workers=0), tmp_path / "f.zarr", teacher=TinyTeacher())
