"""Many PromptKD domains in one server: folded bundles (one full graph per domain) against domain bundles on one
shared backbone, side by side in one run.

    python bench/domains.py [--domains 1 4 11] [--concurrency 32] [--student-model ViT-B-16] [--out bench/results]

Every domain is a student of the same random-weight tower (saved once, as a trained tower would be) with its own
random prompts and projector, exported both ways by the project's own export (`python -m export bundle` and
`python -m export domain`). Real uvicorn servers on loopback serve D domains from folded bundles and, beside them,
from domain bundles and their shared backbone; all use one engine slot, the same threads and the same runtime.
The servers of the fewest domains run throughout; each larger D's pair runs beside them in turn (so that only one
large pair is in memory at a time). Clients post real JPEGs, request i to domain i mod D (a mixed load); windows
alternate between the servers so that the machine's drift hits all alike. Memory is each server's resident set
(VmRSS) once loaded and after the load.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import foolbox_photos, load_level  # noqa: E402
from models import rss_mib, start, wait_ready  # noqa: E402


def students(folder: Path, model: str, feature_dim: int, count: int, tag: str | None) -> list[Path]:
    """`count` students of one random tower (its weights saved once, standing for the weights of `tag`, so that
    they load as that tag's would; no tag: the file alone): each its own prompts and projector."""
    from training.checkpoint import build_student, save_checkpoint
    from training.class_vectors import ClassVectors
    from training.towers import load_clip

    torch.manual_seed(0)
    clip, _ = load_clip(model, None)
    torch.save(clip.state_dict(), folder / "tower.pt")
    del clip
    names = [f"class {i}" for i in range(100)]
    vectors = torch.nn.functional.normalize(torch.randn(len(names), feature_dim), dim=-1)
    ClassVectors(vectors, names, 100.0, {"source": "random, for benchmarking"}).save(folder / "vectors.npz")
    weights = str(folder / "tower.pt")
    pretrained, weights = (tag, weights) if tag else (weights, None)
    config = {"student_model": model, "student_pretrained": pretrained, "student_weights": weights,
              "teacher_model": "none",
              "teacher_pretrained": None, "teacher_dim": feature_dim, "prompt_tokens": 4, "prompt_depth": 9,
              "projector_hidden": None, "class_vectors": str(folder / "vectors.npz")}
    paths = []
    for domain in range(count):
        torch.manual_seed(100 + domain)
        student, _ = build_student(model, pretrained, feature_dim, 4, 9, weights=weights)
        with torch.no_grad():
            student.tower.prompts.normal_(0, 0.5)
        paths.append(folder / f"student{domain}.pt")
        save_checkpoint(paths[-1], student, config, epoch=0)
    return paths


def export_both(folder: Path, checkpoints: list[Path], photos: list[str]) -> tuple[list[Path], Path]:
    """Each student as a folded bundle, and as a domain of one repository with its shared backbone."""
    from export.build import build_bundle
    from export.domain import build_domain

    folded, shared = [], folder / "shared"
    for domain, checkpoint in enumerate(checkpoints):
        folded.append(folder / "folded" / f"domain{domain}")
        build_bundle(checkpoint, folded[-1], photos, name=f"domain{domain}", parity_set=8)
        build_domain(checkpoint, shared, f"domain{domain}", photos, version=1, parity_set=8)
        print(f"exported domain {domain}", file=sys.stderr)
    return folded, shared


def repositories(folder: Path, folded: list[Path], shared: Path, count: int) -> dict[tuple[str, int], Path]:
    """For D domains: a repository of the first D folded bundles, and one of the first D domain bundles."""
    roots = {}
    for kind in ("folded", "shared"):
        root = folder / f"{kind}{count}"
        for domain in range(count):
            (root / f"domain{domain}").mkdir(parents=True)
            source = folded[domain] if kind == "folded" else shared / f"domain{domain}" / "1"
            (root / f"domain{domain}" / "1").symlink_to(source.resolve(), target_is_directory=True)
        if kind == "shared":
            (root / "_backbones").symlink_to((shared / "_backbones").resolve(), target_is_directory=True)
        roots[(kind, count)] = root
    return roots


def measure(servers: dict, photos: list[bytes], args, parts: dict) -> None:
    """Alternating windows of every server under the same concurrency, added to `parts`."""
    for share in np.array_split(np.arange(args.requests), args.rounds):
        for key, (_, url) in servers.items():
            names = [f"domain{i}" for i in range(key[1])]
            parts.setdefault(key, []).append(asyncio.run(load_level(url, photos, args.concurrency, len(share), names)))


def pooled(runs: list[dict]) -> dict:
    wall = sum(p["wall_s"] for p in runs)
    return {"requests": sum(p["requests"] for p in runs),
            "images_per_s": sum(p["requests"] - p["errors"] for p in runs) / wall,
            "p50_ms": statistics.median(p["p50_ms"] for p in runs), "p99_ms": max(p["p99_ms"] for p in runs),
            "errors": sum(p["errors"] for p in runs)}


def launch(roots: dict, keys: list, args) -> dict:
    servers = {}
    try:
        for key in keys:  # one at a time: each loads alone, then idles
            servers[key] = start(roots[key], args, backend=args.backend)
            wait_ready(*servers[key], key[1])
    except BaseException:
        stop(servers)
        raise
    return servers


def stop(servers: dict) -> None:
    for server, _ in servers.values():
        server.terminate()
        server.wait(timeout=60)


def run(roots: dict, photos: list[bytes], args) -> tuple[dict, dict]:
    """The fewest domains served both ways throughout; each larger count beside them in turn (so that only one
    large pair is in memory at a time), under alternating windows. Returns the rows and what each kind served."""
    low = min(args.domains)
    base_keys = [("folded", low), ("shared", low)]
    base = launch(roots, base_keys, args)
    parts: dict = {}
    memory = {key: (rss_mib(server.pid), None) for key, (server, _) in base.items()}
    try:
        served = {kind: httpx.get(base[(kind, low)][1], timeout=10).json() for kind in ("folded", "shared")}
        for count in sorted(set(args.domains) - {low}) or [None]:
            extra = launch(roots, [("folded", count), ("shared", count)], args) if count else {}
            try:
                memory.update({key: (rss_mib(server.pid), None) for key, (server, _) in extra.items()})
                measure({**base, **extra}, photos, args, parts)
                memory.update({key: (memory[key][0], rss_mib(server.pid)) for key, (server, _) in extra.items()})
            finally:
                stop(extra)
        memory.update({key: (memory[key][0], rss_mib(server.pid)) for key, (server, _) in base.items()})
    finally:
        stop(base)
    rows = {key: {"bundles": key[0], "domains": key[1], **pooled(runs), "rss_loaded_mib": memory[key][0],
                  "rss_after_mib": memory[key][1]} for key, runs in sorted(parts.items(), key=lambda kv: kv[0][1])}
    return rows, served


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student-model", default="ViT-B-16", help="architecture of the random tower")
    parser.add_argument("--feature-dim", type=int, default=768, help="class-vector width")
    parser.add_argument("--weights-tag", default="openai",
                        help="open_clip tag the random weights stand for (PromptKD's student: openai); '' for none")
    parser.add_argument("--domains", type=int, nargs="+", default=[1, 4, 11], help="domain counts to compare")
    parser.add_argument("--concurrency", type=int, default=32, help="clients")
    parser.add_argument("--requests", type=int, default=96, help="requests per server and count, over all rounds")
    parser.add_argument("--rounds", type=int, default=3, help="alternations between the servers")
    parser.add_argument("--max-batch-size", type=int, default=8, help="PROMPTKD_MAX_BATCH_SIZE of every server")
    parser.add_argument("--threads", type=int, default=0, help="runtime threads per batch (0: all cores)")
    parser.add_argument("--backend", default="onnxruntime",
                        help="PROMPTKD_BACKEND of every server (onnxruntime: 0.5 GB per folded ViT-B/16; OpenVINO "
                             "holds two compiled forms, about 1.3 GB, too much for 11 folded domains in 24 GB)")
    parser.add_argument("--work", type=Path, help="keep the exports here and reuse them on the next run")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for domains.json")
    args = parser.parse_args()

    photos = foolbox_photos()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.work or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        count = max(args.domains)
        if (folder / "shared" / f"domain{count - 1}" / "1").is_dir():
            folded = [folder / "folded" / f"domain{d}" for d in range(count)]
            shared = folder / "shared"
        else:
            checkpoints = students(folder, args.student_model, args.feature_dim, count, args.weights_tag)
            folded, shared = export_both(folder, checkpoints, [str(p) for p in photos[:8]])
        roots = {}
        for count in args.domains:
            roots.update(repositories(Path(tmp) / "repos", folded, shared, count))
        rows, served = run(roots, [p.read_bytes() for p in photos], args)
    report(rows, served, args)


def report(rows: dict, served: dict, args) -> None:
    print(f"\n{args.student_model} (random weights), engine slots 1, max batch {args.max_batch_size}, concurrency "
          f"{args.concurrency}, {os.cpu_count()} CPUs, real JPEGs over loopback, mixed-domain load")
    for kind, info in served.items():
        print(f"  {kind}: {info['variant']} on {info['runtime']}")
    print("\n| bundles | domains | requests | img/s | p50 ms | p99 ms | errors | RSS loaded MiB | RSS after MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in sorted(rows.values(), key=lambda r: (r["domains"], r["bundles"])):
        print(f"| {r['bundles']} | {r['domains']} | {r['requests']} | {r['images_per_s']:.2f} | {r['p50_ms']:.0f} | "
              f"{r['p99_ms']:.0f} | {r['errors']} | {r['rss_loaded_mib']:.0f} | {r['rss_after_mib']:.0f} |")
    low, high = min(args.domains), max(args.domains)
    print()
    for kind in ("folded", "shared"):
        one, many = rows[(kind, low)], rows[(kind, high)]
        print(f"{kind}: {high} domains / {low}: memory {many['rss_after_mib'] / one['rss_after_mib']:.2f}x, "
              f"throughput {many['images_per_s'] / one['images_per_s']:.2f}x, "
              f"p99 {many['p99_ms'] / one['p99_ms']:.2f}x")
    shared, folded = rows[("shared", high)], rows[("folded", high)]
    print(f"{high} domains, shared / folded: memory {shared['rss_after_mib'] / folded['rss_after_mib']:.2f}x, "
          f"throughput {shared['images_per_s'] / folded['images_per_s']:.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "domains.json").write_text(json.dumps({"served": {k: f"{v['variant']} on {v['runtime']}"
                                                                  for k, v in served.items()},
                                                       "rows": list(rows.values())}, indent=2))


if __name__ == "__main__":
    main()
