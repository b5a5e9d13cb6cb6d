import pytest

from mmssl.files import atomic_path, atomic_write, sha256_file, write_text


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
