"""A worker process's life: join the coordinator over the worker link, open the detector
link it names, receive until told to stop (`stream.worker.Worker` does the receiving).

Local workers (`run --workers N`) are spawned processes running `serve`; `tcbf-live worker` on
another host runs the same, authenticated with CURVE keys beyond loopback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket

import zmq

from tcbf_live.detectors.registry import protocol
from tcbf_live.stream import memory_reserve
from tcbf_live.stream.budget import BudgetError, memory_budget_bytes
from tcbf_live.stream.priority import freeze_startup_objects
from tcbf_live.stream.receiver import SubscriberSettings
from tcbf_live.stream.tcbf.row_block import BLOCK_BYTES
from tcbf_live.stream.transport import CurveKeys, open_link
from tcbf_live.stream.worker import Worker
from tcbf_live.stream.worker_link import (
    LINK_HWM,
    LINK_MAX_BYTES,
    LINK_VERSION,
    LinkError,
    WorkerConfig,
    pack,
    unpack,
)

log = logging.getLogger(__name__)

KEPT_BYTES = BLOCK_BYTES + (4 << 20) + (64 << 10)  # a row block, `seen` of 4 M frames


def join(ctx: zmq.Context, link_endpoint: str, curve: CurveKeys | None, identity: bytes,
         timeout_s: float = 30.0) -> tuple[zmq.Socket, WorkerConfig]:  # fmt: skip
    """Connect to the coordinator, say hello and wait for the configuration (TimeoutError)."""
    link = open_link(ctx, zmq.DEALER, link_endpoint, bind_here=False, hwm=LINK_HWM,
                     role="the worker link", max_message_bytes=LINK_MAX_BYTES, curve=curve,
                     linger_s=5.0, identity=identity)  # fmt: skip
    link.send_multipart(pack("hello", {"host": socket.gethostname(), "pid": os.getpid(),
                                       "version": LINK_VERSION,
                                       "segments": memory_reserve.shared_names()}))  # fmt: skip
    if not link.poll(int(timeout_s * 1000)):
        link.close(linger=0)
        raise TimeoutError(f"no coordinator answered at {link_endpoint} in {timeout_s:.0f} s")
    kind, head, _, _ = unpack(link.recv_multipart())
    if kind != "welcome":
        raise LinkError(f"the coordinator answered {kind!r}, not welcome")
    return link, WorkerConfig.from_json(head["config"])


def serve(link_endpoint: str, curve: CurveKeys | None = None, endpoint: str | None = None,
          data_curve: CurveKeys | None = None, identity: bytes | None = None,
          join_timeout_s: float = 30.0, budget_bytes: int | None = None,
          shared: str | None = None, kept_bytes: int = KEPT_BYTES,
          parent: int | None = None) -> int:  # fmt: skip
    """A worker's whole life: join, receive until told to stop; the exit code. `endpoint`
    overrides the detector address the coordinator gives (another host may reach it under
    another name); `data_curve`: keys for a CURVE detector link (native streams);
    `budget_bytes`: the memory one series may use here (None: `stream.budget`'s default;
    a local worker gets its run's); `shared`: its deltas in memory the coordinator maps (a
    local worker: the tag its segments are named by, `shared_segments`); `kept_bytes`: each
    of its kept buffers (a local worker: sized for its run's expected series,
    `memory_reserve.kept_bytes`); `parent`: the pid of the run that spawned it (a local
    worker, which stops when that process has ended: `LinkInbox.gone`)."""
    with contextlib.suppress(BudgetError):  # (a bad budget is reported once it has joined)
        if 2 * kept_bytes <= memory_budget_bytes(budget_bytes) // 2:  # as one process prepares
            memory_reserve.prepare_kept(kept_bytes, shared=shared)  # row blocks, delta copies
        else:  # (and so its deltas go over the link)
            log.info("worker: no memory kept from start-up: 2 x %d MiB is over half the memory "
                     "budget", kept_bytes >> 20)  # fmt: skip
    freeze_startup_objects()  # before it joins: the coordinator waits for joined workers
    ctx = zmq.Context()
    try:
        link, config = join(ctx, link_endpoint, curve, identity or os.urandom(8), join_timeout_s)
    except (TimeoutError, LinkError, zmq.ZMQError) as err:
        log.error("worker: %s", err)
        ctx.destroy(linger=0)
        return 1
    finally:
        memory_reserve.unlink_shared()  # (the coordinator mapped them when it took the hello)
    if not config.shared:  # (it did not map them: this worker's deltas go over the link)
        memory_reserve.unshare()
    wire = protocol(config.protocol)
    data = SubscriberSettings(endpoint=endpoint or config.endpoint,
                              socket_type=config.socket_type, rcvhwm=config.rcvhwm,
                              max_message_bytes=config.max_message_bytes, curve=data_curve,
                              detector=wire.detector)  # fmt: skip
    try:
        worker = Worker(link, config, data, budget_bytes)
        worker.inbox.parent = parent
    except (zmq.ZMQError, ValueError) as err:
        log.error("worker %d: cannot open the detector link %s: %s", config.index,
                  data.endpoint, err)  # fmt: skip
        link.send_multipart(pack("refused", {"sid": -1, "why": str(err)}))
        ctx.destroy(linger=1000)
        return 1
    log.info("worker %d: receiving from %s (%s)", config.index, data.endpoint, config.protocol)
    worker.freeze_after_first_delta = True
    try:
        worker.run()
    finally:
        worker.sock.close(linger=0)
        link.close(linger=1000)
        ctx.term()
    return 0


def spawned(link: str, identity: bytes, data_curve: CurveKeys | None, level: int,
            budget_bytes: int | None, kept_bytes: int, tag: str | None,
            parent: int) -> None:  # fmt: skip
    """A local worker process spawned by the coordinator (`run --workers N`), under the run's
    memory budget (`budget_bytes`: `run --memory-budget` or its default), its deltas shared
    (in segments named by `tag`; None: over the link, /dev/shm lacking the room); `parent`:
    the coordinator's pid."""
    logging.basicConfig(level=level, format=f"worker {identity.decode()}: %(message)s")
    raise SystemExit(serve(link, identity=identity, data_curve=data_curve,
                           budget_bytes=budget_bytes, shared=tag, parent=parent,
                           kept_bytes=kept_bytes))  # fmt: skip
