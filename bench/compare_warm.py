"""Compares a bench_sleep.py result's warm ratios with the earlier results of the same GPU model
in bench/results: ``python3 bench/compare_warm.py NEW.json [--device NAME]``.

For every (scenario, entry, warm_sleep / warm_wake) of NEW (policy keep), the baseline is the
newest earlier record of the same key from a file of the same GPU model (``h200-*`` for an
H200, ``h100*`` for an H100; newest = highest issue number in the file name, files without
one counting as issue 10). Prints one line per key and a summary; exits 1 when any ratio falls
more than ``--slack`` (default 0.01, the spread of repeated runs) below its baseline.
"""

import argparse
import glob
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PHASES = ("warm_sleep", "warm_wake")


def issue_of(path):
    m = re.search(r"issue(\d+)", os.path.basename(path))
    return int(m.group(1)) if m else 10


def load(path):
    with open(path) as f:
        data = json.load(f)
    return data if isinstance(data, list) else []


def key(r):
    return (r.get("scenario"), r.get("entry", "module"), r.get("phase"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("new")
    ap.add_argument("--device", default=None, help="GPU name (default: the NEW file's .meta.json or torch)")
    ap.add_argument("--slack", type=float, default=0.01)
    args = ap.parse_args()
    device = args.device
    meta = os.path.splitext(args.new)[0] + ".meta.json"
    if device is None and os.path.exists(meta):
        device = json.load(open(meta)).get("device")
    if device is None:
        import torch

        device = torch.cuda.get_device_name()
    prefix = "h200" if "H200" in device else "h100"
    files = [p for p in glob.glob(os.path.join(HERE, "results", f"{prefix}*.json"))
             if not p.endswith(".meta.json") and os.path.abspath(p) != os.path.abspath(args.new)]
    files.sort(key=lambda p: (issue_of(p), p))
    base = {}
    for path in files:
        for r in load(path):
            if r.get("policy") == "keep" and r.get("phase") in PHASES and r.get("ratio") is not None:
                base[key(r)] = (r["ratio"], os.path.basename(path))
    worse = 0
    print(f"warm ratios vs the newest earlier {prefix} result per entry (device: {device})")
    for r in load(args.new):
        if r.get("policy") != "keep" or r.get("phase") not in PHASES or r.get("ratio") is None:
            continue
        b = base.get(key(r))
        if b is None:
            print(f"  {key(r)}: {r['ratio']:.3f} (no earlier result)")
            continue
        below = r["ratio"] < b[0] - args.slack
        worse += below
        verdict = "BELOW" if below else "ok"
        print(f"  {key(r)}: {r['ratio']:.3f} vs {b[0]:.3f} in {b[1]}: {verdict}")
    print(f"{worse} warm ratio(s) more than {args.slack} below their baseline")
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main())
