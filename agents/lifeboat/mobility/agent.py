"""The mobility agent: reconcile state with the process server, then run replication cycles."""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from ..core import logging as log
from ..core import malloc
from ..core.config import MobilityConfig, resolve_credential
from ..core.errors import ConfigError, LifeboatError
from .capture import Capturer, is_block_device
from .change_log import ChangeLog, Tier, reason_code
from .digest_map import DigestMap
from .digest_tracker import PendingBatch, ScanAborted, device_size, scan_disk, whole_disk
from .group import GroupCoordinator, GroupMember, GroupMetrics, Hold, coordinator_of
from .kept_data import KeptDataSnapshot
from .metrics import RESYNC_REASONS, TIER_REASONS, MobilityMetrics
from .quiescer import run_script
from .sender import BatchSender, SendWindow
from .snapshot import FreezeCopySnapshot
from .tracepoint import TracefsUnavailable, TracepointTracker, instance_name

logger = log.get("lifeboat.mobility")
# Batches read ahead of the sender per disk. Peak memory per disk is about (QUEUE_BATCHES + 4) ×
# batch_bytes of payload: being built, queued, being compressed, compressed and waiting, being
# sent (the last two compressed, so smaller); the body is sent from its parts, never joined.
QUEUE_BATCHES = 1
# Each batch's write frames are zstd-compressed in this many slices on the default executor,
# so both cores compress while the scan thread reads the next batch and the loop sends the last.
COMPRESS_SLICES = 4
# Batches per disk sent at once: the process server receives and fsyncs them side by side and
# acknowledges them in order, so no round trip or fsync is waited for between two batches.
# 3, not 2: 1 GiB initial copy on an idle host, alternating, ratio to the ceiling 0.78 against
# 0.72 (median of 3), for 168-173 against 154-157 MiB of agent peak RSS.
SEND_WINDOW = 3
# ...and at most this many body bytes in flight per disk: a compressed batch is ≈ 6 MiB of 16 on
# mixed data; incompressible ones go 2 at a time.
SEND_WINDOW_BYTES = 32 * 1024 * 1024
TRACKER_HANDOVER_FILE = "tracepoint-handover.json"


@dataclass
class DiskState:
    name: str        # as configured ("sda")
    disk_id: str     # repository-wide id ("web01.sda")
    path: str
    dmap: DigestMap
    resync_reason: str | None = None
    full_reason: str | None = None                # the next cycle reads every block, and why
    owed: list[tuple[int, int]] | None = None     # blocks of a failed cycle, retried by the next one
    change_log: ChangeLog | None = None           # tracked disks: what must still be sent, tiered (.hrl)


class DiskChanged(LifeboatError):
    """{}"""   # a protected disk changed under the agent (size, or it vanished)


class Agent:
    def __init__(self, config: MobilityConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.metrics = MobilityMetrics(registry)
        self.disks: list[DiskState] = []
        self.sender: BatchSender | None = None
        # Compression and map updates of the send path (zstandard releases the GIL): one per core.
        self._cpu_pool = ThreadPoolExecutor(max(2, os.cpu_count() or 2), thread_name_prefix="agent-cpu")
        self.cycle = 0
        self.last_point: dict | None = None
        self.tracker: TracepointTracker | None = None
        self.capturer: Capturer | None = None
        self._last_app = float("-inf")
        self._kept_bytes = 0   # freeze-copied bytes the change log kept for the current cycle
        self._group_fields: dict = {}
        self.cycle_lock = asyncio.Lock()
        self.group_port: int | None = None
        self.control = None   # ControlLink when [control] api_url is set: heartbeats, policy, moves
        self.resyncs_seen: dict[str, tuple[str, float]] = {}   # disk id -> (reason, unix time), for status

    def _token(self) -> str:
        path = resolve_credential(self.config.process_server.token_file)
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError as exc:
            raise ConfigError("process_server.token_file", f"cannot read {path}: {exc.strerror}") from None

    async def start(self) -> None:
        cfg = self.config
        os.makedirs(cfg.state_dir, exist_ok=True)
        link = cfg.process_server
        url = link.url
        if cfg.control.api_url:
            # Ask the configuration server first: the machine may have been moved to another process
            # server while this agent was stopped (the configured one no longer has its latest batches).
            from .control_client import ControlLink
            self.control = ControlLink(cfg)
            reply = await self.control.heartbeat(self, "starting")
            url = ((reply or {}).get("process_server") or {}).get("url") or url
        self.sender = BatchSender(url, resolve_credential(link.ca_cert), self._token(),
                                  link.timeout_seconds, link.retry_max_seconds)
        await self.sender.__aenter__()
        for i, d in enumerate(cfg.disks):
            try:
                size = device_size(d.path)
            except OSError as exc:
                raise ConfigError(f"disks[{i}].path", f"cannot open {d.path}: {exc.strerror}") from None
            if size == 0 or size % 512:
                raise ConfigError(f"disks[{i}].path", f"{d.path} has {size} bytes, not a positive multiple of 512")
            disk_id = f"{cfg.machine}.{d.id}"
            acked = await self.sender.acked_seq(disk_id)
            state = self._reconcile(disk_id, d.path, size, acked)
            state.name = d.id
            self.disks.append(state)
        self.cycle = max(s.dmap.cycle for s in self.disks)
        self.tracker = self._start_tracker()
        for state in self.disks:
            if self.tracker and state.disk_id in self.tracker.disks:
                self._open_change_log(state)
        self.capturer = Capturer(cfg, {s.disk_id: s.path for s in self.disks}, self.tracker)

    def _note_resync(self, disk_id: str, reason: str | None) -> None:
        self.resyncs_seen[disk_id] = (reason or "unknown", time.time())

    def _open_change_log(self, state: DiskState) -> None:
        """The disk's .hrl; decide whether tracking continues from the last run or needs a digest resync."""
        t = self.config.tracking
        cl = ChangeLog.open(os.path.join(self.config.state_dir, f"{state.disk_id}.hrl"), state.disk_id,
                            state.dmap.disk_size, state.dmap.block_size, pool_bytes=t.memory_pool_bytes,
                            spill_bytes=t.spill_bytes, extent_budget=t.extent_budget,
                            bitmap_budget=t.bitmap_budget_bytes,
                            on_tier_change=functools.partial(self._tier_changed, state.disk_id))
        state.change_log = cl
        if state.resync_reason or state.dmap.cycle == 0:
            reason = state.resync_reason or "initial_copy"
        elif cl.tier == Tier.RESYNC:
            reason = None  # the log says why (unclean_stop, a damaged record, ...) and already requires it
        elif cl.fresh:
            reason = "no_change_log"
        elif not self.tracker.reused:
            # The kernel instance that kept tracking while no agent ran is gone (reboot, first start).
            reason = "agent_restart"
        else:
            reason = None
        if reason:
            cl.require_resync(reason, through_epoch=self.cycle + 1)
        self._tier_gauge(state.disk_id, cl)
        if cl.tier == Tier.RESYNC and reason != "initial_copy":
            code = reason_code(cl.tier_reason) or "other"
            self.metrics.resyncs.labels(code if code in RESYNC_REASONS else "tracking_lost").inc()
            self._note_resync(state.disk_id, cl.tier_reason)
            logger.warning("digest resync: writes while the agent was stopped are unknown", DISK=state.disk_id,
                           reason=cl.tier_reason)
        elif cl.tier != Tier.RESYNC:
            logger.info("change tracking continues from the previous run", DISK=state.disk_id, tier=cl.tier.name)

    def _save_handover(self, tracker: TracepointTracker) -> None:
        """For the next agent process: the tracefs instance stays, with these lost-event counters."""
        path = os.path.join(self.config.state_dir, TRACKER_HANDOVER_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"instance": tracker.instance_name, "counters": tracker.handover()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _tier_changed(self, disk_id: str, old: Tier, new: Tier, reason: str) -> None:
        code = reason_code(reason) or "other"
        self.metrics.tier_changes.labels(new.name.lower(), code if code in TIER_REASONS else "other").inc()
        self.metrics.tier.labels(disk_id).set(int(new))

    def _tier_gauge(self, disk_id: str, cl: ChangeLog) -> None:
        self.metrics.tier.labels(disk_id).set(int(cl.tier))

    def status(self) -> dict:
        """Per-disk tracking state for /healthz (and, later, `lifeboat status`)."""
        disks = {}
        for s in self.disks:
            cl = s.change_log
            disks[s.disk_id] = {"tracker": "tracepoint" if cl else "digest",
                                "tier": cl.tier.name.lower() if cl else None,
                                "tier_reason": cl.tier_reason if cl else None}
        return {"last_point": self.last_point, "cycle": self.cycle, "disks": disks}

    def _start_tracker(self) -> TracepointTracker | None:
        """The tracepoint tracker for the block-device disks, or None (every cycle reads every block)."""
        t = self.config.tracking
        if t.tracker == "digest":
            return None
        devices = {s.disk_id: s.path for s in self.disks if is_block_device(s.path)}
        files = [s.disk_id for s in self.disks if s.disk_id not in devices]
        if files:
            logger.info("digest tracker for disks that are not block devices", disks=files)
        if not devices:
            return None
        tracker = TracepointTracker(devices, self.config.replication.block_size,
                                    instance_name(self.config.machine, self.config.state_dir),
                                    buffer_kb=t.trace_buffer_kb, drain_interval=t.drain_interval_seconds)
        handover_path = os.path.join(self.config.state_dir, TRACKER_HANDOVER_FILE)
        handover = None
        try:
            with open(handover_path) as f:
                saved = json.load(f)
            if saved.get("instance") == tracker.instance_name and isinstance(saved.get("counters"), dict):
                handover = {str(k): int(v) for k, v in saved["counters"].items()}
        except (OSError, ValueError, TypeError, AttributeError):
            pass  # none or unreadable: a re-used ring is then compared with 0 (safe: a resync at worst)
        try:
            os.unlink(handover_path)  # good for one start only
        except FileNotFoundError:
            pass
        try:
            tracker.start(handover)
        except TracefsUnavailable as exc:
            self.metrics.tracker_unavailable.inc()
            logger.error("tracepoint tracker unavailable: falling back to the digest tracker", reason=str(exc))
            return None
        logger.info("tracepoint tracker started", disks=sorted(devices))
        return tracker

    def _reconcile(self, disk_id: str, path: str, size: int, acked: int) -> DiskState:
        """Decide whether the persisted map can be trusted against what the process server has."""
        bs = self.config.replication.block_size
        map_path = os.path.join(self.config.state_dir, f"{disk_id}.digests")
        dmap = DigestMap.load(map_path)
        reason = None
        if dmap is None:
            if acked == 0:
                dmap = DigestMap.fresh(map_path, bs, size, replica_is_zero=True)  # initial replication
            else:
                reason = "no_local_state" if not os.path.exists(map_path) else "map_damaged"
        elif dmap.disk_size != size or dmap.block_size != bs:
            reason = "geometry_changed"
        elif dmap.seq > acked:
            reason = "server_behind"
        if reason:
            self.metrics.resyncs.labels(reason).inc()
            self._note_resync(disk_id, reason)
            logger.warning("full resync: replica state unknown", DISK=disk_id, reason=reason, acked_seq=acked,
                           local_seq=dmap.seq if dmap else None)
            # Point ids carry the cycle number; every cycle used at least one sequence number, so
            # continuing past the acked seq keeps ids unique even when the local count was lost.
            cycle = max(dmap.cycle if dmap else 0, acked)
            dmap = DigestMap.fresh(map_path, bs, size, replica_is_zero=False)
            dmap.cycle = cycle
        # Batches past the last completed cycle may have reached the server; their blocks were
        # marked UNKNOWN in the map file before they were sent, so continuing is safe.
        dmap.seq = acked
        dmap.save()
        return DiskState("", disk_id, path, dmap, reason)

    async def close(self) -> None:
        if self.tracker:
            # Hand over to the next agent process: what this process drained since the last cycle
            # goes into the change logs, and the kernel instance stays and keeps recording.
            try:
                epochs = self.tracker.rotate(overlap=False)
                for state in self.disks:
                    ep, cl = epochs.get(state.disk_id), state.change_log
                    if ep is None or cl is None:
                        continue
                    if ep.lost:
                        cl.require_resync(ep.lost, through_epoch=self.cycle + 1)
                    elif ep.ranges:
                        cl.add_extents(self.cycle + 1, ep.ranges)
                self._save_handover(self.tracker)
            finally:
                self.tracker.close(remove=False)
        for state in self.disks:
            if state.change_log is not None:
                state.change_log.close(clean=True)
        if self.control:
            await self.control.close()
        if self.sender:
            await self.sender.__aexit__(None, None, None)
        self._cpu_pool.shutdown(wait=False, cancel_futures=True)

    async def run_cycle(self, group_hold: Hold | None = None) -> dict:
        """One cycle: [pre script] → freeze → [group HOLD/MARK] → snapshot + tracker epoch → thaw → [post
        script] → read the epoch's dirty blocks from the snapshot → send → bookmark acknowledged → map
        saved → snapshot dropped. Cycles never overlap."""
        async with self.cycle_lock:
            ok = False
            try:
                result = await self._run_cycle(group_hold)
                ok = True
                return result
            finally:
                if self.control:
                    self.control.after_cycle(self, ok)

    async def _run_cycle(self, group_hold: Hold | None) -> dict:
        cfg = self.config
        loop = asyncio.get_running_loop()
        self.cycle += 1
        t0 = time.monotonic()
        point_id = f"{cfg.machine}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{self.cycle:06d}"
        env = {"LIFEBOAT_POINT_ID": point_id, "LIFEBOAT_MACHINE": cfg.machine, "LIFEBOAT_CYCLE": str(self.cycle)}
        for state in self.disks:
            self._check_geometry(state)
        q = cfg.consistency
        if group_hold:  # the coordinator decides when the group's points are app-consistent
            app_due = bool(q.pre_script or q.post_script) and group_hold.app
        else:
            app_due = bool(q.pre_script or q.post_script) and (
                q.app_interval_seconds == 0 or t0 - self._last_app >= q.app_interval_seconds)
        self._group_fields = {} if not group_hold else {
            "group": group_hold.group, "group_tag": group_hold.tag, "group_members": group_hold.members}
        self._post_done = not app_due
        pre_ok = False  # only a pre script that ran and succeeded makes a point app-consistent
        if app_due and q.pre_script:
            pre_ok, why = await run_script(q.pre_script, "pre", q.script_timeout_seconds, env)
            if not pre_ok:
                self.metrics.script_failures.labels("pre").inc()
                logger.error("pre script failed: no app-consistent point this cycle", POINT=point_id, reason=why)
        capture = None
        try:
            created = time.time()
            wanted = {s.disk_id: self._owed(s) for s in self.disks}
            pending_capture = loop.run_in_executor(None, self.capturer.capture, point_id, wanted,
                                                   group_hold.wait_for_mark if group_hold else None)
            try:
                capture = await asyncio.shield(pending_capture)
            except asyncio.CancelledError:
                # Stopping mid-capture: the thread still finishes (and thaws); drop what it made.
                pending_capture.add_done_callback(
                    lambda f: f.cancelled() or f.exception() is not None or f.result().drop())
                raise
            if group_hold:
                try:
                    await group_hold.marked(point_id, capture.frozen_at, capture.thawed_at)
                except (ConnectionError, OSError) as exc:
                    # The point is still good; whether the group point is complete is decided by
                    # which members recorded the tag.
                    logger.warning("could not answer MARKED to the coordinator", TAG=group_hold.tag, error=str(exc))
            created = capture.frozen_at or created  # the point's instant: the freeze (or the snapshot)
            self._note_capture(capture, point_id)
            # With a live read ("none" provider) the writers must stay held until the reads are done.
            live = any(d.snapshot.provider == "none" or getattr(d.snapshot, "live_ranges", None)
                       for d in capture.disks.values())
            if app_due and not live:
                await self._post(env, point_id)
            if pre_ok and (capture.consistent or live):
                consistency = "app"
            elif capture.consistent:
                consistency = "crash"
            else:
                consistency = "none"
            results = await self._read_and_send(point_id, created, consistency, capture, env=env)
        except BaseException:
            if not self._post_done:
                await self._post(env, point_id)
            self.cycle -= 1
            self.metrics.cycles.labels("failed").inc()
            raise
        finally:
            if capture:
                await loop.run_in_executor(None, capture.drop)
        if consistency == "app":
            self._last_app = t0
        seconds = time.monotonic() - t0
        self.metrics.cycles.labels("ok").inc()
        self.metrics.cycle_seconds.observe(seconds)
        self.metrics.last_point.set(created)
        self.last_point = {"point_id": point_id, "created": created, "consistency": consistency}
        logger.info("cycle complete", POINT=point_id, consistency=consistency, seconds=round(seconds, 3),
                    changed_bytes=sum(r.changed_bytes for r in results), read_bytes=sum(r.read_bytes for r in results),
                    zeroed_bytes=sum(r.zero_bytes for r in results), disks=len(results),
                    freeze_ms=None if capture.freeze_seconds is None else round(capture.freeze_seconds * 1000, 1),
                    snapshots=",".join(sorted({d.snapshot.provider for d in capture.disks.values()})),
                    kept_bytes=self._kept_bytes,
                    capture_ms=" ".join(f"{k}:{v * 1000:.1f}" for k, v in (capture.phases or {}).items()))
        return {**self.last_point, "cycle": self.cycle}

    def _check_geometry(self, state: DiskState) -> None:
        """A disk that shrank or grew cannot continue its log: no point until the agent restarts."""
        try:
            size = device_size(state.path)
        except OSError as exc:
            raise DiskChanged(f"disk {state.disk_id} ({state.path}) cannot be opened: {exc.strerror}; "
                              "no point this cycle") from None
        if size != state.dmap.disk_size:
            raise DiskChanged(f"disk {state.disk_id} ({state.path}) changed size from {state.dmap.disk_size} to "
                              f"{size} bytes; no point is taken until the agent restarts, which resyncs it at the "
                              "new size")

    def _owed(self, state: DiskState) -> tuple[list[tuple[int, int]] | None, str | None]:
        """(blocks owed from earlier epochs, reason to read every block) for the next capture."""
        cl = state.change_log
        if cl is None:
            return state.owed, state.full_reason
        pending = cl.pending()
        return pending.ranges, (cl.tier_reason or "resync_required") if pending.resync else None

    def _note_capture(self, capture, point_id: str) -> None:
        """Record the tracker's epoch in each change log (after the thaw: it writes and fsyncs), and
        decide what this cycle reads; metrics and events."""
        if capture.freeze_seconds is not None:
            self.metrics.freeze_seconds.observe(capture.freeze_seconds)
        self._kept_bytes = 0
        for state in self.disks:
            d = capture.disks[state.disk_id]
            cl = state.change_log
            if cl is not None:
                if d.epoch_lost:
                    cl.require_resync(d.epoch_lost, through_epoch=self.cycle)
                    code = reason_code(d.epoch_lost) or "other"
                    self.metrics.resyncs.labels(code if code in RESYNC_REASONS else "tracking_lost").inc()
                    self._note_resync(state.disk_id, d.epoch_lost)
                    logger.warning("digest resync: change tracking lost", DISK=state.disk_id, POINT=point_id,
                                   reason=d.epoch_lost)
                elif d.epoch_ranges:
                    cl.add_extents(self.cycle, d.epoch_ranges)
                if isinstance(d.snapshot, FreezeCopySnapshot):
                    # Keep the copied data in the change log's tiers (memory pool, then .hrl spill);
                    # whatever the tiers could not keep is read live, and the point is then not consistent.
                    for offset, data in d.snapshot.extents():
                        cl.add_data(self.cycle, offset, data)
                    d.snapshot.drop()
                    kept = cl.pending(self.cycle)
                    self._kept_bytes += kept.data_bytes
                    # A resync reads every block: all but the kept ones come from the live disk.
                    live = whole_disk(state.dmap) if kept.resync else kept.read_ranges
                    d.snapshot = KeptDataSnapshot(state.disk_id, point_id, state.path, state.dmap.block_size,
                                                  kept.data, live)
                    d.consistent = d.consistent and d.snapshot.consistent
                pending = cl.pending(self.cycle)
                d.ranges = None if pending.resync else pending.ranges
                d.full_reason = (cl.tier_reason or "resync_required") if pending.resync else None
            else:
                # Until this cycle is acknowledged, these blocks are owed (a failed cycle retries them).
                state.full_reason, state.owed = (d.full_reason, None) if d.ranges is None else (None, d.ranges)
            self.metrics.snapshots.labels(d.snapshot.provider).inc()

    async def _post(self, env: dict, point_id: str) -> None:
        self._post_done = True
        ok, why = await run_script(self.config.consistency.post_script, "post",
                                   self.config.consistency.script_timeout_seconds, env)
        if not ok:
            self.metrics.script_failures.labels("post").inc()
            logger.error("post script failed", POINT=point_id, reason=why)

    async def _read_and_send(self, point_id: str, created: float, consistency: str, capture, env: dict):
        loop = asyncio.get_running_loop()
        abort = threading.Event()
        rep = self.config.replication
        run_post = not self._post_done

        queues: dict[str, asyncio.Queue] = {}
        scans: dict[str, asyncio.Future] = {}
        for state in self.disks:
            queue: asyncio.Queue[PendingBatch] = asyncio.Queue(QUEUE_BATCHES)
            queues[state.disk_id] = queue

            def put(pending: PendingBatch, queue=queue) -> None:
                while True:  # bounded hand-off to the event loop, abandoned if the cycle aborts
                    if abort.is_set():
                        raise ScanAborted()
                    fut = asyncio.run_coroutine_threadsafe(asyncio.wait_for(queue.put(pending), 1.0), loop)
                    try:
                        return fut.result()
                    except asyncio.TimeoutError:
                        continue

            def bookmark(image_digest: str) -> dict:
                return {"point_id": point_id, "machine": self.config.machine, "created": created,
                        "consistency": consistency, "cycle": self.cycle, "block_size": rep.block_size,
                        "image_digest": image_digest, **self._group_fields}

            d = capture.disks[state.disk_id]
            scans[state.disk_id] = loop.run_in_executor(
                None, scan_disk, state.path, state.disk_id, state.dmap, state.dmap.seq + 1, rep.extent_max_bytes,
                rep.batch_bytes, bookmark, put, abort.is_set, d.ranges, d.snapshot.readinto)

        async def compress_disk(state: DiskState, out: asyncio.Queue) -> None:
            """Stage between the scan and the send: batch N compresses while batch N-1 is sent."""
            queue = queues[state.disk_id]
            while True:
                pending = await queue.get()
                builder = pending.builder
                step = -(-builder.frame_count // COMPRESS_SLICES) or 1
                await asyncio.gather(*(loop.run_in_executor(self._cpu_pool, builder.compress_frames, a, a + step)
                                       for a in range(0, builder.frame_count, step)))
                await out.put(pending)
                if pending.last:
                    return

        async def send_disk(state: DiskState):
            compressed: asyncio.Queue[PendingBatch] = asyncio.Queue(1)
            compressor = asyncio.create_task(compress_disk(state, compressed))
            try:
                await send_compressed(state, compressed, compressor)
            finally:
                if not compressor.done():
                    compressor.cancel()
                await asyncio.gather(compressor, return_exceptions=True)
            result = await scans[state.disk_id]
            self.metrics.read_bytes.labels(state.disk_id).inc(result.read_bytes)
            self.metrics.changed_bytes.labels(state.disk_id).inc(result.changed_bytes)
            return state, result

        async def send_compressed(state: DiskState, queue: asyncio.Queue, compressor: asyncio.Task) -> None:
            window: SendWindow | None = None
            inflight: collections.deque[tuple[asyncio.Task, int]] = collections.deque()
            inflight_bytes = 0

            async def send_one(seq: int, parts: list) -> None:
                await self.sender.send(state.disk_id, seq, parts, window)
                # The batch's buffers are free now: hand them back (peak RSS, 1 GiB initial copy:
                # 186-191 -> 168-173 MiB; without it the pinned heap keeps every freed buffer resident).
                malloc.trim()
                self.metrics.sent_bytes.inc(sum(len(p) for p in parts))

            try:
                while True:
                    get = asyncio.ensure_future(queue.get())
                    await asyncio.wait([get, compressor], return_when=asyncio.FIRST_COMPLETED)
                    if not get.done() and compressor.exception() is not None:
                        get.cancel()  # the compressor failed (e.g. the scan's read error): end the cycle with it
                        raise compressor.exception()
                    pending = await get
                    if window is None:
                        window = SendWindow(pending.builder.seq - 1)
                    # Not the default executor: its threads may all be scans blocked on full queues (many disks).
                    await loop.run_in_executor(self._cpu_pool, state.dmap.mark_unknown, pending.block_ranges)
                    parts = pending.builder.parts()  # sent as they are: no joined copy of the batch
                    body_bytes = sum(len(p) for p in parts)
                    inflight.append((asyncio.create_task(send_one(pending.builder.seq, parts)), body_bytes))
                    inflight_bytes += body_bytes
                    while inflight and (len(inflight) >= SEND_WINDOW or inflight_bytes >= SEND_WINDOW_BYTES
                                        or pending.last):
                        task, sent = inflight.popleft()
                        await task  # acknowledged in order: the oldest finishes first
                        inflight_bytes -= sent
                    if pending.last:
                        return
            finally:
                for task, _ in inflight:
                    task.cancel()
                await asyncio.gather(*(task for task, _ in inflight), return_exceptions=True)

        async def post_after_reads() -> None:
            # Writers resume as soon as every disk has been read; the last batches may still be in flight.
            await asyncio.gather(*scans.values(), return_exceptions=True)
            if run_post:
                await self._post(env, point_id)

        post_task = asyncio.create_task(post_after_reads())
        tasks = [asyncio.create_task(send_disk(s)) for s in self.disks]
        try:
            done = await asyncio.gather(*tasks)
        except BaseException:
            abort.set()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, *scans.values(), return_exceptions=True)
            await post_task
            raise
        await post_task
        for state, result in done:
            state.full_reason, state.owed = None, None
            if state.change_log is not None:
                await loop.run_in_executor(None, state.change_log.acknowledge, self.cycle)
            state.dmap.digests = result.digests
            state.dmap.seq = result.last_seq
            state.dmap.cycle = self.cycle
            await loop.run_in_executor(None, state.dmap.save)
        return [r for _, r in done]

    async def run(self, stop: asyncio.Event, cycles: int | None = None) -> None:
        """Cycle every interval until stopped (or for `cycles` cycles); a failed cycle is retried next time.
        In a consistency group the coordinator's rounds drive the cycles instead."""
        if self.config.group.name:
            return await self._run_group(stop, cycles)
        n = 0
        while not stop.is_set():
            interval = self.config.replication.interval_seconds  # a policy may change it (control plane)
            if self.control:
                await self.control.before_cycle(self, stop)
            t0 = time.monotonic()
            try:
                await self.run_cycle()
            except LifeboatError as exc:
                logger.error("cycle failed", error=str(exc))
            n += 1
            if cycles is not None and n >= cycles:
                return
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, interval - (time.monotonic() - t0)))
            except asyncio.TimeoutError:
                pass

    async def _run_group(self, stop: asyncio.Event, cycles: int | None) -> None:
        g = self.config.group
        metrics = GroupMetrics(self.metrics.registry)
        member = GroupMember(self, g, self.config.machine, metrics)
        self.group_port = await member.start()
        coordinator = None
        if coordinator_of(g) == self.config.machine:
            coordinator = asyncio.create_task(GroupCoordinator(g, self.config.machine, metrics).run(stop))
        # Without rounds (the coordinator is down or cut off) the machine's RPO must not grow without
        # bound: after this long without a group point, take per-machine points (not group points).
        fallback_after = 2 * g.interval_seconds + g.hold_deadline_seconds
        last_own = float("-inf")
        try:
            while not stop.is_set() and (cycles is None or member.cycles_done < cycles):
                now = time.monotonic()
                if (now - member.last_point > fallback_after and not self.cycle_lock.locked()
                        and now - last_own >= self.config.replication.interval_seconds):
                    last_own = now
                    logger.warning("no group round lately: taking a per-machine point", GROUP=g.name,
                                   seconds_since_group_point=round(now - member.last_point, 1))
                    try:
                        await self.run_cycle()
                    except LifeboatError as exc:
                        logger.error("cycle failed", error=str(exc))
                    continue
                try:
                    await asyncio.wait_for(stop.wait(), 0.2)
                except asyncio.TimeoutError:
                    pass
        finally:
            if coordinator:
                coordinator.cancel()
                await asyncio.gather(coordinator, return_exceptions=True)
            await member.close()
