from __future__ import annotations

import json
import zipfile

import pytest
import torch

from passforge.ir.capture import CaptureError
from passforge.ir.serialize import atomic_path, load_graph, save_graph


def test_save_load_round_trip(llama_graph, tokens, tmp_path):
    save_graph(llama_graph, tmp_path / "g.pt2", (tokens,))
    loaded = load_graph(tmp_path / "g.pt2")
    torch.testing.assert_close(loaded(tokens), llama_graph(tokens), rtol=0, atol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["g.pt2"]  # no temporary left behind


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half-written")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def _rewrite_entry(src, dst, suffix: str, edit) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.namelist():
            data = zin.read(item)
            if item.endswith(suffix):
                config = json.loads(data)
                edit(config)
                data = json.dumps(config).encode()
            zout.writestr(item, data)


def test_archives_with_pickled_entries_are_refused(llama_graph, tokens, tmp_path):
    save_graph(llama_graph, tmp_path / "good.pt2", (tokens,))

    def flag_pickle(config: dict) -> None:
        first = next(iter(config["config"]))
        config["config"][first]["use_pickle"] = True

    _rewrite_entry(tmp_path / "good.pt2", tmp_path / "evil.pt2", "_weights_config.json", flag_pickle)
    with pytest.raises(CaptureError, match=r"refusing to load.*pickled object"):
        load_graph(tmp_path / "evil.pt2")


def test_corrupt_archive_gets_a_clear_error(tmp_path):
    (tmp_path / "junk.pt2").write_bytes(b"not a zip at all")
    with pytest.raises(CaptureError, match=r"not a readable \.pt2 archive"):
        load_graph(tmp_path / "junk.pt2")
