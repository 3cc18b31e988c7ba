"""Load benchmark: a real uvicorn on loopback under concurrent clients, against the bare engine, in one run.

    python bench/load.py [--bundle DIR] [--concurrency 1 8 32 64] [--max-batch-size 8] [--out bench/results]

Without --bundle it builds a ViT-B/16 student bundle with random weights (they cost the same as trained ones).
Clients post real JPEGs (foolbox's ImageNet photos) as fast as the server answers. For each concurrency it
prints images/s, latency p50/p99, errors and 5xx, and the ratio to the bare engine's images/s (onnxruntime
on the same graph, same threads, preprocessed tensors) at the batch size the server can form there.
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


def random_bundle(folder: Path, model: str, feature_dim: int, photos: list[Path]) -> Path:
    """A bundle of a randomly initialised student, made by the project's own export."""
    from export.cli import build_bundle
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
    build_bundle(folder / "student.pt", out, [str(p) for p in photos[:8]], name=f"{model}-random")
    return out


def bare_engine(bundle: Path, batches: list[int], threads: int, seconds: float) -> dict[int, float]:
    """Images/s of onnxruntime alone on the bundle's graph, on already preprocessed tensors."""
    from bundle import read_bundle
    from server.sessions.ort import OrtSession

    loaded = read_bundle(bundle)
    session = OrtSession(loaded.model_path(), ["CPUExecutionProvider"], threads)
    size = loaded.manifest.input.image_size
    result = {}
    for batch in batches:
        x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
        session.run(x)
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds or runs < 2:
            session.run(x)
            runs += 1
        result[batch] = batch * runs / (time.perf_counter() - started)
    return result


async def load_level(url: str, photos: list[bytes], concurrency: int, requests: int) -> dict:
    latencies: list[float] = []
    statuses: list[int] = []
    counter = iter(range(requests))

    async def client_loop(client: httpx.AsyncClient) -> None:
        for i in counter:
            started = time.perf_counter()
            try:
                response = await client.post("/classify", files={"file": ("photo.jpg", photos[i % len(photos)])},
                                             params={"top_k": 1})
                statuses.append(response.status_code)
            except httpx.HTTPError:
                statuses.append(0)
            latencies.append(time.perf_counter() - started)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    ok = statuses.count(200)
    ordered = sorted(latencies)
    return {"concurrency": concurrency, "requests": requests, "images_per_s": ok / wall,
            "p50_ms": 1000 * statistics.median(ordered), "p99_ms": 1000 * ordered[int(0.99 * (len(ordered) - 1))],
            "errors": requests - ok, "server_errors": sum(1 for s in statuses if s >= 500 or s == 0)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="bundle to serve (default: a random ViT-B/16 student bundle)")
    parser.add_argument("--student-model", default="ViT-B-16", help="architecture of the random bundle")
    parser.add_argument("--feature-dim", type=int, default=768, help="class-vector width of the random bundle")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64], help="client counts")
    parser.add_argument("--requests", type=int, default=0, help="requests per level (default: max(24, 3 x it))")
    parser.add_argument("--max-batch-size", type=int, default=8, help="PROMPTKD_MAX_BATCH_SIZE of the server")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads, server and bare engine alike")
    parser.add_argument("--engine-seconds", type=float, default=10.0, help="timing per bare-engine batch size")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for load.json")
    args = parser.parse_args()

    photos = foolbox_photos()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or random_bundle(Path(tmp), args.student_model, args.feature_dim, photos)
        batches = sorted({min(c, args.max_batch_size) for c in args.concurrency})
        engine = bare_engine(bundle, batches, args.threads, args.engine_seconds)
        port = free_port()
        env = dict(os.environ, PROMPTKD_BUNDLE=str(bundle), PROMPTKD_MAX_BATCH_SIZE=str(args.max_batch_size),
                   PROMPTKD_INTRA_OP_THREADS=str(args.threads), PROMPTKD_VARIANT="fp32",
                   PROMPTKD_MAX_QUEUE_IMAGES=str(4 * max(args.concurrency)), PROMPTKD_REQUEST_TIMEOUT_S="600")
        server = subprocess.Popen([sys.executable, "-m", "uvicorn", "server.main:app", "--port", str(port),
                                   "--log-level", "warning"], cwd=REPO, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
            else:
                sys.exit("error: the server did not become ready")
            data = [p.read_bytes() for p in photos]
            rows = []
            for concurrency in args.concurrency:
                requests = args.requests or max(24, 3 * concurrency)
                row = asyncio.run(load_level(url, data, concurrency, requests))
                batch = min(concurrency, args.max_batch_size)
                row.update(engine_batch=batch, engine_images_per_s=engine[batch],
                           ratio=row["images_per_s"] / engine[batch])
                rows.append(row)
                print(f"concurrency {concurrency}: {row['images_per_s']:.2f} img/s, ratio {row['ratio']:.2f}",
                      file=sys.stderr, flush=True)
        finally:
            server.terminate()
            server.wait(timeout=60)

    print(f"\nserver on {bundle.name if args.bundle else args.student_model + ' (random weights)'}, max batch "
          f"{args.max_batch_size}, {os.cpu_count()} CPUs, real JPEGs over loopback\n")
    print("| concurrency | requests | img/s | p50 ms | p99 ms | errors | 5xx | bare engine img/s (batch) | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests']} | {r['images_per_s']:.2f} | {r['p50_ms']:.0f} | "
              f"{r['p99_ms']:.0f} | {r['errors']} | {r['server_errors']} | {r['engine_images_per_s']:.2f} "
              f"({r['engine_batch']}) | {r['ratio']:.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load.json").write_text(json.dumps({"max_batch_size": args.max_batch_size, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
