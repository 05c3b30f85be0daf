"""The sender retries a connect that hit uvloop's stale-descriptor race on a fresh pool, and nothing else."""

import pytest

from lifeboat.mobility.sender import BatchSender


def _sender(tmp_path) -> BatchSender:
    from lifeboat.core import tls

    ca_pem, _ = tls.create_ca(str(tmp_path / "tls"))
    return BatchSender("https://127.0.0.1:1", ca_pem, "t" * 32, 5.0, 0.01)


async def test_stale_descriptor_error_is_retried_on_a_new_session(tmp_path):
    async with _sender(tmp_path) as sender:
        first = sender.session
        calls = []

        async def attempt():
            calls.append(sender.session)
            if len(calls) == 1:
                raise RuntimeError("File descriptor 15 is used by transport <TCPTransport closed=False reading=True>")
            return "acknowledged"

        assert await sender._retrying("batch web01.sda/1", attempt) == "acknowledged"
        assert calls[0] is first and calls[1] is not first and not calls[1].closed
    assert first.closed


async def test_other_runtime_errors_are_not_swallowed(tmp_path):
    async with _sender(tmp_path) as sender:
        async def attempt():
            raise RuntimeError("a bug in the caller")

        with pytest.raises(RuntimeError, match="a bug in the caller"):
            await sender._retrying("batch web01.sda/1", attempt)
