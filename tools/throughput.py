#!/usr/bin/env python3
"""Images per minute under concurrent load, for several --max-batch-images values.

Starts `sdserve serve` once per batch limit on a free loopback port, submits N
jobs at once through POST /generate (all compatible: same size, steps,
scheduler), waits until every one is completed, and prints a table. Standard
library only.

    python3 tools/throughput.py --binary target/release/sdserve \
        --model tests/fixtures/tiny-sd1 --jobs 16 --steps 20 --resolution 96x96 --batches 1 2 4 8
"""
import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def call(method, url, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def run(args, batch):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [args.binary, "serve", "--model", args.model, "--host", "127.0.0.1", "--port", str(port),
           "--storage", f"/tmp/sdserve-throughput-{port}", "--queue-capacity", str(args.jobs + 1),
           "--max-batch-images", str(batch)] + args.extra
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while True:
            try:
                urllib.request.urlopen(base + "/ping", timeout=2)
                break
            except Exception:
                if time.time() > deadline or proc.poll() is not None:
                    sys.exit(f"server with batch {batch} never became ready")
                time.sleep(0.2)
        start = time.time()
        ids = [call("POST", base + "/generate",
                    {"text": f"prompt {i}", "resolution": args.resolution, "steps": args.steps,
                     "scheduler": args.scheduler, "seed": i})["image_id"] for i in range(args.jobs)]
        pending = set(ids)
        while pending:
            for i in list(pending):
                status = call("GET", f"{base}/image/{i}")["status"]
                if status == "completed":
                    pending.discard(i)
                elif status in ("failed", "cancelled"):
                    sys.exit(f"job {i} {status}")
            time.sleep(0.05)
        return time.time() - start
    finally:
        proc.terminate()
        proc.wait(30)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", default="target/release/sdserve")
    p.add_argument("--model", default="tests/fixtures/tiny-sd1")
    p.add_argument("--jobs", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--resolution", default="96x96")
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more sdserve serve flags")
    args = p.parse_args()
    print(f"{args.jobs} concurrent jobs, {args.resolution}, {args.steps} steps, {args.scheduler}, model {args.model}")
    print(f"{'max batch':>10} {'seconds':>9} {'images/min':>11} {'vs batch 1':>11}")
    base = None
    for b in args.batches:
        secs = run(args, b)
        ipm = args.jobs / secs * 60
        base = base or ipm
        print(f"{b:>10} {secs:>9.2f} {ipm:>11.1f} {ipm / base:>10.2f}x", flush=True)


if __name__ == "__main__":
    main()
