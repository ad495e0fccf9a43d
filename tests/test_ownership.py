"""kdpipe never deletes what it did not write: the ownership rule itself (pipeline/store/ownership.py) and its
use by durable.atomic_dir / replace_dir. The commands' own tests are in test_outputs_kept.py."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import InputError
from pipeline.store.durable import atomic_dir, atomic_path, replace_dir
from pipeline.store.ownership import MARKER, Output, claim, json_with_keys

LISTED = Output("a test export", directory=True, marker=True)
NAMED = Output("a test index", directory=True, names=frozenset({"index.bin", "ids.json"}))
DOC = Output("a test document", recognise=json_with_keys("split", "n_images"))


def test_nothing_or_empty_may_be_replaced(tmp_path):
    claim(tmp_path / "absent", LISTED)
    (tmp_path / "empty").mkdir()
    claim(tmp_path / "empty", LISTED)
    (tmp_path / "empty.json").write_bytes(b"")
    claim(tmp_path / "empty.json", DOC)


@pytest.mark.parametrize("kind", [LISTED, NAMED, DOC])
def test_what_is_not_the_writers_own_is_refused_in_one_line(tmp_path, kind):
    user = tmp_path / "user"
    if kind.directory:
        user.mkdir()
        (user / "notes.txt").write_text("mine")
    else:
        user.write_text('{"mine": 1}')
    with pytest.raises(InputError) as err:
        claim(user, kind)
    message = str(err.value)
    assert message.startswith(f"{user}: exists and ") and "\n" not in message
    assert "move it away or choose another path" in message
    # a directory where a file goes, and a file where a directory goes
    other = tmp_path / "other"
    other.mkdir() if not kind.directory else other.write_text("x")
    with pytest.raises(InputError, match="is a (directory|file), where"):
        claim(other, kind)


def test_each_way_of_recognising_an_earlier_output(tmp_path):
    doc = tmp_path / "metrics.json"
    doc.write_text(json.dumps({"split": "test", "n_images": 3}))
    claim(doc, DOC)
    index = tmp_path / "index"
    index.mkdir()
    (index / "ids.json").write_text("[]")
    claim(index, NAMED)  # nothing but names its writer writes
    (index / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="exists and holds notes.txt, which kdpipe does not write there"):
        claim(index, NAMED)


def test_atomic_dir_lists_its_files_and_replaces_only_while_nothing_was_added(tmp_path):
    out = tmp_path / "export"
    for run in ("first", "second"):  # the writer's own earlier output is replaced whole
        with atomic_dir(out, LISTED) as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "weights.bin").write_text(run)
    assert (out / "sub" / "weights.bin").read_text() == "second"
    assert json.loads((out / MARKER).read_text()) == {"written_by": LISTED.what, "files": ["sub/weights.bin"]}
    (out / "sub" / "my-notes.txt").write_text("mine")  # a user's file in it: no longer only kdpipe's
    with pytest.raises(InputError, match="exists and holds sub/my-notes.txt, which kdpipe did not write there"):
        with atomic_dir(out, LISTED) as tmp:
            raise AssertionError("never reached: refused before any work")
    assert (out / "sub" / "my-notes.txt").read_text() == "mine"
    # another writer's listed directory is not this one's
    with pytest.raises(InputError, match="exists and is not a test index written by kdpipe"):
        claim(out, Output("a test index", directory=True, marker=True))


def test_replace_dir_claims_again_just_before_it_deletes(tmp_path):
    """What appears at the target while the new directory is being built is not deleted either."""
    out = tmp_path / "index"
    with pytest.raises(InputError, match="exists and holds photo.jpg"):
        with atomic_dir(out, NAMED) as tmp:
            (tmp / "ids.json").write_text("[]")
            out.mkdir()
            (out / "photo.jpg").write_bytes(b"a user's photo")
    assert (out / "photo.jpg").read_bytes() == b"a user's photo"
    assert [p.name for p in tmp_path.iterdir()] == ["index"]  # the temp directory is gone
    new = tmp_path / ".new"
    new.mkdir()
    with pytest.raises(InputError):
        replace_dir(new, out, NAMED)
    assert (out / "photo.jpg").is_file()


def test_atomic_path_replaces_a_file_only_when_told_what_it_may_replace(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("my spreadsheet")
    with pytest.raises(InputError, match="exists and is not a test document written by kdpipe"):
        with atomic_path(target, DOC) as tmp:
            tmp.write_text("{}")
    assert target.read_text() == "my spreadsheet"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_recogniser_never_reads_a_huge_file_whole(tmp_path, monkeypatch):
    from pipeline.store import ownership

    monkeypatch.setattr(ownership, "_MAX_RECOGNISED_BYTES", 16)
    big = tmp_path / "metrics.json"
    big.write_text(json.dumps({"split": "test", "n_images": 3}))  # 31 bytes: over the (patched) limit
    with pytest.raises(InputError, match="exists and is not a test document"):
        claim(big, DOC)
