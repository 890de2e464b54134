"""Result files are replaced whole, with the permissions a plain open gives, and no temporary file is left."""
from __future__ import annotations

import json
import os
import stat

import pytest

from mergeplug.atomic import replacing, write_bytes, write_json, write_text


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_a_replaced_file_gets_the_permissions_a_plain_open_gives(tmp_path):
    old = os.umask(0o027)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        write_text(tmp_path / "ours.txt", "x")
        write_bytes(tmp_path / "ours.bin", b"x")
        assert _mode(tmp_path / "ours.txt") == _mode(tmp_path / "ours.bin") == _mode(plain) == 0o640
    finally:
        os.umask(old)


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "summary.json"
    write_json(path, {"a": 1})
    with pytest.raises(RuntimeError):
        with replacing(path) as handle:
            handle.write('{"a": 2')
            raise RuntimeError("interrupted")
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_write_json_writes_indented_json_with_its_options(tmp_path):
    path = tmp_path / "deep" / "er" / "x.json"  # parents are made
    write_json(path, {"b": "é", "a": 3})
    assert path.read_text(encoding="utf-8") == '{\n  "b": "é",\n  "a": 3\n}\n'
    write_json(path, {"b": "é", "a": 1}, sort_keys=True, ensure_ascii=True)
    assert path.read_text() == '{\n  "a": 1,\n  "b": "\\u00e9"\n}\n'
    write_json(path, {"p": tmp_path})  # anything else as str
    assert json.loads(path.read_text()) == {"p": str(tmp_path)}
