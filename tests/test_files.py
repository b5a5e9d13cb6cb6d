import pytest

from mmssl.errors import ConfigError
from mmssl.files import atomic_path, atomic_write, check_new_folder, new_folder, sha256_file, write_text


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "state.pt"
    path.write_bytes(b"old")

    def broken(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary left behind


def test_atomic_path_replaces_only_a_finished_file(tmp_path):
    path = tmp_path / "shard.safetensors"
    write_text(path, "old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        assert tmp.suffix == ".safetensors" and tmp.parent == tmp_path
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == [path.name]
    with atomic_path(path) as tmp:
        tmp.write_text("new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_sha256_of_a_file(tmp_path):
    import hashlib

    write_text(tmp_path / "a.txt", "abc")
    assert sha256_file(tmp_path / "a.txt") == hashlib.sha256(b"abc").hexdigest()


def test_text_that_is_not_utf8_is_named_by_file_line_and_column(tmp_path):
    from mmssl.errors import DataError
    from mmssl.files import read_text, text_lines

    path = tmp_path / "notes.txt"
    path.write_bytes(b"fine\nalso fine\r\ncaf\xe9\n")
    for read in (read_text, lambda p: list(text_lines(p))):
        with pytest.raises(DataError, match=r"notes.txt:3: not UTF-8 text \(byte 0xe9 at column 4\)"):
            read(path)
    path.write_text("été\r\nok\n", encoding="utf-8")
    assert read_text(path) == "été\nok\n" and list(text_lines(path)) == ["été\n", "ok\n"]


def test_atomic_dir_replaces_a_folder_whole_or_not_at_all(tmp_path):
    from mmssl.files import atomic_dir

    out = tmp_path / "index"
    out.mkdir()
    (out / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("new")
        raise RuntimeError("killed")
    assert [p.name for p in tmp_path.iterdir()] == ["index"] and (out / "a.txt").read_text() == "old"
    with atomic_dir(out) as tmp:
        (tmp / "b.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["index"]
    assert [p.name for p in out.iterdir()] == ["b.txt"]  # the old folder went whole


def test_new_folder_is_swapped_in_whole_and_never_over_a_folder_it_did_not_make(tmp_path):
    out = tmp_path / "km"
    with new_folder(out) as tmp:
        assert tmp.parent == tmp_path and tmp != out and not out.exists()
        (tmp / "train.km").write_text("1 2\n")
    assert [p.name for p in tmp_path.iterdir()] == ["km"] and (out / "train.km").read_text() == "1 2\n"
    # a second command may not write into it...
    with pytest.raises(ConfigError, match="--overwrite"), new_folder(out):
        raise AssertionError("never entered")
    with pytest.raises(ConfigError, match="--force"):
        check_new_folder(out, overwrite=False, flag="--force")
    # ...unless told to, and then the old content goes: no mix of two runs
    with new_folder(out, overwrite=True) as tmp:
        (tmp / "valid.km").write_text("3\n")
    assert sorted(p.name for p in out.iterdir()) == ["valid.km"]
    assert [p.name for p in tmp_path.iterdir()] == ["km"]


def test_a_failed_command_leaves_the_old_folder_or_none(tmp_path):
    out = tmp_path / "km"
    with pytest.raises(RuntimeError), new_folder(out) as tmp:
        (tmp / "half.km").write_text("1")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []  # no empty or half-filled folder left behind
    out.mkdir()  # an empty folder (made by the user) is fine to fill
    check_new_folder(out, overwrite=False)
    (out / "keep").write_text("old")
    with pytest.raises(RuntimeError), new_folder(out, overwrite=True) as tmp:
        raise RuntimeError("killed")
    assert [p.name for p in tmp_path.iterdir()] == ["km"] and (out / "keep").read_text() == "old"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        check_new_folder(tmp_path / "file", overwrite=True)
