"""`emotion-monitor` command line. The sub-commands and flags here are a stable interface: scripts call them."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import logging
import signal
import socket
import sys
from pathlib import Path

import numpy as np

from streamer.config import ConfigError, MonitorConfig, check, load_config

log = logging.getLogger("emotion-monitor")

BUFFER_OFFLINE = "start even if the broker cannot be reached, spooling events until it can (default: exit)"


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("faster_whisper", "amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _config(args: argparse.Namespace) -> MonitorConfig:
    config = load_config(args.config)
    if getattr(args, "language", None):
        config.recogniser.language = args.language
    if getattr(args, "broker", None):
        config.mqtt.url = args.broker
    if getattr(args, "stream", None):
        config.stream = args.stream
    if getattr(args, "node", None):
        config.node = args.node
    if getattr(args, "source", None):
        config.source = args.source
    if getattr(args, "metrics", None):
        config.metrics = args.metrics
    if getattr(args, "buffer_offline", False):
        config.mqtt.buffer_offline = True
    return check(config)


async def _engine(config: MonitorConfig, live: bool = False):
    """Load the models off the event loop (seconds), so signals and the broker connection stay responsive.
    `live`: keep latency bounded under overload (`pipeline.latency_budget_ms`); offline work waits instead."""
    from streamer.pipeline import Engine

    pipeline = config.pipeline
    return await asyncio.to_thread(
        Engine,
        config.recogniser,
        config.classifier,
        config.node,
        pipeline.max_batch,
        pipeline.latency_budget_ms if live else 0.0,
    )


def _source_spec(spec: str) -> str:
    """`auto`: the first microphone if one exists, else the generated Spanish demo."""
    if spec != "auto":
        return spec
    from streamer.sources import list_input_devices

    if list_input_devices():
        return "mic"
    from streamer.demo import demo_audio_path

    path = demo_audio_path()
    log.info("no microphone found: playing the generated Spanish demo %s in real time", path)
    return f"file:{path}"


@contextlib.asynccontextmanager
async def _monitoring(config: MonitorConfig, jsonl: str | None, live: bool, extra_sinks: tuple = ()):
    """What `run` and `serve` share: the engine, the broker (embedded if none listens), the MQTT sink first and
    the other sinks, metrics; yields (engine, broker URL, sinks) and closes them all in order."""
    from streamer.metrics import HEALTH
    from streamer.metrics import serve as serve_metrics
    from streamer.publisher import JsonlSink, MqttSink, resolve_broker

    async with contextlib.AsyncExitStack() as stack:
        url, embedded = await resolve_broker(config.mqtt)
        if embedded:
            stack.push_async_callback(embedded.stop)
        mqtt = MqttSink(config.mqtt, url, config.node)
        await mqtt.start()  # a broker that cannot be reached fails here, before the models load (seconds)
        stack.push_async_callback(mqtt.close)
        engine = await _engine(config, live)
        stack.callback(engine.close)
        sinks = [mqtt, *([JsonlSink(jsonl, config.mqtt.publish_transcript)] if jsonl else []), *extra_sinks]
        for sink in sinks[1:]:
            await sink.start()
            stack.push_async_callback(sink.close)
        HEALTH.sink = mqtt
        if config.metrics:
            stack.callback((await serve_metrics(config.metrics)).close)
        yield engine, url, sinks


async def _run(args: argparse.Namespace, config: MonitorConfig) -> int:
    from streamer.live_view import ConsoleSink
    from streamer.pipeline import run_stream
    from streamer.recogniser import for_one_stream
    from streamer.sources import open_source

    source = open_source(_source_spec(config.source), realtime=not args.fast, rate=args.rate, channels=args.channels)
    config.recogniser = for_one_stream(config.recogniser)
    if args.dashboard and not config.mqtt.homeassistant_url:
        config.mqtt.homeassistant_url = _page_url(args.dashboard)
    console = () if args.quiet else (ConsoleSink(show_transcript=config.mqtt.publish_transcript),)
    stats = None
    # Before anything is published (as in `_serve`): a signal once `online` is out, while the models load, stops the
    # run cleanly instead of killing it; a second one stops it without finishing the waiting utterances.
    stop = asyncio.Event()
    task: asyncio.Task | None = None

    def on_signal() -> None:
        if stop.is_set() and task is not None:
            task.cancel()
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    async with _monitoring(config, args.jsonl, not args.fast, console) as (engine, url, sinks):
        mqtt = sinks[0]
        dashboard = await _start_dashboard(url, args.dashboard, config.node, config) if args.dashboard else None
        log.info(
            "stream %s from %s → %s (topic emotion/v1/%s/%s/event)",
            config.stream,
            source.name,
            mqtt.address.url,  # host and port only: credentials are never logged
            config.node,
            config.stream,
        )
        task = asyncio.create_task(
            run_stream(source, engine, sinks, config.stream, config.segmenter, config.pipeline, stop)
        )
        try:
            stats = await task
        except asyncio.CancelledError:
            log.warning("stopped without finishing the waiting utterances")
        finally:
            if dashboard:
                await dashboard.stop()
    if stats is None:
        return 0
    lat = stats.latencies_ms
    log.info(
        "%d utterances, %d events (%d voice-only under load), %d failed, %d dropped; end of speech → "
        "publish p50 %.0f ms, p95 %.0f ms; %d events published over MQTT",
        stats.utterances,
        stats.events,
        stats.voice_only,
        stats.failed,
        stats.dropped,
        _percentile(lat, 50),
        _percentile(lat, 95),
        mqtt.published,
    )
    return 1 if stats.error else 0


async def _serve(args: argparse.Namespace, config: MonitorConfig) -> int:
    from streamer.ingest import PROTOCOLS, check_listeners, start_listeners
    from streamer.ingest.calls import CallHub

    for protocol in PROTOCOLS:
        if getattr(args, protocol, None):
            setattr(config.ingest, protocol, getattr(args, protocol))
    if not any(getattr(config.ingest, p) for p in PROTOCOLS):
        log.error("nothing to serve: give --audiosocket, --twilio, --freeswitch or --audiohook HOST:PORT (or ingest:)")
        return 2
    check_listeners(config.ingest)
    # Before anything is published: a SIGTERM once `online` is out (the models load for seconds after it) must
    # still end in a clean shutdown with `offline`, not kill the process.
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    async with _monitoring(config, args.jsonl, live=True) as (engine, _, sinks):
        hub = CallHub(engine, sinks, config.ingest, config.segmenter, config.pipeline)
        servers = []
        try:
            servers = await start_listeners(hub)
            log.info("serving calls → %s (topics emotion/v1/%s/call/<call_id>/…)", sinks[0].address.url, config.node)
            await stop.wait()
            log.info("stopping: ending %d active calls", len(hub.calls))
        finally:
            await hub.close()
            for server in servers:
                server.close()
            for server in servers:
                await server.wait_closed()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    return asyncio.run(_serve(args, _config(args)))


def cmd_run(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args, _config(args)))


def _scale_out_broker(config: MonitorConfig) -> str:
    """`auto` is the local broker, never an embedded one: amqtt has no shared subscriptions."""
    return "mqtt://127.0.0.1:1883" if config.mqtt.url == "auto" else config.mqtt.url


async def _ingest(args: argparse.Namespace, config: MonitorConfig) -> int:
    from streamer.distributed.ingest import JobPublisher, ingest_stream
    from streamer.sources import open_source

    source = open_source(_source_spec(config.source), realtime=not args.fast, rate=args.rate, channels=args.channels)
    publisher = JobPublisher(config.mqtt, _scale_out_broker(config), config.node, config.distributed)
    await publisher.start()
    log.info("stream %s from %s → jobs on %s", config.stream, source.name, publisher.address.url)
    task = asyncio.create_task(ingest_stream(source, publisher, config.stream, config.segmenter))
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
    try:
        stats = await task
    finally:
        await publisher.close()
    log.info(
        "%d jobs (%.1f s of audio, %d bytes of %s jobs) published, %d left in the spool",
        publisher.jobs,
        publisher.audio_s,
        publisher.job_bytes,
        config.distributed.audio,
        publisher.spool.size(),
    )
    return 1 if stats.error else 0


def cmd_ingest(args: argparse.Namespace) -> int:
    return asyncio.run(_ingest(args, _config(args)))


async def _worker(args: argparse.Namespace, config: MonitorConfig) -> int:
    from streamer.distributed.worker import Worker
    from streamer.metrics import HEALTH
    from streamer.metrics import serve as serve_metrics
    from streamer.publisher import BrokerUnreachableError

    for option in ("group", "jobs"):
        if getattr(args, option):
            setattr(config.distributed, option, getattr(args, option))
    if args.id:
        config.distributed.worker_id = args.id
    engine = await _engine(config)
    worker = Worker(config.mqtt, _scale_out_broker(config), engine, config.distributed)
    try:
        await worker.start()
    except BrokerUnreachableError:
        engine.close()
        raise
    HEALTH.sink = worker
    metrics = await serve_metrics(config.metrics) if config.metrics else None
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("stopping: leaving the group, finishing the jobs held")
    finally:
        await worker.close()
        if metrics:
            metrics.close()
        engine.close()
    s = worker.stats
    log.info(
        "worker %s: %d jobs, %d events, %d expired, %d dead-lettered, %d failed attempts; mean batch %.2f",
        worker.worker_id,
        s.jobs,
        s.events,
        s.expired,
        s.deadletter,
        s.failed_attempts,
        engine.batched / max(engine.batches, 1),
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    return asyncio.run(_worker(args, _config(args)))


async def _analyze(args: argparse.Namespace, config: MonitorConfig) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from streamer.audio import AudioError, load_audio
    from streamer.frames import Utterance
    from streamer.pipeline import run_stream
    from streamer.publisher import JsonlSink
    from streamer.segmenter import speech_seconds
    from streamer.sources import FileSource

    engine = await _engine(config)
    sink = JsonlSink(args.jsonl, config.mqtt.publish_transcript)
    await sink.start()
    failed = 0
    try:
        with Progress(transient=True, console=Console(stderr=True)) as progress:
            job = progress.add_task("analysing", total=len(args.paths))
            for path in args.paths:
                stream = Path(path).stem
                if args.whole_file:
                    try:
                        audio = await asyncio.to_thread(load_audio, path)
                        if len(audio) == 0:
                            raise AudioError(f"{path}: no samples")
                    except AudioError as e:
                        log.error("%s", e)
                        failed += 1
                        progress.advance(job)
                        continue
                    speech_s = speech_seconds(audio, config.segmenter)
                    mtime = Path(path).stat().st_mtime
                    utterance = Utterance.whole(audio, stream, speech_s, f"file:{path}", mtime)
                    sink.send(await engine.aprocess(utterance, 0))
                else:
                    stats = await run_stream(FileSource(path, realtime=False), engine, [sink], stream, config.segmenter)
                    failed += bool(stats.error)
                progress.advance(job)
    finally:
        await sink.close()
        engine.close()
    if failed:
        log.error("%d of %d files could not be analysed", failed, len(args.paths))
    return 1 if failed else 0


def cmd_analyze(args: argparse.Namespace) -> int:
    return asyncio.run(_analyze(args, _config(args)))


def cmd_classify_text(args: argparse.Namespace) -> int:
    from streamer.classifier import EmotionClassifier, as_scores
    from streamer.frames import LABELS
    from streamer.recogniser import language_code

    config = _config(args)  # refuses an unknown --language
    language = language_code(args.language)
    if language is None:  # Whisper detects the language of speech; a text has nothing it could detect from
        raise ConfigError("classify-text needs the language of the texts: --language es, en, … (auto is for speech)")
    try:
        with open(args.csv, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        log.error("cannot read %s: %s", args.csv, e)
        return 1
    if rows and args.column not in rows[0]:
        log.error("%s has no column %r; columns: %s", args.csv, args.column, ", ".join(rows[0]))
        return 1
    classifier = EmotionClassifier(config.classifier)
    model = classifier.text_model_for(language)
    texts = [(row.get(args.column) or "").strip() for row in rows]
    out = sys.stdout if args.jsonl == "-" else open(args.jsonl, "w", encoding="utf-8")  # noqa: SIM115
    empty = 0
    try:
        for start in range(0, len(texts), 64):
            batch = texts[start : start + 64]
            filled = [t for t in batch if t]
            probs = iter(classifier.classify_text(filled, language)) if filled else iter(())
            for offset, text in enumerate(batch):
                line: dict = {"row": start + offset, "transcript": text, "language": language}
                line["model"] = {"emotion": model.model_id}
                if text:
                    p = next(probs)
                    best = int(np.argmax(p))
                    line |= {
                        "label": LABELS[best],
                        "confidence": round(float(p[best]), 4),
                        "scores": as_scores(p),
                        "text_scores": as_scores(p),
                    }
                else:
                    empty += 1
                    line |= {
                        "label": None,
                        "confidence": None,
                        "scores": None,
                        "text_scores": None,
                        "skipped": "empty text",
                    }
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    if empty:
        log.warning("%d rows had no text in column %r (label null)", empty, args.column)
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    from streamer.sources import list_input_devices

    devices = list_input_devices()
    if not devices:
        print("no audio input devices found")
    for d in devices:
        print(f"{d.index:3d}  {d.name}  ({d.channels} ch, {d.rate} Hz)")
    return 0


def _page_url(listen: str) -> str:
    """The dashboard's page as another machine (Home Assistant's browser) opens it: a wildcard address becomes the
    host name."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    return f"http://{socket.getfqdn() if host in ('', '0.0.0.0', '::') else host}:{port}/"


async def _start_dashboard(
    broker: str, listen: str, node: str | None, config: MonitorConfig, forget_offline_s: float = 3600.0
):
    from streamer.dashboard import Dashboard

    dashboard = Dashboard(broker, listen, node, config.mqtt, forget_offline_s=forget_offline_s)
    await dashboard.start()
    return dashboard


async def _dashboard(args: argparse.Namespace, config: MonitorConfig) -> int:
    broker = "mqtt://127.0.0.1:1883" if config.mqtt.url == "auto" else config.mqtt.url
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    dashboard = await _start_dashboard(broker, args.http, args.node, config, args.forget_offline)
    try:
        await stop.wait()
    finally:
        await dashboard.stop()
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    return asyncio.run(_dashboard(args, _config(args)))


def cmd_install_service(args: argparse.Namespace) -> int:
    from streamer.service import ENABLE, ServiceError, install, unit_text

    if args.print:
        print(unit_text(args.run_args))
        return 0
    try:
        path = install(args.run_args, args.enable)
    except ServiceError as e:
        log.error("%s", e)
        return 1
    print(f"wrote {path}")
    if not args.enable:
        print(f"start it with: {ENABLE}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emotion-monitor", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="YAML config (see configs/monitor.yaml)")
        p.add_argument("--language", help="auto (default: Whisper detects it per utterance) or a code such as es, en")

    def source(p: argparse.ArgumentParser) -> None:
        """Where the audio of `run` and `ingest` comes from, and the names it gets."""
        p.add_argument("--source", help="mic[:DEVICE] | file:PATH | stdin (default: auto)")
        p.add_argument("--stream", help="stream id used in topics and events")
        p.add_argument("--fast", action="store_true", help="file: sources play as fast as possible")
        p.add_argument("--rate", type=int, default=16000, help="sample rate of stdin PCM (default 16000)")
        p.add_argument("--channels", type=int, default=1, help="channels of stdin PCM (default 1)")

    def publishing(p: argparse.ArgumentParser, broker: str, metrics: bool = True) -> None:
        p.add_argument("--broker", help=broker)
        p.add_argument("--buffer-offline", action="store_true", help=BUFFER_OFFLINE)
        p.add_argument("--node", help="node id used in topics (default: host name)")
        if metrics:
            p.add_argument("--metrics", metavar="HOST:PORT", help="serve /metrics (Prometheus) and /healthz here")

    any_broker = "auto | mqtt://[user:pass@]host:port | mqtts://…"
    shared_broker = "mqtt://[user:pass@]host:port | mqtts://… (default 127.0.0.1:1883)"

    run = sub.add_parser("run", help="monitor a live source and publish events")
    common(run)
    source(run)
    publishing(run, any_broker)
    run.add_argument("--jsonl", help="also write events as JSON lines to this file (- for stdout)")
    run.add_argument("--quiet", action="store_true", help="no live view in the terminal")
    run.add_argument("--dashboard", metavar="HOST:PORT", help="also serve the live web dashboard here")
    run.set_defaults(func=cmd_run)

    serve = sub.add_parser("serve", help="take live phone calls (AudioSocket, Twilio, FreeSWITCH) and publish events")
    common(serve)
    serve.add_argument("--audiosocket", metavar="HOST:PORT", help="Asterisk AudioSocket (TCP) listener")
    serve.add_argument("--twilio", metavar="HOST:PORT", help="Twilio Media Streams (WebSocket) listener")
    serve.add_argument("--freeswitch", metavar="HOST:PORT", help="FreeSWITCH mod_audio_fork (WebSocket) listener")
    serve.add_argument("--audiohook", metavar="HOST:PORT", help="Genesys Cloud AudioHook (WebSocket) listener")
    publishing(serve, any_broker)
    serve.add_argument("--jsonl", help="also write events and call messages as JSON lines (- for stdout)")
    serve.set_defaults(func=cmd_serve)

    ingest = sub.add_parser("ingest", help="scale-out: cut a source into utterances and publish them as jobs")
    common(ingest)
    source(ingest)
    publishing(ingest, shared_broker, metrics=False)
    ingest.set_defaults(func=cmd_ingest)

    worker = sub.add_parser("worker", help="scale-out: process jobs from a shared subscription and publish events")
    common(worker)
    worker.add_argument("--broker", help=shared_broker)
    worker.add_argument("--buffer-offline", action="store_true", help=BUFFER_OFFLINE)
    worker.add_argument("--group", help="shared-subscription group of the worker pool (default emotion-workers)")
    worker.add_argument("--id", help="fixed id, unique per worker: names its persistent session (default: host name)")
    worker.add_argument("--jobs", metavar="FILTER", help="job topic filter (default emotion/v1/jobs/#)")
    worker.add_argument("--metrics", metavar="HOST:PORT", help="serve /metrics (Prometheus) and /healthz here")
    worker.set_defaults(func=cmd_worker)

    analyze = sub.add_parser("analyze", help="analyse audio files offline")
    common(analyze)
    analyze.add_argument("paths", nargs="+", metavar="PATH")
    analyze.add_argument("--whole-file", action="store_true", help="each file is one utterance → one event")
    analyze.add_argument("--jsonl", required=True, help="output JSON lines (- for stdout)")
    analyze.set_defaults(func=cmd_analyze)

    text = sub.add_parser("classify-text", help="words-only emotion for a CSV column")
    text.add_argument("--config")
    text.add_argument("--csv", required=True)
    text.add_argument("--column", required=True)
    text.add_argument("--language", default="es", help="language of the texts, picks the words head (default es)")
    text.add_argument("--jsonl", required=True, help="output JSON lines (- for stdout)")
    text.set_defaults(func=cmd_classify_text)

    devices = sub.add_parser("devices", help="list audio input devices")
    devices.set_defaults(func=cmd_devices)

    dash = sub.add_parser("dashboard", help="live web dashboard of the events and calls on the broker")
    dash.add_argument("--config", help="YAML config (its mqtt: section: credentials, TLS)")
    dash.add_argument("--broker", help="mqtt://[user:pass@]host:port | mqtts://… (default mqtt://127.0.0.1:1883)")
    dash.add_argument("--http", metavar="HOST:PORT", default="127.0.0.1:8765", help="serve the page here")
    dash.add_argument("--node", help="show only this node (default: all)")
    dash.add_argument(
        "--forget-offline",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="forget a node offline for longer than this, with its streams (default 3600)",
    )
    dash.set_defaults(func=cmd_dashboard)

    service = sub.add_parser("install-service", help="install a systemd user unit running `run`")
    service.add_argument("--enable", action="store_true", help="also daemon-reload and enable --now")
    service.add_argument("--print", action="store_true", help="print the unit instead of writing it")
    service.add_argument("run_args", nargs=argparse.REMAINDER, help="arguments for `run`, after --")
    service.set_defaults(func=cmd_install_service)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose)
    if getattr(args, "run_args", None) and args.run_args[0] == "--":
        args.run_args = args.run_args[1:]
    try:
        return args.func(args)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        from streamer.audio import AudioError
        from streamer.models import ModelFileError
        from streamer.sources import SourceError

        if isinstance(e, AudioError | SourceError | ModelFileError | ValueError | OSError):
            log.error("%s", e)
            return 1
        raise


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
