"""The dataset index: every image (id, path, split) and every caption (text, image row), with a fingerprint.

One row per image and one row per caption, written as two parquet files plus `index.json`. A caption's
split is its image's split (derived, not stored). Later stages record the fingerprint and refuse inputs
computed from a different index, so that features and images can never be silently misaligned.

Order is significant and stable: within a split, images and captions keep their global order, and the
feature store and image cache of that split use exactly this order.

Unpaired items (issue 12: distillation on data without captions):
- an UNPAIRED IMAGE is an image no caption points to: an ordinary image row, nothing else to store;
- an UNPAIRED TEXT is a caption of no image. It has no image to take a split from, so it lives in a table
  of its own, `unpaired_text` with `unpaired_text_split` (texts.parquet), never in the caption columns:
  every reader of `caption_image` keeps its meaning (a valid image row), and the caption order is untouched.
An index with unpaired texts is written as version 2 (a version-1 reader refuses it instead of silently
dropping them); one without is written exactly as before (version 1, same files, same fingerprint).

Image content (issue 13, freshness): `image_sha256` holds each image file's sha256 (a `sha256` column of
images.parquet, `content` in index.json = one digest over them), written by `kdpipe prepare`. The hashes are
deliberately NOT part of `fingerprint`: the fingerprint names what the rows ARE (ids, paths, splits,
captions), which the image cache and the feature store are laid out by and which every reader checks; the
hashes say which bytes each row was made from, which the caches record next to it (the image cache: the
`content` digest; the feature store: `image_content` and one digest per image chunk, `image_chunks`; distill
and evaluate compare the first two with the index, extract the last). So a replaced image
invalidates the rows made from it, not the whole store; an index without hashes (an older kdpipe) still
loads with `image_sha256 = None`, and every existing fingerprint is unchanged.

Images inside containers (issue 23: webdataset shards, parquet cells): `image_path` is then the shard or
parquet file, and `image_member` says where in it the image is: a `Members` of four columns (container "tar"
or "parquet", member name or image column, byte offset or row, byte length), "" / -1 on rows that are files
of their own. `image_ref(row)` turns a row into the `ImageRef` that pipeline/data/image_source.py opens. An
index with members is written as version 3 (its extra columns in images.parquet; an older reader refuses it
instead of decoding a tar file as an image) and its fingerprint covers them; one without is written as before.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.exif import EXIF_ORIENTATION
from pipeline.data.image_source import CONTAINERS, ImageRef
from pipeline.errors import InputError
from pipeline.store.durable import atomic_path, write_text_durably
from pipeline.store.ownership import Output, claim, read_small

INDEX_FORMAT = "kdpipe-index"
BAD_IMAGES_FILE = "bad_images.json"  # prepare's report of the images it could not decode, beside the index
# What an index is written into (pipeline/store/ownership.py): nothing but index files, or an index (index.json)
INDEX_DIR = Output(
    "a dataset index",
    directory=True,
    names=frozenset({"index.json", "images.parquet", "captions.parquet", "texts.parquet", BAD_IMAGES_FILE}),
    recognise=lambda p: json.loads(read_small(p / "index.json"))["format"] == INDEX_FORMAT,
)
INDEX_VERSION = 1  # paired captions (and unpaired images) only
INDEX_VERSION_UNPAIRED_TEXT = 2  # + texts.parquet
INDEX_VERSION_MEMBERS = 3  # + images inside containers (member columns in images.parquet), texts.parquet optional
INDEX_VERSIONS = (INDEX_VERSION, INDEX_VERSION_UNPAIRED_TEXT, INDEX_VERSION_MEMBERS)
MEMBER_COLUMNS = ("container", "member", "offset", "length")  # images.parquet columns of a version-3 index
SPLIT_ORDER = ("train", "val", "test")


@dataclass(frozen=True, eq=False)
class Members:
    """Where each image is inside its container (the `path` column), one entry per image row."""

    container: np.ndarray  # object (str) [N]: "" (a file of its own), "tar" or "parquet"
    member: np.ndarray  # object (str) [N]: the tar member's name, or the parquet image column; "" for files
    offset: np.ndarray  # int64 [N]: the tar member's first data byte, or the parquet row; -1 for files
    length: np.ndarray  # int64 [N]: the tar member's bytes; -1 otherwise

    def __post_init__(self) -> None:
        n = len(self.container)
        if not (len(self.member) == len(self.offset) == len(self.length) == n):
            raise ValueError("member columns differ in length")
        unknown = set(self.container.tolist()) - set(CONTAINERS)
        if unknown:
            raise ValueError(f"unknown container {sorted(unknown)[0]!r}; expected one of {CONTAINERS}")

    @classmethod
    def from_rows(cls, rows: list[tuple[str, str, int, int]]) -> Members:
        return cls(
            container=np.array([r[0] for r in rows], dtype=object),
            member=np.array([r[1] for r in rows], dtype=object),
            offset=np.array([r[2] for r in rows], dtype=np.int64),
            length=np.array([r[3] for r in rows], dtype=np.int64),
        )

    def take(self, rows: np.ndarray) -> Members:
        return Members(self.container[rows], self.member[rows], self.offset[rows], self.length[rows])


@dataclass(frozen=True, eq=False)
class SplitView:
    """The images and captions of one split, in index order."""

    name: str
    image_rows: np.ndarray  # int64 [N] rows of these images in the whole index
    image_id: np.ndarray  # object (str) [N]
    image_path: np.ndarray  # object (str) [N], absolute or relative to the working directory
    caption_rows: np.ndarray  # int64 [M] rows of these captions in the whole index
    caption_text: np.ndarray  # object (str) [M]
    text_image: np.ndarray  # int32 [M] row in this split's images of each caption's image
    unpaired_text: np.ndarray = field(default_factory=lambda: np.array([], dtype=object))  # object (str) [U]
    members: Members | None = None  # where each image is inside its container (image_path); None: files

    @property
    def n_images(self) -> int:
        return len(self.image_rows)

    @cached_property
    def image_ref(self) -> list[ImageRef]:
        """[N] where each image's bytes are (open with image_source.open_image); made when first asked for."""
        paths = self.image_path.tolist()
        m = self.members
        if m is None:
            return [ImageRef(p) for p in paths]
        return [
            ImageRef(p, c, k, o, n) if c else ImageRef(p)
            for p, c, k, o, n in zip(
                paths, m.container.tolist(), m.member.tolist(), m.offset.tolist(), m.length.tolist()
            )
        ]

    @cached_property
    def unpaired_image(self) -> np.ndarray:
        """int64 [N_u] rows in this split's images that no caption points to, in image order."""
        paired = np.zeros(self.n_images, dtype=bool)
        paired[self.text_image] = True
        return np.flatnonzero(~paired)

    @property
    def n_captions(self) -> int:
        return len(self.caption_rows)


@dataclass(frozen=True, eq=False)
class DatasetIndex:
    name: str
    image_root: Path  # relative image paths are resolved against it
    image_id: np.ndarray  # object (str) [N_images], unique
    image_path: np.ndarray  # object (str) [N_images], relative to image_root (or absolute)
    image_split: np.ndarray  # object (str) [N_images]
    caption_text: np.ndarray  # object (str) [N_captions], non-empty
    caption_image: np.ndarray  # int64 [N_captions], row in the images (an image no caption names is unpaired)
    # How every stage reads the image files: "ignore" their EXIF orientation tag (stored pixels as they are,
    # as torchvision, BEiT-3 and DSMD load them) or "apply" it (phone photos shot sideways come out upright).
    exif_orientation: str = "ignore"
    unpaired_text: np.ndarray = field(default_factory=lambda: np.array([], dtype=object))  # object (str) [U]
    unpaired_text_split: np.ndarray = field(default_factory=lambda: np.array([], dtype=object))  # object (str) [U]
    image_sha256: np.ndarray | None = None  # object (hex str, or None: file unreadable) [N_images]; None: unknown
    image_member: Members | None = None  # where each image is inside its container; None: every image is a file

    def __post_init__(self) -> None:
        if self.exif_orientation not in EXIF_ORIENTATION:
            raise ValueError(f"exif_orientation must be one of {EXIF_ORIENTATION}, got {self.exif_orientation!r}")
        n = len(self.image_id)
        if not (len(self.image_path) == len(self.image_split) == n):
            raise ValueError("image columns differ in length")
        if self.image_sha256 is not None and len(self.image_sha256) != n:
            raise ValueError("image_sha256 differs in length from the image columns")
        if self.image_member is not None and len(self.image_member.container) != n:
            raise ValueError("image_member differs in length from the image columns")
        if len(self.caption_text) != len(self.caption_image):
            raise ValueError("caption columns differ in length")
        if len(set(self.image_id.tolist())) != n:
            seen: set[str] = set()
            dup = next(i for i in self.image_id.tolist() if i in seen or seen.add(i))
            raise InputError(f"dataset {self.name}: image id {dup!r} appears more than once")
        if len(self.caption_image) and (self.caption_image.min() < 0 or self.caption_image.max() >= n):
            raise InputError(f"dataset {self.name}: a caption points at an image row outside 0..{n - 1}")
        if len(self.unpaired_text) != len(self.unpaired_text_split):
            raise ValueError("unpaired text columns differ in length")
        orphan = set(self.unpaired_text_split.tolist()) - set(self.image_split.tolist())
        if orphan:  # the image cache and the feature store are laid out per split of images
            raise InputError(f"dataset {self.name}: unpaired texts in split {sorted(orphan)[0]!r}, which has no images")

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_lists(
        cls,
        name: str,
        image_root: Path | str,
        images: list[tuple[str, str, str]],
        captions: list[tuple[str, int]],
        exif_orientation: str = "ignore",
        unpaired_texts: list[tuple[str, str]] = (),
        members: list[tuple[str, str, int, int]] | None = None,
    ) -> DatasetIndex:
        """images: (image_id, path, split) rows; captions: (text, image row) rows; unpaired_texts: (text, split);
        members: (container, member, offset, length) per image row, or None when every image is a file."""
        if members is not None and all(not c for c, _, _, _ in members):
            members = None  # every image a file of its own: the index is written as before
        return cls(
            name=name,
            image_root=Path(image_root),
            image_id=np.array([i for i, _, _ in images], dtype=object),
            image_path=np.array([p for _, p, _ in images], dtype=object),
            image_split=np.array([s for _, _, s in images], dtype=object),
            caption_text=np.array([t for t, _ in captions], dtype=object),
            caption_image=np.array([r for _, r in captions], dtype=np.int64),
            exif_orientation=exif_orientation,
            unpaired_text=np.array([t for t, _ in unpaired_texts], dtype=object),
            unpaired_text_split=np.array([s for _, s in unpaired_texts], dtype=object),
            image_member=None if members is None else Members.from_rows(members),
        )

    def drop_images(self, rows: np.ndarray | list[int]) -> DatasetIndex:
        """A new index without these image rows and without their captions (rows renumbered)."""
        keep = np.ones(len(self.image_id), dtype=bool)
        keep[np.asarray(rows, dtype=np.int64)] = False
        new_row = np.cumsum(keep) - 1
        cap_keep = keep[self.caption_image]
        return DatasetIndex(
            name=self.name,
            image_root=self.image_root,
            image_id=self.image_id[keep],
            image_path=self.image_path[keep],
            image_split=self.image_split[keep],
            caption_text=self.caption_text[cap_keep],
            caption_image=new_row[self.caption_image[cap_keep]],
            exif_orientation=self.exif_orientation,
            unpaired_text=self.unpaired_text,
            unpaired_text_split=self.unpaired_text_split,
            image_sha256=None if self.image_sha256 is None else self.image_sha256[keep],
            image_member=None if self.image_member is None else self.image_member.take(keep),
        )

    def with_hashes(self, image_sha256: list[str | None]) -> DatasetIndex:
        """The same index with these content hashes (one per image row; None for a file that could not be read)."""
        return replace(self, image_sha256=np.array(image_sha256, dtype=object))

    # -- derived views ------------------------------------------------------------------------------
    @property
    def n_images(self) -> int:
        return len(self.image_id)

    @property
    def n_captions(self) -> int:
        return len(self.caption_text)

    @property
    def n_unpaired_texts(self) -> int:
        return len(self.unpaired_text)

    @property
    def version(self) -> int:
        if self.image_member is not None:
            return INDEX_VERSION_MEMBERS
        return INDEX_VERSION_UNPAIRED_TEXT if self.n_unpaired_texts else INDEX_VERSION

    @cached_property
    def splits(self) -> tuple[str, ...]:
        """Split names present, train/val/test first, then any others alphabetically."""
        present = set(self.image_split.tolist())
        return tuple(s for s in SPLIT_ORDER if s in present) + tuple(sorted(present - set(SPLIT_ORDER)))

    def image_abspath(self, row: int) -> Path:
        """The file that holds image `row`: the image file, or its tar shard or parquet file."""
        p = Path(self.image_path[row])
        return p if p.is_absolute() else self.image_root / p

    def image_ref(self, row: int) -> ImageRef:
        """Where the bytes of image `row` are (pipeline/data/image_source.py opens it)."""
        path = str(self.image_abspath(row))
        m = self.image_member
        if m is None or not m.container[row]:
            return ImageRef(path)
        return ImageRef(path, m.container[row], m.member[row], int(m.offset[row]), int(m.length[row]))

    def describe_image(self, row: int) -> str:
        """Image `row` as error lines name it: its file, or its shard and member, or its parquet file and row."""
        return self.image_ref(row).describe()

    def split(self, name: str) -> SplitView:
        if name not in self.splits:
            raise InputError(f"dataset {self.name}: no split {name!r}; it has {', '.join(self.splits)}")
        image_rows = np.flatnonzero(self.image_split == name)
        local = np.full(self.n_images, -1, dtype=np.int64)
        local[image_rows] = np.arange(len(image_rows))
        caption_rows = np.flatnonzero(local[self.caption_image] >= 0)
        return SplitView(
            name=name,
            image_rows=image_rows,
            image_id=self.image_id[image_rows],
            image_path=np.array([str(self.image_abspath(r)) for r in image_rows], dtype=object),
            caption_rows=caption_rows,
            caption_text=self.caption_text[caption_rows],
            text_image=local[self.caption_image[caption_rows]].astype(np.int32),
            unpaired_text=self.unpaired_text[self.unpaired_text_split == name],
            members=None if self.image_member is None else self.image_member.take(image_rows),
        )

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the content (ids, relative paths, splits, captions and their images) and of how the images
        are read (only when EXIF orientation is applied: indexes that ignore it keep their fingerprints), not of
        image_root, so that moving the dataset directory keeps the fingerprint."""
        h = hashlib.sha256()
        h.update(f"{INDEX_FORMAT}/{INDEX_VERSION}\n".encode())
        _hash_strings(h, (self.image_id, self.image_path, self.image_split, self.caption_text))
        h.update(np.ascontiguousarray(self.caption_image, dtype="<i8").tobytes())
        if self.exif_orientation != "ignore":  # other pixels: features and image caches must not match
            h.update(f"\nexif_orientation={self.exif_orientation}".encode())
        if self.n_unpaired_texts:  # only then: an index without them keeps its fingerprint
            h.update(b"\nunpaired_text\n")
            _hash_strings(h, (self.unpaired_text, self.unpaired_text_split))
        if self.image_member is not None:  # only then, likewise: which member of which file each image is
            m = self.image_member
            h.update(b"\nmembers\n")
            # a parquet cell's row says which image it is; a tar member's offset and length only where a rewritten
            # shard put its bytes: location, like image_root (the content hashes say whether the bytes changed)
            rows = np.where(m.container == "parquet", m.offset, -1)
            _hash_strings(h, (m.container, m.member))
            h.update(np.ascontiguousarray(rows, dtype="<i8").tobytes())
        return h.hexdigest()

    def content_digest(self, rows: np.ndarray | None = None, splits: list[str] | None = None) -> str | None:
        """sha256 over the content hashes of image `rows`, or of the images of `splits` (split after split), or
        of all images, in that order; None when any is unknown. The image cache records it for all images, the
        feature store for the images of its splits and for the rows of each image chunk."""
        if self.image_sha256 is None:
            return None
        if splits is not None:
            rows = np.concatenate([self.split(s).image_rows for s in splits]) if splits else np.array([], np.int64)
        hashes = self.image_sha256 if rows is None else self.image_sha256[np.asarray(rows, dtype=np.int64)]
        if any(v is None for v in hashes.tolist()):
            return None
        h = hashlib.sha256(f"kdpipe-image-content/1\n{len(hashes)}\n".encode())
        for v in hashes.tolist():
            h.update(bytes.fromhex(v))
        return h.hexdigest()

    def check_made_from(self, recorded: str | None, where: str, stage: str, splits: list[str] | None = None) -> None:
        """Refuse an output that records other image content (of `splits`, default all) than this index's: an
        image file was replaced and `stage` was not rerun since (the fingerprint cannot tell: it leaves the
        bytes out). Outputs or indexes without hashes (an older kdpipe) are not checked."""
        now = self.content_digest(splits=splits)
        if recorded is not None and now is not None and recorded != now:
            raise InputError(
                f"{where}: made from image files that changed since (content {recorded[:12]}, the index now "
                f"{now[:12]}); rerun `kdpipe {stage}`"
            )

    # -- storage ------------------------------------------------------------------------------------
    def save(self, directory: Path | str) -> None:
        """Write images.parquet, captions.parquet and index.json (written last: it marks the index complete)."""
        directory = Path(directory)
        claim(directory, INDEX_DIR)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "index.json").unlink(missing_ok=True)
        images = pa.table(
            {
                "image_id": pa.array(self.image_id.tolist(), pa.string()),
                "path": pa.array(self.image_path.tolist(), pa.string()),
                "split": pa.array(self.image_split.tolist(), pa.string()),
                # only when known: an index without hashes is written exactly as before
                **({} if self.image_sha256 is None else {"sha256": pa.array(self.image_sha256.tolist(), pa.string())}),
                **({} if self.image_member is None else _member_columns(self.image_member)),
            }
        )
        captions = pa.table(
            {
                "text": pa.array(self.caption_text.tolist(), pa.string()),
                "image_row": pa.array(self.caption_image, pa.int64()),
            }
        )
        (directory / "texts.parquet").unlink(missing_ok=True)
        tables = [("images.parquet", images), ("captions.parquet", captions)]
        if self.n_unpaired_texts:
            texts = pa.table(
                {
                    "text": pa.array(self.unpaired_text.tolist(), pa.string()),
                    "split": pa.array(self.unpaired_text_split.tolist(), pa.string()),
                }
            )
            tables.append(("texts.parquet", texts))
        for name, table in tables:
            with atomic_path(directory / name) as tmp:
                pq.write_table(table, tmp)
        meta = {
            "format": INDEX_FORMAT,
            "version": self.version,
            "name": self.name,
            "image_root": str(self.image_root),
            "fingerprint": self.fingerprint,
            "exif_orientation": self.exif_orientation,
            "n_images": self.n_images,
            "n_captions": self.n_captions,
            **({} if self.image_sha256 is None else {"content": self.content_digest()}),
            # version 3 only: whether texts.parquet belongs to the index (versions 1 and 2 say it by the number)
            **({} if self.image_member is None else {"unpaired_texts": self.n_unpaired_texts}),
            "splits": {
                s: {
                    "images": int((self.image_split == s).sum()),
                    "captions": int((self.image_split[self.caption_image] == s).sum()),
                }
                for s in self.splits
            },
        }
        if self.n_unpaired_texts or self.n_images > len(np.unique(self.caption_image)):
            for s, counts in meta["splits"].items():  # absent for paired-only data: index.json as before
                view = self.split(s)
                counts.update(unpaired_images=len(view.unpaired_image), unpaired_texts=len(view.unpaired_text))
        write_text_durably(directory / "index.json", json.dumps(meta, indent=2) + "\n")  # last: marks it whole

    @classmethod
    def load(cls, directory: Path | str) -> DatasetIndex:
        directory = Path(directory)
        meta_path = directory / "index.json"
        if not meta_path.is_file():
            raise InputError(f"{directory}: no dataset index here (index.json missing); run `kdpipe prepare` first")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != INDEX_FORMAT or meta.get("version") not in INDEX_VERSIONS:
            versions = ", ".join(f"v{v}" for v in INDEX_VERSIONS)
            raise InputError(f"{meta_path}: not a {INDEX_FORMAT} index of a version this kdpipe reads ({versions})")
        images = pq.read_table(directory / "images.parquet")
        captions = pq.read_table(directory / "captions.parquet")
        texts = {"text": [], "split": []}
        has_texts = meta["version"] == INDEX_VERSION_UNPAIRED_TEXT or bool(meta.get("unpaired_texts"))
        if has_texts:
            if not (directory / "texts.parquet").is_file():
                raise InputError(
                    f"{directory}: a v{meta['version']} index without texts.parquet; rerun `kdpipe prepare`"
                )
            texts = pq.read_table(directory / "texts.parquet").to_pydict()
        members = None
        if meta["version"] == INDEX_VERSION_MEMBERS:
            missing = [c for c in MEMBER_COLUMNS if c not in images.column_names]
            if missing:
                raise InputError(
                    f"{directory}: images.parquet lacks the column {missing[0]!r} of a v3 index; rerun `kdpipe prepare`"
                )
            members = Members(
                container=np.array(images["container"].to_pylist(), dtype=object),
                member=np.array(images["member"].to_pylist(), dtype=object),
                offset=images["offset"].to_numpy().astype(np.int64),
                length=images["length"].to_numpy().astype(np.int64),
            )
        index = cls(
            name=meta["name"],
            image_root=Path(meta["image_root"]),
            image_id=np.array(images["image_id"].to_pylist(), dtype=object),
            image_path=np.array(images["path"].to_pylist(), dtype=object),
            image_split=np.array(images["split"].to_pylist(), dtype=object),
            caption_text=np.array(captions["text"].to_pylist(), dtype=object),
            caption_image=captions["image_row"].to_numpy().astype(np.int64),
            exif_orientation=meta.get("exif_orientation", "ignore"),
            unpaired_text=np.array(texts["text"], dtype=object),
            unpaired_text_split=np.array(texts["split"], dtype=object),
            image_sha256=np.array(images["sha256"].to_pylist(), dtype=object)
            if "sha256" in images.column_names
            else None,
            image_member=members,
        )
        if index.fingerprint != meta["fingerprint"]:
            raise InputError(f"{directory}: index content does not match its recorded fingerprint (edited by hand?)")
        if index.image_sha256 is not None and index.content_digest() != meta.get("content"):
            raise InputError(f"{directory}: image hashes do not match the recorded content digest (edited by hand?)")
        return index


def _member_columns(m: Members) -> dict[str, pa.Array]:
    return {
        "container": pa.array(m.container.tolist(), pa.string()),
        "member": pa.array(m.member.tolist(), pa.string()),
        "offset": pa.array(m.offset, pa.int64()),
        "length": pa.array(m.length, pa.int64()),
    }


def _hash_strings(h, columns) -> None:
    """Each column's length, then each string length-prefixed (so no separator can be forged)."""
    for column in columns:
        h.update(f"{len(column)}\n".encode())
        for value in column.tolist():
            b = value.encode("utf-8")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)


def read_fingerprint(directory: Path | str) -> str:
    """The recorded fingerprint of an index directory, without loading the tables."""
    return read_identity(directory)["fingerprint"]


def read_identity(directory: Path | str) -> dict[str, str | None]:
    """{fingerprint, content} recorded by an index directory (the rows, and the digest of the image files' hashes:
    None for an index without them), without loading the tables."""
    meta_path = Path(directory) / "index.json"
    if not meta_path.is_file():
        raise InputError(f"{directory}: no dataset index here (index.json missing); run `kdpipe prepare` first")
    meta = json.loads(meta_path.read_text())
    return {"fingerprint": meta["fingerprint"], "content": meta.get("content")}
