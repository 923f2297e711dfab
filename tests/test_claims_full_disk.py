"""A full disk while claiming a row: the error names the claim file and the way out, and leaves no empty claim."""

from __future__ import annotations

import errno
import os

import pytest

from trl_selfdistill.claims import RowClaims


@pytest.mark.parametrize("call", ["open", "write"])
def test_a_full_disk_names_the_claim_file_and_what_to_do(call, monkeypatch, tmp_path):
    real = getattr(os, call)

    def no_space(target, *args):
        # Only claim files meet the full disk (by path for open, by descriptor for write): the disk is not under test.
        name = target if call == "open" else os.readlink(f"/proc/self/fd/{target}")
        if str(name).endswith(".claim"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(target, *args)

    claims = RowClaims(tmp_path / "claims")
    monkeypatch.setattr(os, call, no_space)
    with pytest.raises(OSError, match=r"claims/\w+\.claim: No space left on device.*sdft_cache_dir") as failure:
        claims.claim(["row-1"])
    monkeypatch.undo()
    assert failure.value.errno == errno.ENOSPC
    assert "rerun to resume" in str(failure.value)
    assert list((tmp_path / "claims").glob("*.claim")) == []  # no empty claim holding the row from other runs
    assert claims.claim(["row-1"]) == (["row-1"], None)  # space freed: the row is claimed
    claims.close()
