"""The protocol registry: every protocol round-trips through its own encoder and decoder, the
commands offer exactly what the registry holds, the engine takes its decoder from it, and the
lower packages import nothing from above."""

import argparse
import ast
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tcbf_live.detectors import registry
from tcbf_live.detectors.base import CompressedFrame, FrameBatch, SeriesEnd, SeriesStart
from tcbf_live.detectors.native import NativeDecoder
from tcbf_live.simulators import Simulator, tutorial_config
from tcbf_live.simulators.sender import ByteStream, SendSettings, stream_series
from tcbf_live.stream.cli.main import build_parser
from tcbf_live.stream.engine import Engine, EngineSettings
from tcbf_live.stream.receiver import SubscriberSettings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sim():
    return Simulator(tutorial_config(scan_shape=(3, 4), detector_shape=(32, 32),
                                     angular_sampling_mrad=0.6))  # fmt: skip


def _decode_all(decoder, messages) -> list:
    events = []
    for message in messages:
        out = decoder.decode(message)
        events.extend(out if isinstance(out, list) else [] if out is None else [out])
        assert decoder.drain_errors() == []
    return events


@pytest.mark.parametrize(("name", "encoding"), [(p.name, e) for p in registry.PROTOCOLS.values()
                                                for e in p.encodings])  # fmt: skip
def test_every_protocol_round_trips_a_series(sim, name, encoding):
    """The sender's messages for a 12-frame series, decoded by the protocol's own decoder
    (byte-stream protocols joined into one chunk): the series' metadata and every frame."""
    proto = registry.protocol(name)
    sent = []

    class Wire:
        def send_multipart(self, parts, copy=True):
            sent.append(list(parts))

    class Bytes:
        def sendall(self, data):
            sent.append([data])

    sink = ByteStream(Bytes()) if proto.transport == "tcp" else Wire()
    n = stream_series(sink, sim, SendSettings(protocol=name, encoding=encoding, batch=5), 41)
    assert n == sim.n_frames
    messages = [[b"".join(bytes(p) for m in sent for p in m)]] if proto.transport == "tcp" \
        else sent  # fmt: skip
    events = _decode_all(proto.decoder(), messages)
    starts = [e for e in events if isinstance(e, SeriesStart)]
    info = sim.series_info(41)
    assert starts and starts[0].info.scan_shape == info.scan_shape
    assert starts[0].info.detector_shape == info.detector_shape
    frames = np.zeros((sim.n_frames, *info.detector_shape))
    seen = np.zeros(sim.n_frames, bool)
    for e in events:
        if isinstance(e, FrameBatch):
            frames[e.first : e.first + len(e.frames)] = e.frames
            seen[e.first : e.first + len(e.frames)] = True
    assert seen.all()
    np.testing.assert_array_equal(frames, sim.frames(0, sim.n_frames))
    assert isinstance(events[-1], SeriesEnd) and events[-1].frames_sent == sim.n_frames


def test_decoder_options_reach_the_decoders():
    options = registry.DecoderOptions(defer_bslz4=True, channel="threshold_2",
                                      max_batch_bytes=1234)  # fmt: skip
    v2 = registry.protocol("dectris-v2").decoder(options)
    assert v2.defer_bslz4 and v2.channel == "threshold_2"
    assert registry.protocol("dectris-v1").decoder(options).defer_bslz4
    assert registry.protocol("native").decoder(options).max_batch_bytes == 1234
    for p in registry.PROTOCOLS.values():  # what the receivers call on every decoder
        decoder = p.decoder()
        assert decoder.drain_errors() == [] and decoder.reset() == []


def test_bslz4_protocols_can_defer_decompression(sim):
    """A protocol that says `bslz4_frames` hands bslz4 images on undecoded when asked."""
    for p in registry.PROTOCOLS.values():
        if not p.bslz4_frames:
            continue
        messages = [*p.encoder.start(sim.series_info(3)),
                    *p.encoder.frames(3, 0, sim.frames(0, 2), 1, "bslz4")]  # fmt: skip
        events = _decode_all(p.decoder(registry.DecoderOptions(defer_bslz4=True)), messages)
        assert sum(isinstance(e, CompressedFrame) for e in events) == 2


def test_unknown_protocol_lists_the_choices():
    with pytest.raises(registry.UnknownProtocol, match="native, dectris-v1, dectris-v2, merlin"):
        registry.protocol("acme")
    with pytest.raises(registry.UnknownProtocol, match="choose one of"):
        Engine(EngineSettings(protocol="acme"))


def _choices(command: str, flag: str) -> list[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    action = next(a for a in sub.choices[command]._actions if flag in a.option_strings)
    return list(action.choices)


def test_command_choices_are_the_registry():
    assert _choices("simulate", "--protocol") == registry.names()
    assert sorted(_choices("run", "--protocol")) == sorted(registry.names())
    assert _choices("listen", "--protocol") == registry.names(transport="zmq")
    assert _choices("simulate", "--compression") == registry.encodings()
    assert _choices("simulate", "--socket") == registry.sender_socket_types()
    assert _choices("run", "--socket") == registry.receiver_socket_types()
    assert set(registry.encodings()) == {"raw", "lz4", "bslz4", "none"}


def test_engine_takes_its_decoder_from_the_registry(monkeypatch, endpoint):
    made = []
    record = registry.PROTOCOLS["native"]

    def new_decoder(options):
        made.append(options)
        return NativeDecoder()

    monkeypatch.setitem(registry.PROTOCOLS, "native", replace(record, new_decoder=new_decoder))
    engine = Engine(EngineSettings(subscriber=SubscriberSettings(endpoint=endpoint),
                                   idle_timeout_s=0.2, channel="threshold_1")).start()  # fmt: skip
    assert engine.join(timeout=10)
    assert len(made) == 1 and made[0].channel == "threshold_1"
    assert made[0].defer_bslz4 is False  # native carries no bslz4 frames: not asked


def _imports(folder: str) -> set[str]:
    names = set()
    for path in (ROOT / folder).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
    return names


@pytest.mark.parametrize("folder", ["detectors", "simulators"])
def test_lower_packages_import_nothing_from_above(folder):
    above = ("tcbf_live.stream", "tcbf_live.viewer")
    if folder == "detectors":
        above += ("tcbf_live.simulators",)
    imports = _imports(folder)
    assert not [n for n in imports if n.startswith(above)]
    if folder == "simulators":
        assert "argparse" not in imports  # commands live in stream/cli


def test_sender_cap_matches_the_receivers():
    from tcbf_live.simulators import sender
    from tcbf_live.stream import transport

    assert sender.MAX_MESSAGE_BYTES == transport.MAX_MESSAGE_BYTES
