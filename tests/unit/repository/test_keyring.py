"""Key rotation on a real local-directory repository: new key object verified before the old one goes."""

from __future__ import annotations

import os

import pytest

from lifeboat.core import keys
from lifeboat.core.errors import KeyUnlockError
from lifeboat.repository.keyring import list_keys, rotate_key
from lifeboat.repository.local import LocalBackend
from lifeboat.repository.repo import Repository


def stats(root) -> dict[str, tuple[int, bytes]]:
    out = {}
    for folder, _, files in os.walk(root):
        for f in files:
            p = os.path.join(folder, f)
            rel = os.path.relpath(p, root)
            if not rel.startswith("keys"):
                with open(p, "rb") as fh:
                    out[rel] = (os.stat(p).st_mtime_ns, fh.read())
    return out


async def test_rotate_replaces_the_key_that_opened_and_keeps_every_other_object(tmp_path):
    root = tmp_path / "repo"
    old = keys.write_key_file(str(tmp_path / "old.key"))
    second = keys.write_key_file(str(tmp_path / "second.key"))
    repo = await Repository.init(LocalBackend(str(root)), old)
    await repo.add_key(second)
    before = stats(root)

    repo = await Repository.open(LocalBackend(str(root)), old)
    opened_with = repo.key_name
    assert opened_with and opened_with.startswith("keys/")
    new = keys.write_key_file(str(tmp_path / "new.key"))
    result = await rotate_key(repo, new)
    assert result.removed == [opened_with] and result.added != opened_with
    assert stats(root) == before  # config (and any data) untouched

    with pytest.raises(KeyUnlockError, match="none of the 2 key objects"):
        await Repository.open(LocalBackend(str(root)), old)
    reopened = await Repository.open(LocalBackend(str(root)), new)
    assert reopened.id == repo.id and reopened.segment_key == repo.segment_key  # same master key
    assert (await Repository.open(LocalBackend(str(root)), second)).id == repo.id  # the other key still works
    listing = await list_keys(reopened)
    assert sorted(k.kdf for k in listing) == ["keyfile", "keyfile"]
    assert [k.name for k in listing if k.current] == [result.added]

    final = await rotate_key(reopened, keys.write_key_file(str(tmp_path / "final.key")), remove_all_others=True)
    assert sorted(final.removed) == sorted(k.name for k in listing)
    with pytest.raises(KeyUnlockError):
        await Repository.open(LocalBackend(str(root)), second)
    assert [k.current for k in await list_keys(reopened)] == [True]
