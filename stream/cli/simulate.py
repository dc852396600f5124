"""`tcbf-live simulate`: simulate (or replay) a 4D-STEM series, stream it and/or save it."""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path

from tcbf_live.detectors import registry
from tcbf_live.detectors.files import (
    DatasetError,
    RecordedDataset,
    split_dataset_spec,
    write_dataset,
)
from tcbf_live.detectors.vendor_files import open_recording
from tcbf_live.simulators.config import PRESETS, SimulationConfig, SimulationError
from tcbf_live.simulators.samples import SAMPLES
from tcbf_live.simulators.sender import SendSettings
from tcbf_live.simulators.simulate import Simulator
from tcbf_live.stream.cli.common import (
    UsageError,
    add_curve_args,
    curve_from_args,
    parse_finite,
    parse_pair,
)
from tcbf_live.stream.cli.sending import LinkSettings, serve
from tcbf_live.stream.outputs import atomic_output, check_output
from tcbf_live.stream.transport import valid_endpoint

# flags that describe the physics of a simulation; meaningless for --replay
PHYSICS_FLAGS = (
    "defocus", "C10", "C12", "phi12", "C21", "phi21", "C23", "phi23", "C30", "rolloff",
    "transpose", "center", "descan", "dose", "no_noise", "counts_per_electron", "bits",
    "bad_pixels", "sample", "feature", "phase_rms", "seed", "preset", "detector",
)  # fmt: skip
# flags that are metadata of a replayed file (override what the file says)
REPLAY_META_FLAGS = (
    "energy", "step", "semiangle", "angular_sampling", "rotation", "scan_order", "scan",
)  # fmt: skip


def _floats(n: int):
    def parse(text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {n} comma-separated numbers") from None
        if len(values) != n or not all(math.isfinite(v) for v in values):
            raise argparse.ArgumentTypeError(f"expected {n} comma-separated numbers, got {text!r}")
        return values

    return parse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="simulate or replay a 4D-STEM series and stream it over ZeroMQ",
        description="Simulate a 4D-STEM acquisition from physics (or replay a recorded one) "
        "and stream it over ZeroMQ and/or save it. Flags override the preset (default: "
        "tutorial). Angles in degrees, lengths in Angstrom.",
    )
    net = p.add_argument_group("stream")
    net.add_argument("--bind", default="tcp://127.0.0.1:5555", help="ZeroMQ endpoint to bind")
    net.add_argument(
        "--protocol",
        default="native",
        choices=registry.names(),
        help="dectris-v1 / dectris-v2: SIMPLON stream V1 (JSON parts) or V2 (CBOR), one image "
        "per message, PUSH as the detector; merlin: raw TCP server (MPX framing, as the Merlin "
        "data port 6342)",
    )
    net.add_argument(
        "--socket",
        default=None,
        choices=registry.sender_socket_types(),
        help="default: pub (native), push (dectris-v2, as the detector)",
    )
    net.add_argument("--rate", type=parse_finite, default=0.0, metavar="FPS", help="0 = max speed")
    net.add_argument("--batch", type=int, default=16, metavar="N", help="frames per message")
    net.add_argument(
        "--compression",
        default=None,
        choices=registry.encodings(),
        help="native: raw (default) | lz4; dectris-v1: bslz4 (default) | lz4 | raw; "
        "dectris-v2: bslz4 (default) | none",
    )
    net.add_argument("--loop", action="store_true", help="repeat the series until interrupted")
    net.add_argument("--wait-subscriber", type=parse_finite, default=0.0, metavar="S",
                     help="PUB: wait up to S seconds for a first subscriber")  # fmt: skip
    net.add_argument("--no-stream", action="store_true", help="only --save, do not stream")
    net.add_argument("--quiet", action="store_true", help="no progress bar")
    add_curve_args(p, server=True, client=False)
    _add_physics_args(p)
    p.set_defaults(run=run)


def _add_physics_args(p: argparse.ArgumentParser) -> None:
    """The source, optics, scan, dose, detector and sample flags (override the preset)."""
    src = p.add_argument_group("source")
    src.add_argument("--preset", choices=sorted(PRESETS), default=None)
    src.add_argument("--replay", metavar="FILE", help="stream FILE.npy or FILE.h5[:/dataset]")
    src.add_argument("--save", metavar="FILE",
                     help="write the dataset to .npy (+ .json) or .h5[:/dataset]")  # fmt: skip
    src.add_argument("--overwrite", action="store_true", help="replace an existing --save file")

    opt = p.add_argument_group("optics and scan")
    opt.add_argument("--scan", type=parse_pair, metavar="RxC", help="scan shape rows x cols")
    opt.add_argument("--scan-order", choices=["raster", "serpentine"])
    opt.add_argument("--step", type=parse_finite, metavar="A", help="scan step (Angstrom)")
    opt.add_argument("--detector", type=parse_pair, metavar="Q", help="detector px (N or NxM)")
    opt.add_argument("--energy", type=parse_finite, metavar="EV", help="beam energy (eV)")
    opt.add_argument(
        "--semiangle", type=parse_finite, metavar="MRAD", help="convergence semi-angle"
    )
    opt.add_argument("--angular-sampling", type=parse_finite, metavar="MRAD", help="mrad per px")
    opt.add_argument("--rolloff", type=parse_finite, metavar="MRAD", help="aperture edge width")
    opt.add_argument("--defocus", type=parse_finite, metavar="A", help="defocus (= -C10)")
    opt.add_argument("--C10", type=parse_finite, metavar="A")
    opt.add_argument("--C12", type=parse_finite, metavar="A", help="2-fold astigmatism")
    opt.add_argument("--phi12", type=parse_finite, metavar="DEG")
    opt.add_argument("--C21", type=parse_finite, metavar="A", help="axial coma")
    opt.add_argument("--phi21", type=parse_finite, metavar="DEG")
    opt.add_argument("--C23", type=parse_finite, metavar="A", help="3-fold astigmatism")
    opt.add_argument("--phi23", type=parse_finite, metavar="DEG")
    opt.add_argument("--C30", type=parse_finite, metavar="A", help="spherical aberration Cs")
    opt.add_argument("--rotation", type=parse_finite, metavar="DEG", help="scan vs detector")
    opt.add_argument("--transpose", action="store_true", help="detector axes transposed")
    opt.add_argument("--center", type=_floats(2), metavar="ROW,COL", help="BF disk centre (px)")
    opt.add_argument(
        "--descan",
        type=_floats(4),
        metavar="A,B,C,D",
        help="disk drift (det px per scan px): row/row,row/col,col/row,col/col",
    )
    opt.add_argument("--dwell", type=parse_finite, metavar="S", help="dwell time per position (s)")

    det = p.add_argument_group("dose and detector")
    det.add_argument("--dose", type=parse_finite, metavar="E_PER_A2", help="electron dose (e/A^2)")
    det.add_argument("--no-noise", action="store_true", help="expected counts, float32")
    det.add_argument("--counts-per-electron", type=parse_finite, metavar="G", help="detector gain")
    det.add_argument("--bits", type=int, choices=[8, 16, 32])
    det.add_argument("--bad-pixels", type=int, metavar="N", help="dead/hot pixels (2^bits-1)")

    smp = p.add_argument_group("sample")
    smp.add_argument("--sample", choices=sorted(SAMPLES))
    smp.add_argument("--feature", type=parse_finite, metavar="A", help="texture length scale")
    smp.add_argument(
        "--phase-rms", type=parse_finite, metavar="RAD", help="rescale phase to this rms"
    )
    smp.add_argument("--seed", type=int)


def _given(args: argparse.Namespace, names) -> list[str]:
    return [n for n in names if getattr(args, n) not in (None, False)]


def config_from_args(args: argparse.Namespace) -> SimulationConfig:
    """Preset (default tutorial) with every explicitly given flag applied on top."""
    cfg = PRESETS[args.preset or "tutorial"]()
    if args.defocus is not None and args.C10 is not None:
        raise SimulationError("give either --defocus or --C10, not both")
    ab = cfg.aberrations
    changes = {}
    if args.defocus is not None:
        changes["C10_A"] = -args.defocus
    if args.C10 is not None:
        changes["C10_A"] = args.C10
    for name in ("C12", "C21", "C23", "C30"):
        if getattr(args, name) is not None:
            changes[f"{name}_A"] = getattr(args, name)
    for name in ("phi12", "phi21", "phi23"):
        if getattr(args, name) is not None:
            changes[f"{name}_rad"] = math.radians(getattr(args, name))
    if changes:
        ab = replace(ab, **changes)
    flags = {
        "scan_shape": args.scan,
        "scan_order": args.scan_order,
        "step_A": args.step,
        "detector_shape": args.detector,
        "energy_eV": args.energy,
        "semiangle_mrad": args.semiangle,
        "angular_sampling_mrad": args.angular_sampling,
        "rolloff_mrad": args.rolloff,
        "rotation_deg": args.rotation,
        "center_px": args.center,
        "descan_px_per_step": args.descan,
        "dose_e_per_A2": args.dose,
        "counts_per_electron": args.counts_per_electron,
        "bits": args.bits,
        "bad_pixels": args.bad_pixels,
        "sample": args.sample,
        "feature_A": args.feature,
        "phase_rms": args.phase_rms,
        "seed": args.seed,
        "dwell_s": args.dwell,
    }
    cfg = replace(cfg, aberrations=ab, **{k: v for k, v in flags.items() if v is not None})
    if args.transpose:
        cfg = replace(cfg, transpose=True)
    if args.no_noise:
        cfg = replace(cfg, noise=False)
    cfg.validate()
    return cfg


def run(args: argparse.Namespace) -> int:
    if args.batch < 1:
        raise UsageError("--batch must be at least 1")
    if args.rate < 0:
        raise UsageError("--rate must be >= 0 (0 = as fast as possible)")
    if args.no_stream and not args.save:
        raise UsageError("--no-stream needs --save (otherwise nothing would happen)")
    if args.no_stream and args.loop:
        raise UsageError("--loop and --no-stream contradict each other")
    if not valid_endpoint(args.bind):
        raise UsageError(
            f"--bind must be a ZeroMQ endpoint like tcp://127.0.0.1:5555, got {args.bind!r}"
        )
    curve = curve_from_args(args)
    proto = registry.protocol(args.protocol)
    if curve is not None and proto.detector:
        raise UsageError(f"--protocol {args.protocol} speaks as the detector, which cannot be "
                         "authenticated: --curve-* needs --protocol native")  # fmt: skip

    if args.replay:
        bad = _given(args, PHYSICS_FLAGS + ("save", "overwrite"))
        if bad:
            raise UsageError(f"--{bad[0].replace('_', '-')} cannot be combined with --replay")
        overrides = {
            "energy_eV": args.energy,
            "step_A": args.step,
            "semiangle_mrad": args.semiangle,
            "angular_sampling_mrad": args.angular_sampling,
            "rotation_deg": args.rotation,
            "dwell_s": args.dwell,
            "scan_order": args.scan_order,
            "scan_shape": args.scan,  # required for 3D (frames, Qx, Qy) stacks
        }
        source = data = open_recording(args.replay, overrides)

        sys.stderr.write(f"replaying {args.replay}: {data.n_frames} frames {data.detector_shape}\n")
    else:
        cfg = config_from_args(args)
        if args.save:
            save_path, _ = split_dataset_spec(args.save)
            sidecar = [save_path.with_suffix(".json")] if save_path.suffix == ".npy" else []
            if save_path.suffix not in (".npy", ".h5", ".hdf5"):
                raise UsageError(f"--save {args.save}: save to .npy or .h5[:/dataset]")
            check_output(save_path, args.overwrite, flag="--save", companions=sidecar)
        sim = Simulator(cfg)
        g = sim.grid
        sys.stderr.write(
            f"simulating {cfg.scan_shape[0]}x{cfg.scan_shape[1]} scan, "
            f"{cfg.detector_shape[0]}x{cfg.detector_shape[1]} detector, "
            f"{g.angular_sampling_mrad:.4f} mrad/px, defocus {cfg.aberrations.defocus_A:g} A, "
            f"dose {cfg.dose_e_per_A2} e/A^2, sample {cfg.sample} (window {g.window_px} px)\n"
        )
        source = sim
        if args.save:
            truth = sim.ground_truth()
            phase = (sim.phase, {"pixel_A": g.pixel_A, "scan_origin_px": g.window_px // 2,
                                 "fine_per_step": g.fine_per_step})  # fmt: skip
            path = save_dataset(args.save, args.overwrite, cfg.scan_shape, cfg.detector_shape,
                                cfg.dtype, truth, sim.iter_batches(64), cfg.scan_order,
                                {"/ground_truth/phase": phase})  # fmt: skip
            sys.stderr.write(f"saved {path}\n")
            if args.no_stream:
                return 0
            source = RecordedDataset(args.save)  # stream the saved frames, do not re-simulate

    encoding = args.compression or proto.encodings[0]  # merlin: raw big-endian
    if encoding not in proto.encodings:
        raise UsageError(f"--compression {encoding} is not available for --protocol "
                         f"{args.protocol}")  # fmt: skip
    settings = SendSettings(protocol=args.protocol, encoding=encoding, batch=args.batch,
                            rate_fps=args.rate, loop=args.loop)  # fmt: skip
    link = LinkSettings(bind=args.bind, socket_type=args.socket,
                        wait_subscriber_s=args.wait_subscriber, curve=curve)  # fmt: skip
    try:
        sent = serve(source, settings, link, show_progress=False if args.quiet else None)
    finally:
        if isinstance(source, RecordedDataset):
            source.close()
    return 0 if sent else 1


def save_dataset(spec: str, overwrite: bool, *args) -> Path:
    """`write_dataset(spec, *args)` atomically: into a temporary file beside the target (and
    its .json sidecar for .npy), flushed, then moved into place; an existing file is replaced
    only with `overwrite`. A failure leaves neither a half file nor the temporary one."""
    path, inner = split_dataset_spec(spec)
    sidecar = (".json",) if path.suffix == ".npy" else ()
    with atomic_output(path, overwrite, sidecar) as tmp:
        try:
            write_dataset(f"{tmp}:{inner}" if inner is not None else str(tmp), *args)
        except DatasetError as exc:  # name the file asked for, not the temporary one
            raise DatasetError(str(exc).replace(str(tmp), str(path))) from None
    return path
