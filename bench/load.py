"""Load benchmark: a real uvicorn on loopback under concurrent clients, against the bare engine, in one run.

    python bench/load.py [--bundle DIR] [--concurrency 1 8 32 64] [--protocol http grpc] [--out bench/results]
    python bench/load.py --tracing --protocol http grpc         # OpenTelemetry traces on against off, and where
                                                                # a request's time goes, from its spans
    python bench/load.py --loop --concurrency 32 --variants     # drift tracking and capture on, against off
    python bench/load.py --input pixels --protocol http grpc    # clients that preprocess: PIXELS tensors, no decode

Without --bundle it builds a ViT-B/16 student bundle with random weights (they cost the same as trained ones).
Clients send real JPEGs (foolbox's ImageNet photos) as fast as the server answers: over HTTP to POST /classify
(httpx), over gRPC to ModelInfer (tritonclient.grpc.aio), each protocol in its own window. For each concurrency it
prints images/s, latency p50/p99, errors and 5xx, and the ratio to the bare engine's images/s (the session the
server picks: same variant, runtime and threads, on preprocessed tensors) at the batch size the server can form
there, alternating bare-engine windows with shares of the requests so that the machine's drift hits both alike.
With `--input pixels` the clients preprocess the photos themselves (once, before the clock starts) and send the
Open Inference Protocol's PIXELS tensors (binary FP32, /v2 over HTTP, ModelInfer over gRPC): what the server adds
to the engine when it decodes nothing.
"Engine busy" is the share of the wall time the server's engine was running (its own /metrics): what is left to
100% is time the engine waited for work; a ratio below the busy share is the engine running slower inside the
server, where decoding and HTTP share its cores. "Client cores" is the CPU the benchmark's own clients used (their
CPU seconds over the wall time): on a small machine they share the engine's cores too, which a real deployment's
clients, on other machines, do not.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def foolbox_photos() -> list[Path]:
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("error: the load benchmark posts foolbox's real JPEGs: pip install --no-deps foolbox")
    return sorted((Path(list(spec.submodule_search_locations)[0]) / "data").glob("*.jpg"))


def random_bundle(folder: Path, model: str, feature_dim: int, photos: list[Path], variants: list[str]) -> Path:
    """A bundle of a randomly initialised student, made by the project's own export."""
    from export.build import build_bundle
    from training.checkpoint import build_student, save_checkpoint
    from training.class_vectors import ClassVectors

    torch.manual_seed(0)
    student, _ = build_student(model, None, feature_dim, 4, 9)
    names = [f"class {i}" for i in range(100)]
    vectors = torch.nn.functional.normalize(torch.randn(len(names), feature_dim), dim=-1)
    ClassVectors(vectors, names, 100.0, {"source": "random, for benchmarking"}).save(folder / "vectors.npz")
    config = {"student_model": model, "student_pretrained": None, "teacher_model": "none", "teacher_pretrained": None,
              "teacher_dim": feature_dim, "prompt_tokens": 4, "prompt_depth": 9, "projector_hidden": None,
              "class_vectors": str(folder / "vectors.npz")}
    save_checkpoint(folder / "student.pt", student, config, epoch=0)
    out = folder / "bundle"
    build_bundle(folder / "student.pt", out, [str(p) for p in photos], name=f"{model}-random",
                 variants=tuple(variants), calibration_images=[str(p) for p in photos], skip_failing_variants=True)
    return out


class BareEngine:
    """The session the server would pick (same variant, runtime and threads), run alone on preprocessed tensors."""

    def __init__(self, bundle: Path, threads: int) -> None:
        from bundle import read_bundle
        from server.config import Settings
        from server.runtime.sessions.choice import open_session

        loaded = read_bundle(bundle)
        choice = open_session(loaded, Settings(bundle=bundle, intra_op_threads=threads))
        self.session, self.size = choice.session, loaded.manifest.input.image_size
        self.served = f"{choice.variant} on {self.session.description}"

    def images_and_seconds(self, batch: int, seconds: float) -> tuple[int, float]:
        x = np.random.default_rng(0).standard_normal((batch, 3, self.size, self.size), dtype=np.float32)
        self.session.run(x)
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds or runs < 2:
            self.session.run(x)
            runs += 1
        return batch * runs, time.perf_counter() - started


def percentiles_ms(latencies: list[float]) -> dict[str, float]:
    """p50 and p99 in milliseconds of latencies in seconds."""
    ordered = sorted(latencies)
    return {"p50_ms": 1000 * statistics.median(ordered), "p99_ms": 1000 * ordered[int(0.99 * (len(ordered) - 1))]}


async def load_level(url: str, photos: list[bytes], concurrency: int, requests: int,
                     models: list[str] | None = None, seconds: float | None = None, grpc: str | None = None) -> dict:
    """`requests` classifications by `concurrency` clients; with `models`, request i goes to models[i % len]; with
    `seconds`, no request starts after that long (a time window: `requests` is then only a cap). With `grpc`
    (host:port, and `models[0]` the model's name), over gRPC instead of HTTP."""
    latencies: list[float] = []
    statuses: list[int] = []
    counter = iter(range(requests))
    deadline = float("inf")

    async def client_loop(send) -> None:
        for i in counter:
            started = time.perf_counter()
            if started > deadline:
                break
            statuses.append(await send(i))
            latencies.append(time.perf_counter() - started)

    async with _sender(url, photos, concurrency, models, grpc) as send:
        started, cpu = time.perf_counter(), time.process_time()
        deadline = started + seconds if seconds is not None else deadline
        await asyncio.gather(*(client_loop(send) for _ in range(concurrency)))
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    ok = statuses.count(200)
    return {"concurrency": concurrency, "requests": len(statuses), "images_per_s": ok / wall, "wall_s": wall,
            "client_cpu_s": cpu,
            **percentiles_ms(latencies), "errors": len(statuses) - ok,
            "server_errors": sum(1 for s in statuses if s >= 500 or s == 0), "latencies_s": latencies}


@asynccontextmanager
async def _sender(url: str, photos: list[bytes], concurrency: int, models: list[str] | None, grpc: str | None):
    """An async function that sends request i and gives its status: 200 for an answer, else the HTTP status (0 for
    a transport error), or 500 + the gRPC status code's number."""
    if grpc is not None:
        import tritonclient.grpc.aio as triton
        from tritonclient.utils import InferenceServerException

        async with triton.InferenceServerClient(grpc) as client:
            async def send(i: int) -> int:
                photo = photos[i % len(photos)]
                if isinstance(photo, np.ndarray):
                    image = triton.InferInput("PIXELS", list(photo.shape), "FP32")
                    image.set_data_from_numpy(photo)
                else:
                    image = triton.InferInput("IMAGE", [1], "BYTES")
                    image.set_data_from_numpy(np.array([photo], dtype=object))
                try:
                    await client.infer(models[0], [image], parameters={"top_k": 1})
                    return 200
                except InferenceServerException:
                    return 500
            yield send
        return
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def send(i: int) -> int:
            params = {"top_k": 1, **({"model": models[i % len(models)]} if models else {})}
            photo = photos[i % len(photos)]
            try:
                if isinstance(photo, np.ndarray):
                    body, headers = _pixels_request(photo)
                    response = await client.post(f"/v2/models/{models[i % len(models)]}/infer", content=body,
                                                 headers=headers)
                else:
                    response = await client.post("/classify", files={"file": ("photo.jpg", photo)}, params=params)
                return response.status_code
            except httpx.HTTPError:
                return 0
        yield send


def _pixels_request(pixels: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """An Open Inference Protocol request over HTTP with PIXELS as binary data (what tritonclient.http sends): the
    body and its header."""
    raw = pixels.astype("<f4").tobytes()
    header = json.dumps({"inputs": [{"name": "PIXELS", "datatype": "FP32", "shape": list(pixels.shape),
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"top_k": 1, "binary_data_output": True}}).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}


def sent(args) -> str:
    return "real JPEGs" if args.input == "files" else "PIXELS tensors (real JPEGs preprocessed by the client)"


def client_pixels(bundle: Path, photos: list[bytes]) -> list[np.ndarray]:
    """The photos preprocessed as a client following the model card would (here with the server's own code), each
    [1, 3, S, S]."""
    from bundle import read_bundle
    from server.runtime.preprocess import prepare

    spec = read_bundle(bundle).manifest.input
    return [prepare(photo, spec, 40_000_000)[None] for photo in photos]


def inference_seconds(url: str) -> float:
    """The server's total engine time so far, from its own /metrics."""
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("promptkd_inference_seconds_sum"):
            return float(line.split()[-1])
    return 0.0


@dataclass
class Target:
    """A server under test: its HTTP URL, its gRPC address (None: off) and the model its gRPC calls name."""

    url: str
    grpc: str | None
    model: str

    def load(self, protocol: str) -> dict:
        """load_level's arguments for one protocol."""
        return {"grpc": self.grpc if protocol == "grpc" else None, "models": [self.model]}


def measure_level(engine: BareEngine, target: Target, data: list[bytes], concurrency: int, args) -> list[dict]:
    """One concurrency level in `args.rounds` rounds, each a bare-engine window then a share of the requests per
    protocol: the speed of a shared machine drifts over minutes, and alternating keeps that drift out of the
    ratios. One row per protocol."""
    requests = args.requests or max(24, 6 * concurrency)
    batch = min(concurrency, args.max_batch_size)
    images = seconds = 0.0
    parts: dict[str, list[dict]] = {protocol: [] for protocol in args.protocol}
    busy = dict.fromkeys(args.protocol, 0.0)
    for share in np.array_split(np.arange(requests), args.rounds):
        done, took = engine.images_and_seconds(batch, args.engine_seconds / args.rounds)
        images, seconds = images + done, seconds + took
        for protocol in args.protocol:
            engine_time = inference_seconds(target.url)
            parts[protocol].append(asyncio.run(load_level(target.url, data, concurrency, len(share),
                                                          **target.load(protocol))))
            busy[protocol] += inference_seconds(target.url) - engine_time
    rows = []
    for protocol, runs in parts.items():
        row = {"protocol": protocol, "concurrency": concurrency, "requests": requests, **summary(runs),
               "engine_batch": batch, "engine_images_per_s": images / seconds}
        row["engine_busy"] = busy[protocol] / row["wall_s"]
        row["ratio"] = row["images_per_s"] / row["engine_images_per_s"]
        print(f"{protocol} concurrency {concurrency}: {row['images_per_s']:.2f} img/s, ratio {row['ratio']:.2f}",
              file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def summary(runs: list[dict]) -> dict:
    """Windows of one configuration taken together."""
    wall = sum(p["wall_s"] for p in runs)
    return {"images_per_s": sum(p["requests"] - p["errors"] for p in runs) / wall, "wall_s": wall,
            "client_cores": sum(p["client_cpu_s"] for p in runs) / wall,
            "p50_ms": statistics.median(p["p50_ms"] for p in runs), "p99_ms": max(p["p99_ms"] for p in runs),
            "errors": sum(p["errors"] for p in runs), "server_errors": sum(p["server_errors"] for p in runs)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path | None, args, **settings: str) -> tuple[subprocess.Popen, str]:
    """A real uvicorn serving `bundle` (None: the model_repository=... in `settings`) with the benchmark's settings
    and further PROMPTKD_* `settings`."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROMPTKD_", "OTEL_"))}
    env.update({"PROMPTKD_BUNDLE": str(bundle)} if bundle is not None else {})
    env.update({k: v for k, v in settings.items() if k.startswith("OTEL_")})
    settings = {k: v for k, v in settings.items() if not k.startswith("OTEL_")}
    settings.setdefault("grpc_port", "0")
    queue = max(4 * max(args.concurrency), 2 * args.max_batch_size, 16)  # never below a batch: a valid setting
    env.update(PROMPTKD_MAX_BATCH_SIZE=str(args.max_batch_size),
               PROMPTKD_INTRA_OP_THREADS=str(args.threads), PROMPTKD_MAX_QUEUE_IMAGES=str(queue),
               PROMPTKD_REQUEST_TIMEOUT_S="600", **{f"PROMPTKD_{k.upper()}": v for k, v in settings.items()})
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "server.main:app", "--port", str(port),
                               "--log-level", "warning"], cwd=REPO, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        if server.poll() is not None:
            break
        time.sleep(0.5)
    server.terminate()
    sys.exit("error: the server did not become ready")


def measure_loop(urls: dict[str, str], data: list[bytes], concurrency: int, args) -> dict:
    """The same load on a server with drift tracking and capture off and one with both on, alternating windows."""
    requests = args.requests or max(24, 6 * concurrency)
    parts: dict[str, list[dict]] = {name: [] for name in urls}
    for share in np.array_split(np.arange(requests), args.rounds):
        for name, url in urls.items():
            parts[name].append(asyncio.run(load_level(url, data, concurrency, len(share))))
    row = {"concurrency": concurrency, "requests": requests, **{name: summary(runs) for name, runs in parts.items()}}
    print(f"concurrency {concurrency}: on/off {row['on']['images_per_s'] / row['off']['images_per_s']:.3f}",
          file=sys.stderr, flush=True)
    return row


def loop_overhead(bundle: Path, data: list[bytes], args, tmp: Path) -> None:
    """--loop: what drift tracking and capture (every image kept) cost, as the ratio of on to off."""
    servers = {"off": start_server(bundle, args, drift_window="0"),
               "on": start_server(bundle, args, drift_window="500", capture_dir=str(tmp / "capture"),
                                  capture_rate="1", capture_below="1")}
    try:
        rows = [measure_loop({k: url for k, (_, url) in servers.items()}, data, c, args) for c in args.concurrency]
        captured = httpx.get(f"{servers['on'][1]}/metrics", timeout=10).text
    finally:
        for server, _ in servers.values():
            server.terminate()
            server.wait(timeout=60)
    saved = [line for line in captured.splitlines() if line.startswith("promptkd_captured_total")]
    print(f"\ndrift window 500 and capture of every image, against both off, same bundle, max batch "
          f"{args.max_batch_size}, {os.cpu_count()} CPUs, real JPEGs over loopback ({'; '.join(saved)})\n")
    print("| concurrency | requests | off img/s | on img/s | ratio | off p50 / p99 ms | on p50 / p99 ms | p99 ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        off, on = r["off"], r["on"]
        print(f"| {r['concurrency']} | {r['requests']} | {off['images_per_s']:.2f} | {on['images_per_s']:.2f} | "
              f"{on['images_per_s'] / off['images_per_s']:.3f} | {off['p50_ms']:.0f} / {off['p99_ms']:.0f} | "
              f"{on['p50_ms']:.0f} / {on['p99_ms']:.0f} | {on['p99_ms'] / off['p99_ms']:.3f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "loop.json").write_text(json.dumps({"rows": rows}, indent=2))


def serve_target(bundle: Path, args, **settings: str) -> tuple[subprocess.Popen, Target]:
    """start_server, with gRPC on a port of its own when a protocol asks for it."""
    grpc_port = free_port() if "grpc" in args.protocol else 0
    server, url = start_server(bundle, args, grpc_port=str(grpc_port), **settings)
    model = httpx.get(url, headers={"Accept": "application/json"}, timeout=10).json()["name"]
    return server, Target(url, f"127.0.0.1:{grpc_port}" if grpc_port else None, model)


def tracing_cost(bundle: Path, data: list[bytes], args) -> None:
    """--tracing: the same load on a server with traces exported (OTLP over HTTP, to a receiver in this process)
    and one without, alternating windows; and each stage's mean time per request, from the spans received."""
    from traces import Receiver, breakdown

    receiver = Receiver()
    servers = {"off": serve_target(bundle, args),
               "on": serve_target(bundle, args, OTEL_TRACES_EXPORTER="otlp", OTEL_SERVICE_NAME="promptkd-bench",
                                  OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=receiver.endpoint,
                                  OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="http/protobuf", OTEL_BSP_SCHEDULE_DELAY="200")}
    rows = []
    try:
        for concurrency in args.concurrency:
            for protocol in args.protocol:
                rows.append(_traced_level(servers, receiver, data, concurrency, protocol, args, breakdown))
    finally:
        for server, _ in servers.values():
            server.terminate()
            server.wait(timeout=60)
        receiver.close()
    print(f"\nOpenTelemetry traces exported (OTLP/HTTP, batch span processor) against off, same bundle, max batch "
          f"{args.max_batch_size}, {os.cpu_count()} CPUs, {sent(args)} over loopback\n")
    print("| protocol | concurrency | requests | off img/s | on img/s | ratio | off p50 / p99 ms | on p50 / p99 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        off, on = r["off"], r["on"]
        print(f"| {r['protocol']} | {r['concurrency']} | {r['requests']} | {off['images_per_s']:.2f} | "
              f"{on['images_per_s']:.2f} | {on['images_per_s'] / off['images_per_s']:.3f} | {off['p50_ms']:.1f} / "
              f"{off['p99_ms']:.1f} | {on['p50_ms']:.1f} / {on['p99_ms']:.1f} |")
    for r in rows:
        stages = r["breakdown"]["stages"]
        print(f"\nwhere a request's time went, {r['protocol']} at concurrency {r['concurrency']} (mean ms per request "
              f"over {r['breakdown']['requests']} traced requests; the client saw p50 {r['on']['p50_ms']:.1f} ms)\n")
        print("| stage (span) | mean ms | in % of requests |")
        print("| --- | --- | --- |")
        for name, stage in sorted(stages.items(), key=lambda item: -item[1]["mean_ms"]):
            print(f"| {name} | {stage['mean_ms']:.2f} | {stage['share_of_requests']:.0%} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tracing.json").write_text(json.dumps({"rows": rows}, indent=2))


def _traced_level(servers: dict, receiver, data: list[bytes], concurrency: int, protocol: str, args,
                  breakdown) -> dict:
    requests = args.requests or max(24, 6 * concurrency)
    parts: dict[str, list[dict]] = {"off": [], "on": []}
    spans = []
    for share in np.array_split(np.arange(requests), args.rounds):
        for name, (_, target) in servers.items():
            parts[name].append(asyncio.run(load_level(target.url, data, concurrency, len(share),
                                                      **target.load(protocol))))
            if name == "on":
                time.sleep(1.0)  # the batch span processor exports every 200 ms
                spans += receiver.take()
    row = {"protocol": protocol, "concurrency": concurrency, "requests": requests,
           **{name: summary(runs) for name, runs in parts.items()}, "breakdown": breakdown(spans)}
    print(f"{protocol} concurrency {concurrency}: traced/untraced "
          f"{row['on']['images_per_s'] / row['off']['images_per_s']:.3f}", file=sys.stderr, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="bundle to serve (default: a random ViT-B/16 student bundle)")
    parser.add_argument("--student-model", default="ViT-B-16", help="architecture of the random bundle")
    parser.add_argument("--feature-dim", type=int, default=768, help="class-vector width of the random bundle")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64], help="client counts")
    parser.add_argument("--protocol", nargs="+", choices=["http", "grpc"], default=["http"],
                        help="HTTP (POST /classify) and/or gRPC (ModelInfer), each in its own windows")
    parser.add_argument("--requests", type=int, default=0, help="requests per level (default: max(24, 6 x it))")
    parser.add_argument("--max-batch-size", type=int, default=8, help="PROMPTKD_MAX_BATCH_SIZE of the server")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads, server and bare engine alike")
    parser.add_argument("--engine-seconds", type=float, default=10.0, help="bare-engine time per level")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of bare engine and load per level")
    parser.add_argument("--variants", nargs="*", default=["int8", "int8_vnni"],
                        help="variants of the random bundle (kept where they reach their floors); the server and "
                             "the bare engine both run the one the server picks")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for load.json")
    parser.add_argument("--loop", action="store_true",
                        help="instead: the same load with drift tracking and capture on against both off (loop.json)")
    parser.add_argument("--input", choices=["files", "pixels"], default="files",
                        help="what clients send: JPEG files (the server decodes them), or PIXELS tensors they "
                             "preprocessed themselves")
    parser.add_argument("--tracing", action="store_true",
                        help="instead: the same load with OpenTelemetry traces on against off, and the per-stage "
                             "breakdown from the traces (tracing.json)")
    args = parser.parse_args()
    if args.loop and args.input == "pixels":
        parser.error("--loop measures capture, which keeps image files: send --input files")

    photos = foolbox_photos()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or random_bundle(Path(tmp), args.student_model, args.feature_dim, photos,
                                                   args.variants)
        data = [p.read_bytes() for p in photos]
        if args.input == "pixels":
            data = client_pixels(bundle, data)
        if args.loop:
            loop_overhead(bundle, data, args, Path(tmp))
            return
        if args.tracing:
            tracing_cost(bundle, data, args)
            return
        engine = BareEngine(bundle, args.threads)
        server, target = serve_target(bundle, args)
        try:
            rows = [row for concurrency in args.concurrency
                    for row in measure_level(engine, target, data, concurrency, args)]
        finally:
            server.terminate()
            server.wait(timeout=60)

    print(f"\nserver on {bundle.name if args.bundle else args.student_model + ' (random weights)'}, {engine.served}, "
          f"max batch {args.max_batch_size}, {os.cpu_count()} CPUs, {sent(args)} over loopback\n")
    print("| protocol | concurrency | requests | img/s | p50 ms | p99 ms | errors | 5xx | bare engine img/s (batch) | "
          "ratio | engine busy | client cores |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['protocol']} | {r['concurrency']} | {r['requests']} | {r['images_per_s']:.2f} | "
              f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | {r['server_errors']} | "
              f"{r['engine_images_per_s']:.2f} ({r['engine_batch']}) | {r['ratio']:.2f} | {r['engine_busy']:.0%} | "
              f"{r['client_cores']:.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load.json").write_text(json.dumps({"max_batch_size": args.max_batch_size, "served": engine.served,
                                                    "input": args.input,
                                                    "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
