"""What the input fingerprint checks cost on an object store: S3 requests of one run, with and without them.

    python benchmarks/s3_requests.py [--shape 16,48,48] [--chunk 8,16,16]

Starts a local S3 server (moto) behind a counting proxy (tests/s3proxy.py, no faults), writes a
synthetic volume and its exact flows there, and runs `zseg run` on S3 twice: as it is, and with
the per-task checks of the input and flow chunks switched off (``RunContext.reads`` returning
None; plan still records the fingerprint). Prints a Markdown table of the requests by method.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (the proxy) from a checkout

import s3fs  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402

from tests.s3proxy import FlakyProxy  # noqa: E402
from tests.volumes import write_volume  # noqa: E402
from zseg.cli import main  # noqa: E402
from zseg.engine.synth import flows_from_labels, synth_cells  # noqa: E402
from zseg.workspace import context as C  # noqa: E402


def run_counted(target: str, image: str, flows: str, out: str, chunk: str) -> dict:
    proxy = FlakyProxy(target, episodes=(), drop=10**12)  # counts, never fails
    os.environ["AWS_ENDPOINT_URL"] = proxy.url
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        if main(["run", image, out, "--flows", flows, "--diameter", "8", "--chunk-shape", chunk]) != 0:
            raise SystemExit("the run failed")
    finally:
        proxy.close()
        os.environ["AWS_ENDPOINT_URL"] = target
        s3fs.S3FileSystem.clear_instance_cache()
    return dict(proxy.methods)


def main_() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="16,48,48")
    ap.add_argument("--chunk", default="8,16,16")
    a = ap.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    target = f"http://{host}:{port}"
    os.environ.update(AWS_ENDPOINT_URL=target, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": target}).mkdir("zseg-bench")
    shape = tuple(int(v) for v in a.shape.split(","))
    image, labels = synth_cells(shape, diameter=8.0, seed=7)
    data = write_volume("s3://zseg-bench/data", image, flows_from_labels(labels), chunks=tuple(
        int(v) for v in a.chunk.split(",")))
    checked = run_counted(target, data["image"], data["flows"], "s3://zseg-bench/checked", a.chunk)
    C.RunContext.reads = lambda self, name: None  # the per-task checks off
    unchecked = run_counted(target, data["image"], data["flows"], "s3://zseg-bench/unchecked", a.chunk)
    server.stop()
    print(f"`zseg run` on S3 (moto), volume {a.shape}, chunks {a.chunk}: requests by method\n")
    print("| requests | with the per-task checks | without | added |")
    print("|---|---|---|---|")
    for method in ("GET", "HEAD", "PUT", "POST", "DELETE"):
        w = sum(v for (m, _), v in checked.items() if m == method)
        wo = sum(v for (m, _), v in unchecked.items() if m == method)
        if w or wo:
            print(f"| {method} | {w} | {wo} | {w - wo:+d} |")
    tw, two = sum(checked.values()), sum(unchecked.values())
    print(f"| all | {tw} | {two} | {tw - two:+d} ({100 * (tw - two) / two:.1f} %) |")


if __name__ == "__main__":
    main_()
