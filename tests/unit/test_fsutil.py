"""still.fsutil: staged dirs appear whole, with the modes a plain open()/mkdir() gives."""

import contextlib
import os
import stat

import pytest

from still.errors import StillError
from still.fsutil import atomic_write_text, staged_dir, umask_modes


@contextlib.contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_a_staged_dir_gets_the_umasks_modes_not_mkdtemps_or_safetensors(tmp_path, mask):
    import torch
    from safetensors.torch import save_file

    with umask(mask):
        (tmp_path / "plain").write_text("x")  # what open() gives under this umask
        with staged_dir(tmp_path / "out") as staging:
            save_file({"w": torch.zeros(2)}, staging / "model.safetensors")
            (staging / "sub").mkdir()
            atomic_write_text(staging / "sub" / "card.md", "hi")
    out = tmp_path / "out"
    assert mode(tmp_path / "plain") == 0o666 & ~mask
    assert mode(out) == mode(out / "sub") == 0o777 & ~mask  # mkdtemp alone gives 0700
    for name in ("model.safetensors", "sub/card.md"):  # safetensors alone gives 0600
        assert mode(out / name) == 0o666 & ~mask, name


def test_umask_modes_keeps_an_executable_executable_and_leaves_links(tmp_path):
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o700)
    target = tmp_path / "elsewhere"
    target.write_text("not ours")
    target.chmod(0o600)
    (tmp_path / "link").symlink_to(target)
    with umask(0o022):
        umask_modes(script)
        umask_modes(tmp_path / "link")
    assert mode(script) == 0o755 and mode(target) == 0o600


def test_a_failed_staged_dir_leaves_nothing_and_keeps_the_target(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("keep")
    with pytest.raises(RuntimeError), staged_dir(target, replace=True) as staging:
        (staging / "new").write_text("half")
        raise RuntimeError("crash")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (target / "old").read_text() == "keep"
    with pytest.raises(StillError, match="appeared while"), staged_dir(target):
        pass
    assert (target / "old").read_text() == "keep"
