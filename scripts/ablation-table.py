#!/usr/bin/env python3
"""The README's recipe-ablation table from the runs scripts/ablate.sh trained.

    python3 scripts/ablation-table.py jobs/ablations/ml100k [--store illmrec-data]
        [--arms a0-paper,a2-softmax,...] [--steps 39,78,117] [--models illmrec,illmrec:title]

One row per arm and model (every job file of the folder but base*.yaml in name order, or those of
--arms; each of --models, default illmrec, as scripts/ablate.sh's MODELS trained them):
validation Hit@5 and NDCG@10 after each validation step (all the arms' steps, or --steps; equal samples
seen, same users), the best validation NDCG@10 and its step, the largest and the mean L_RERI of the
first 40 steps (the conditioning the issue is about), and the test metrics of the BEST checkpoint when
`eval` has run. Arms that have not started are listed with dashes.
"""
import argparse
import json
import os
import re
import sys


def job_name(path):
    with open(path) as f:
        for line in f:
            m = re.match(r"name:\s*(\S+)", line)
            if m:
                return m.group(1)
    sys.exit(f"{path}: no `name:` line")


def first_comment(path):
    words = []
    with open(path) as f:
        for line in f:
            if not line.startswith("#"):
                break
            words.append(line.lstrip("#").strip())
    return " ".join(words)


def read_lines(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--store", default="illmrec-data", help="the storage root folder of the arms' job")
    ap.add_argument("--arms", help="comma-separated arm names (default: every arm of the folder)")
    ap.add_argument("--steps", help="comma-separated validation steps to show (default: all)")
    ap.add_argument("--models", default="illmrec", help="comma-separated models of each arm (default: illmrec)")
    args = ap.parse_args()
    if args.arms:
        arms = [f"{a}.yaml" for a in args.arms.split(",")]
    else:
        arms = sorted(f for f in os.listdir(args.folder) if f.endswith(".yaml") and not f.startswith("base"))
    steps = set()
    rows = []
    models = args.models.split(",")
    for arm, model in [(a, m) for a in arms for m in models]:
        path = os.path.join(args.folder, arm)
        # The run folder spells the model's `:` and `+` as `-` (train::run_id).
        run = f"{job_name(path)}-{re.sub('[:+]', '-', model)}"
        report = os.path.join(args.store, "runs", run, "report")
        valid = {}
        for v in read_lines(os.path.join(report, "valid-log.jsonl")):
            valid[v["step"]] = dict(v["metrics"])
        steps.update(valid)
        train = read_lines(os.path.join(report, "train-log.jsonl"))
        early = [t["reri"] for t in train if t["step"] <= 40]
        test = {}
        eval_path = os.path.join(report, "eval-test.json")
        if os.path.exists(eval_path):
            with open(eval_path) as f:
                for r in json.load(f):
                    test[r["protocol"]] = r["metrics"]
        label = arm[:-5] if len(models) == 1 else f"{arm[:-5]} {model}"
        rows.append((label, first_comment(path), valid, early, test, len(train)))
    steps = [int(s) for s in args.steps.split(",")] if args.steps else sorted(steps)
    head = ["arm", "steps run"] + [f"valid H@5 / N@10 @{s}" for s in steps]
    head += ["best valid N@10 (step)", "max / mean L_RERI (steps 1-40)", "test H@5 1+100", "test N@10 1+100", "test H@10 full"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for arm, _, valid, early, test, ran in rows:
        cells = [arm, str(ran)]
        for s in steps:
            m = valid.get(s)
            cells.append(f"{fmt(m['hit@5'])} / {fmt(m['ndcg@10'])}" if m else "-")
        best = max(valid.items(), key=lambda kv: kv[1]["ndcg@10"], default=None)
        cells.append(f"{fmt(best[1]['ndcg@10'])} ({best[0]})" if best else "-")
        cells.append(f"{max(early):.1f} / {sum(early) / len(early):.2f}" if early else "-")
        sampled, full = test.get("sampled:100", {}), test.get("full", {})
        cells += [fmt(sampled.get("hit@5")), fmt(sampled.get("ndcg@10")), fmt(full.get("hit@10"))]
        print("| " + " | ".join(cells) + " |")
    print()
    for arm, what, *_ in rows:
        print(f"- `{arm}`: {what}")


if __name__ == "__main__":
    main()
