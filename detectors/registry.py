"""Every wire protocol, one record each: what the engine, the sender and the commands ask.

A record names the protocol's decoder and encoder, its transport (ZeroMQ or a raw TCP byte
stream), the socket types its receiver and its sender use by default and may use, its frame
encodings (the first is the default) and the capabilities the engine switches on. Adding a
protocol is one module (decoder + encoder) and one entry in `PROTOCOLS` (docs/detectors.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from tcbf_live.detectors.base import Decoder, Encoder
from tcbf_live.detectors.dectris_v1 import DectrisV1Decoder
from tcbf_live.detectors.dectris_v1_encoder import DectrisV1Encoder
from tcbf_live.detectors.dectris_v2 import DectrisV2Decoder
from tcbf_live.detectors.dectris_v2_encoder import DectrisV2Encoder
from tcbf_live.detectors.merlin import MerlinDecoder, MerlinEncoder
from tcbf_live.detectors.native import DEFAULT_MAX_BATCH_BYTES, NativeDecoder, NativeEncoder
from tcbf_live.detectors.routing import Rank, dectris_v1_rank, dectris_v2_rank, native_rank


@dataclass(frozen=True)
class DecoderOptions:
    """What a receiver may ask of a decoder; each protocol uses the options it has."""

    defer_bslz4: bool = False  # hand bslz4 frames on undecoded (protocols with `bslz4_frames`)
    channel: str | None = None  # threshold channel (protocols with `channels`); None: the first
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES  # largest frame batch one message may carry


@dataclass(frozen=True)
class WireProtocol:
    """One protocol. Socket types: the first is the default, ZeroMQ names ("sub", "pull" to
    receive; "pub", "push" to send); none for raw TCP."""

    name: str
    new_decoder: Callable[[DecoderOptions], Decoder]
    encoder: Encoder
    transport: Literal["zmq", "tcp"]
    receiver_sockets: tuple[str, ...]
    sender_sockets: tuple[str, ...]
    encodings: tuple[str, ...]  # frame encodings the sender offers, the default first
    detector: bool  # a detector's own link: cannot be authenticated (CURVE)
    repeats_start: bool = False  # the sender re-announces `start` for late subscribers
    batched: bool = False  # one message carries a batch of frames (else one frame each)
    bslz4_frames: bool = False  # the decoder can hand bslz4 frames to the kernel undecoded
    channels: bool = False  # the stream carries several threshold channels
    # armed through SIMPLON REST (`run --simplon`): the stream `format` and `header_detail`
    # that select this protocol and carry our appendix (scan shape, optics); None: not SIMPLON
    simplon: tuple[str, str] | None = None
    # frame message (None) or control rank of a message, read from its first bytes: what
    # several receivers sharing one stream relay (`detectors.routing`); None: not shareable
    rank: Rank | None = None
    description: str = ""

    def decoder(self, options: DecoderOptions | None = None) -> Decoder:
        """A fresh decoder for one stream."""
        return self.new_decoder(options or DecoderOptions())


PROTOCOLS: dict[str, WireProtocol] = {
    p.name: p
    for p in (
        WireProtocol(
            "native", lambda o: NativeDecoder(max_batch_bytes=o.max_batch_bytes),
            NativeEncoder(), "zmq", ("sub", "pull"), ("pub", "push"), ("raw", "lz4"),
            detector=False, repeats_start=True, batched=True, rank=native_rank,
            description="tcbf-live's own msgpack stream (docs/protocol.md)",
        ),
        WireProtocol(
            "dectris-v1", lambda o: DectrisV1Decoder(defer_bslz4=o.defer_bslz4),
            DectrisV1Encoder(), "zmq", ("pull", "sub"), ("push", "pub"), ("bslz4", "lz4", "raw"),
            detector=True, bslz4_frames=True, simplon=("legacy", "all"), rank=dectris_v1_rank,
            description="DECTRIS SIMPLON stream V1 (JSON parts), PUSH as the detector",
        ),
        WireProtocol(
            "dectris-v2",
            lambda o: DectrisV2Decoder(channel=o.channel, defer_bslz4=o.defer_bslz4),
            DectrisV2Encoder(), "zmq", ("pull", "sub"), ("push", "pub"), ("bslz4", "none"),
            detector=True, bslz4_frames=True, channels=True, simplon=("cbor", "basic"),
            rank=dectris_v2_rank,
            description="DECTRIS SIMPLON stream V2 (CBOR), PUSH as the detector",
        ),
        WireProtocol(
            "merlin", lambda o: MerlinDecoder(), MerlinEncoder(), "tcp", (), (), ("raw",),
            detector=True, batched=True,
            description="Quantum Detectors Merlin data port (raw TCP, MPX framing)",
        ),
    )
}  # fmt: skip


class UnknownProtocol(ValueError):
    """A protocol name that is not registered; the message lists the choices."""


def protocol(name: str) -> WireProtocol:
    """The record of `name`; UnknownProtocol naming the registered ones otherwise."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise UnknownProtocol(f"unknown protocol {name!r}: choose one of "
                              f"{', '.join(PROTOCOLS)}") from None  # fmt: skip


def names(transport: str | None = None) -> list[str]:
    """Registered protocol names in registry order (only those of `transport` if given)."""
    return [p.name for p in PROTOCOLS.values() if transport in (None, p.transport)]


def receiver_socket_types() -> list[str]:
    """Every receiver socket type some protocol uses, in registry order (`run --socket`)."""
    return list(dict.fromkeys(s for p in PROTOCOLS.values() for s in p.receiver_sockets))


def sender_socket_types() -> list[str]:
    """Every sender socket type some protocol uses, in registry order (`simulate --socket`)."""
    return list(dict.fromkeys(s for p in PROTOCOLS.values() for s in p.sender_sockets))


def encodings() -> list[str]:
    """Every frame encoding some protocol offers, in registry order (`--compression`)."""
    return list(dict.fromkeys(e for p in PROTOCOLS.values() for e in p.encodings))
