"""Load test of `clipbeam serve`: N concurrent clients on loopback for a bounded time.

Starts `clipbeam serve --index INDEX` on a free 127.0.0.1 port (or uses
--url), warms it up, then runs one phase per query kind: text queries (the
model encodes each; prompts vary so nothing is answered from a cache) and
vector queries (random unit vectors: the index search alone). Each client
sends its next request as soon as the last one is answered. Prints a
Markdown table: queries/s, p50/p99 latency (client side, in ms) and errors.

    python benchmarks/serve_load.py --index demo-output/index [--clients 8] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from servehelpers import running_server  # noqa: E402

from clipbeam.models.shapes import class_names  # noqa: E402

TEMPLATES = ("a {}", "a photo of a {}", "{}", "a drawing of a {}", "a picture of one {}", "the {}")


def text_bodies() -> list[dict]:
    """144 distinct prompts about the demo's shapes."""
    labels = [f"{color} {shape}" for color, shape in class_names()]
    return [{"text": template.format(label), "k": 10} for template in TEMPLATES for label in labels]


def vector_bodies(dim: int, count: int = 256, seed: int = 0) -> list[dict]:
    vectors = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [{"vector": [round(float(v), 6) for v in row], "k": 10} for row in vectors]


async def client(session, url: str, bodies: list[dict], offset: int, stop_at: float, latencies: list[float],
                 errors: list[str]) -> None:
    n = offset
    while time.perf_counter() < stop_at:
        body = json.dumps(bodies[n % len(bodies)])
        n += 1
        started = time.perf_counter()
        try:
            async with session.post(url + "/search", data=body,
                                    headers={"Content-Type": "application/json"}) as response:
                await response.read()
                ok = response.status == 200
                reason = f"HTTP {response.status}"
        except Exception as exc:  # a refused or dropped connection is an error of the run, not a crash
            ok, reason = False, f"{exc.__class__.__name__}: {exc}"
        if ok:
            latencies.append((time.perf_counter() - started) * 1000.0)
        else:
            errors.append(reason)


async def phase(url: str, bodies: list[dict], clients: int, seconds: float) -> dict:
    import aiohttp

    latencies: list[float] = []
    errors: list[str] = []
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        stop_at = started + seconds
        await asyncio.gather(*(client(session, url, bodies, i * 7, stop_at, latencies, errors)
                               for i in range(clients)))
        elapsed = time.perf_counter() - started
    values = np.asarray(latencies) if latencies else np.zeros(1)
    return {"queries": len(latencies), "qps": len(latencies) / elapsed, "p50": float(np.percentile(values, 50)),
            "p99": float(np.percentile(values, 99)), "errors": len(errors), "first_error": errors[0] if errors else ""}


def run_all(url: str, clients: int, seconds: float, warmup: float) -> list[tuple[str, dict]]:
    import httpx

    dim = httpx.get(url + "/stats", timeout=30).json()["dim"]
    kinds = [("text", text_bodies()), ("vector", vector_bodies(dim))]
    out = []
    for kind, bodies in kinds:
        asyncio.run(phase(url, bodies, clients, warmup))
        result = asyncio.run(phase(url, bodies, clients, seconds))
        print(f"{kind}: {json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()})}",
              flush=True)
        out.append((kind, result))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", default="demo-output/index", help="index folder (default %(default)s)")
    parser.add_argument("--url", default=None, help="a running server instead of starting one")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per phase (default %(default)s)")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each phase")
    args = parser.parse_args()
    if args.url:
        results = run_all(args.url.rstrip("/"), args.clients, args.seconds, args.warmup)
    else:
        with running_server(os.path.abspath(args.index)) as url:
            results = run_all(url, args.clients, args.seconds, args.warmup)
    print(f"\n{args.clients} clients, {args.seconds:g} s per kind, {os.cpu_count()} CPUs\n")
    print("| queries | queries/s | p50 ms | p99 ms | errors |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for kind, r in results:
        print(f"| {kind} | {r['qps']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['errors']} |")
    return 0 if all(r["errors"] == 0 for _, r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
