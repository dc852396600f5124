"""One grammar for every endpoint (stream.transport): what each command accepts and refuses."""

import pytest

from tcbf_live.stream.cli.main import build_parser
from tcbf_live.stream.cli.run import settings_from_args
from tcbf_live.stream.transport import endpoint_host, is_loopback, tcp_host_port, valid_endpoint


@pytest.mark.parametrize("endpoint,host,raw", [
    ("tcp://127.0.0.1:5555", "127.0.0.1", ("127.0.0.1", 5555)),
    ("tcp://[::1]:5555", "::1", ("::1", 5555)),
    ("tcp://detector-pc.lan:6342", "detector-pc.lan", ("detector-pc.lan", 6342)),
    ("tcp://*:5555", "*", None),  # binding on every interface: not a host to connect to
    ("tcp://127.0.0.1:*", "127.0.0.1", None),
    ("ipc:///tmp/tcbf", None, None),
    ("inproc://x", None, None),
])  # fmt: skip
def test_the_grammar_accepts(endpoint, host, raw):
    assert valid_endpoint(endpoint)
    assert endpoint_host(endpoint) == host
    if raw is None:
        with pytest.raises(ValueError):
            tcp_host_port(endpoint)
    else:
        assert tcp_host_port(endpoint) == raw


@pytest.mark.parametrize("endpoint", ["tcp://:5", "udp://x:1", "tcp://1.2.3.4", "tcp://a b:1",
                                      "tcp://host:123456", "", "127.0.0.1:5555"])  # fmt: skip
def test_the_grammar_refuses(endpoint):
    assert not valid_endpoint(endpoint)
    with pytest.raises(ValueError):
        tcp_host_port(endpoint)
    assert not is_loopback(endpoint) or endpoint.startswith(("ipc://", "inproc://"))


def test_run_takes_an_ipv6_detector_address_for_raw_tcp(expect_usage_error, tmp_path):
    """Merlin (raw TCP): tcp://[::1]:PORT is a valid data port; binding is refused in one line."""
    out = ["--output", str(tmp_path / "r.h5")]
    args = build_parser().parse_args(["run", "--protocol", "merlin", "--headless", "--scan",
                                      "4x4", "--connect", "tcp://[::1]:6342", *out])  # fmt: skip
    assert settings_from_args(args).subscriber.endpoint == "tcp://[::1]:6342"
    err = expect_usage_error(["run", "--protocol", "merlin", "--headless", "--scan", "4x4",
                              "--bind", "tcp://127.0.0.1:6342", *out])  # fmt: skip
    assert "--connect tcp://HOST:PORT" in err
    expect_usage_error(["view", "--connect", "tcp://nohost"])
    expect_usage_error(["simulate", "--bind", "udp://127.0.0.1:5555"])
