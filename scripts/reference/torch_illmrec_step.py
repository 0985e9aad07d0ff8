# PyTorch reference for a whole I-LLMRec training step (issue 13): the same prompts, the same trainable
# set, the same losses and the same optimizer as illmrec's, on the frozen SmolLM2-135M-Instruct (weights
# from the GGUF, as scripts/reference/torch_step.py loads them; transformers' LlamaModel, SDPA).
#
# Input: the folder `illmrec bench step --export DIR` writes (src/bench/reference.rs): the trainable set
# as initialised, the item features, the settings, and every step's packed prompts, targets, negatives,
# learning rates and the losses illmrec logged.
#
#   python3 scripts/reference/torch_illmrec_step.py DIR --check        # recompute illmrec's losses
#   python3 scripts/reference/torch_illmrec_step.py DIR --time [--threads 2] [--ranks 1] [--warmup 1]
#                                                        [--dtype f32|bf16]
#
# --check replays the steps from the initial parameters and prints, per step, illmrec's logged loss,
# L_RERI, L_RISA and gradient norm next to PyTorch's, with the largest relative difference, and fails
# above 1e-3 when illmrec ran f32 products (measured: 1e-6 at step 1, 6e-4 by step 4). --time runs
# the same steps and prints one JSON line with seconds per step and samples per second (after
# --warmup untimed steps). With --ranks 2 each of two processes (torch.distributed, gloo on 127.0.0.1)
# takes half of every batch's rows (the same token-balanced split as illmrec's) and the gradients are
# all-reduced, as illmrec does under mpirun.
#
# What PyTorch is given that illmrec computes inside its timed step: the prompts come tokenized (illmrec
# builds and tokenizes them in the step: `prompts_seconds` in its bench output). The constant prompt
# prefix is computed once, with no gradient, and its keys and values are reused (as illmrec does), and
# rows of different lengths are right-padded to the longest, PyTorch's usual batching.
# --dtype bf16 is PyTorch's side of illmrec's bf16 products: the frozen LLM (its weights, the prompt's
# activations, the prefix keys and values and the tied LM head of L_RISA) in bfloat16, the trainable set,
# the heads and the losses in f32.
import argparse, inspect, json, os, sys, time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import DynamicCache, LlamaModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_step import DEFAULT_GGUF, load as load_llm  # noqa: E402


# transformers 5.24 renamed LlamaModel.forward's `past_key_values` to `cache`.
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def two_layer(p, name, x, act, eps):
    h = x @ p[f"{name}.w1"] + p[f"{name}.b1"]
    h = F.layer_norm(h, (h.shape[-1],), p[f"{name}.ln_w"], p[f"{name}.ln_b"], eps)
    h = F.gelu(h) if act == "gelu" else F.relu(h)
    return h @ p[f"{name}.w2"] + p[f"{name}.b2"]


def unit_rows(x):
    return x / (x.square().sum(-1, keepdim=True) + 1e-12).sqrt()


def bce(logits, target, weight, weight_sum):
    per = logits.relu() - logits * target + torch.log1p(torch.exp(-logits.abs()))
    return (per * weight).sum() / max(weight_sum, 1.0)


def rows_of(b):
    """A packed batch (EncodedBatch) as one dict per row, positions relative to the row."""
    rows, start = [], 0
    for n in b["lens"]:
        end = start + n
        inside = lambda p: start <= p < end
        rows.append({
            "ids": b["ids"][start:end],
            "slots": [(p - start, i) for p, i in zip(b["slot_pos"], b["slot_items"]) if inside(p)],
            "rec": [p - start for p in b["rec_pos"] if inside(p)],
            "labels": [(p - start, t) for p, t in zip(b["label_pos"], b["label_ids"]) if inside(p)],
        })
        start = end
    return rows


def balanced_share(costs, world, rank):
    """illmrec's split of a batch over ranks (src/distributed/plan.rs): equal sizes, even token counts."""
    room, totals, mine = len(costs) // world, [[0, 0] for _ in range(world)], []
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        share = min((r for r in range(world) if totals[r][1] < room), key=lambda r: (totals[r][0], r))
        totals[share][0] += costs[i]
        totals[share][1] += 1
        if share == rank:
            mine.append(i)
    return sorted(mine)


class Step:
    def __init__(self, folder, gguf, dtype="f32"):
        self.cfg = json.load(open(os.path.join(folder, "config.json")))
        m = self.cfg["model"]
        assert m.get("backbone", "llm") == "llm", "the reference covers the LLM backbone"
        assert not m["train_input_embeddings"], "the reference keeps the input embeddings frozen"
        tensors = load_file(os.path.join(folder, "tensors.safetensors"))
        self.p = {n: torch.nn.Parameter(tensors[n].clone()) for n in self.cfg["vars"]}
        self.feats = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("feature.")}
        self.present = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("present.")}
        self.steps = []
        while os.path.exists(os.path.join(folder, f"step-{len(self.steps)}.json")):
            self.steps.append(json.load(open(os.path.join(folder, f"step-{len(self.steps)}.json"))))
        self.llm, _ = load_llm(gguf, "sdpa")
        self.dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
        self.llm.to(self.dtype)
        self.embed = self.llm.model.embed_tokens.weight
        self.prefixes = {}
        t = self.cfg["train"]
        heads = [n for n in self.cfg["vars"] if n.startswith(("user_head.", "item_head."))]
        rest = [n for n in self.cfg["vars"] if n not in heads]
        self.opt = torch.optim.AdamW(
            [{"params": [self.p[n] for n in rest]}, {"params": [self.p[n] for n in heads]}],
            lr=t["lr"], betas=tuple(t["betas"]), eps=1e-8, weight_decay=t["weight_decay"])

    def item_tokens(self, items):
        m = self.cfg["model"]
        idx = torch.tensor(items)
        out = two_layer(self.p, "adaptor", self.feats[m["token_feature"]][idx], "gelu", 1e-8)
        mask = self.present[m["token_feature"]][idx]
        if bool((mask == 0).any()):
            alt = two_layer(self.p, "fallback_adaptor", self.feats[m["fallback_feature"]][idx], "gelu", 1e-8)
            mask = mask[:, None]
            out = out * mask + alt * (1 - mask)
        return out

    def prefix_kv(self, prefix):
        """The keys and values of a constant prompt prefix, computed once (no gradient reaches them)."""
        key = tuple(prefix)
        if key not in self.prefixes:
            with torch.no_grad():
                out = self.llm.model(input_ids=torch.tensor([prefix]), use_cache=True)
            cache = getattr(out, "cache", None) or out.past_key_values
            self.prefixes[key] = [(layer.keys, layer.values) for layer in cache.layers]
        return self.prefixes[key]

    def hidden(self, rows, wanted, prefix):
        """Final hidden states at `wanted` (row, position) pairs after the shared `prefix`."""
        h = self.embed.shape[1]
        xs = []
        for r in rows:
            x = self.embed[torch.tensor(r["ids"])]
            pos, vals = [], []
            if r["slots"]:
                pos += [p for p, _ in r["slots"]]
                vals.append(self.item_tokens([i for _, i in r["slots"]]))
            if r["rec"]:
                pos += r["rec"]
                vals.append(self.p["rec"].expand(len(r["rec"]), h))
            if pos:
                x = x.index_copy(0, torch.tensor(pos), torch.cat(vals).to(x.dtype))
            xs.append(x)
        x = torch.nn.utils.rnn.pad_sequence(xs, batch_first=True)
        b, t = x.shape[:2]
        n = len(prefix)
        mask = torch.zeros(b, n + t, dtype=torch.long)
        mask[:, :n] = 1
        for i, r in enumerate(rows):
            mask[i, n:n + len(r["ids"])] = 1
        cache = None
        if prefix:
            cache = DynamicCache(ddp_cache_data=[(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1))
                                                 for k, v in self.prefix_kv(prefix)])
        positions = (n + torch.arange(t)).expand(b, t)
        out = self.llm.model(inputs_embeds=x, attention_mask=mask, position_ids=positions,
                             use_cache=cache is not None, **{CACHE_ARG: cache}).last_hidden_state
        rr = torch.tensor([r for r, _ in wanted])
        pp = torch.tensor([p for _, p in wanted])
        return out[rr, pp].float()

    def reri(self, rows, prefix, targets, negatives):
        m, t = self.cfg["model"], self.cfg["train"]
        h = self.hidden(rows, [(i, r["rec"][0]) for i, r in enumerate(rows)], prefix)
        n_rows, per_user = len(rows), len(negatives[0])
        total = 0.0
        for kind in m["retrieval"]:
            f, pres = self.feats[kind], self.present[kind]
            u = two_layer(self.p, f"user_head.{kind}", h, "relu", 1e-5)
            side = lambda items, n: (
                two_layer(self.p, f"item_head.{kind}", f[items], "relu", 1e-5).reshape(n_rows, n, -1),
                pres[items].reshape(n_rows, n))
            pos, pos_w = side(torch.tensor(targets), 1)
            neg, neg_w = side(torch.tensor(negatives).reshape(-1), per_user)
            if m["similarity"] == "cosine":
                u, pos, neg = unit_rows(u) / m["temperature"], unit_rows(pos), unit_rows(neg)
            pos_l = (pos * u[:, None, :]).sum(-1)
            neg_l = (neg * u[:, None, :]).sum(-1)
            if t["reri_loss"] == "bce":
                term = bce(pos_l, 1.0, pos_w, n_rows) + per_user * bce(neg_l, 0.0, neg_w, n_rows * per_user)
            else:
                logits = torch.cat([pos_l, neg_l + (neg_w * 1e9 - 1e9)], 1)
                term = -(torch.log_softmax(logits, -1)[:, :1] * pos_w).sum() / n_rows
            total = total + term
        return total / len(m["retrieval"])

    def risa(self, rows, prefix):
        wanted, ids, weights = [], [], []
        for i, r in enumerate(rows):
            for p, tok in r["labels"]:
                wanted.append((i, p))
                ids.append(tok)
                weights.append(1.0 / (len(rows) * len(r["labels"])))
        at = self.hidden(rows, wanted, prefix)
        log_p = torch.log_softmax((at.to(self.dtype) @ self.embed.T).float(), -1)
        picked = log_p.gather(1, torch.tensor(ids)[:, None])[:, 0]
        return -(picked * torch.tensor(weights)).sum()

    def run(self, s, rank=0, world=1):
        """One optimizer step on this rank's share of step `s`'s rows; the losses, averaged over ranks."""
        t = self.cfg["train"]
        retrieval, alignment = rows_of(s["retrieval"]), s["alignment"] and rows_of(s["alignment"])
        costs = [len(r["ids"]) + (len(alignment[i]["ids"]) if alignment else 0) for i, r in enumerate(retrieval)]
        mine = balanced_share(costs, world, rank)
        reri = self.reri([retrieval[i] for i in mine], s["retrieval"]["prefix"], [s["targets"][i] for i in mine],
                         [s["negatives"][i] for i in mine])
        risa = self.risa([alignment[i] for i in mine], s["alignment"]["prefix"]) if alignment else torch.zeros(())
        loss = reri + t["risa_weight"] * risa
        self.opt.zero_grad(set_to_none=False)
        loss.backward()
        params = [self.p[n] for n in self.cfg["vars"]]
        flat = torch.cat([q.grad.reshape(-1) for q in params] + [torch.stack([loss, reri, risa]).detach()])
        if world > 1:
            torch.distributed.all_reduce(flat)
            flat /= world
        off = 0
        for q in params:
            q.grad.copy_(flat[off:off + q.numel()].view_as(q))
            off += q.numel()
        norm = flat[:off].double().square().sum().sqrt().item()
        if t["grad_clip"] > 0 and norm > t["grad_clip"]:
            scale = t["grad_clip"] / (norm + 1e-6)
            for q in params:
                q.grad.mul_(scale)
        self.opt.param_groups[0]["lr"], self.opt.param_groups[1]["lr"] = s["lr"], s["head_lr"]
        self.opt.step()
        loss, reri, risa = flat[off:].tolist()
        return {"loss": loss, "reri": reri, "risa": risa, "grad_norm": norm}


def check(step):
    worst = 0.0
    print("| step | loss illmrec / PyTorch | L_RERI | L_RISA | grad norm | max rel. diff |")
    print("|---:|---|---|---|---|---:|")
    for i, s in enumerate(step.steps):
        got, want = step.run(s), s["logged"]
        keys = ["loss", "reri", "risa", "grad_norm"]
        rel = max(abs(got[k] - want[k]) / max(abs(want[k]), 1e-12) for k in keys)
        worst = max(worst, rel)
        cells = " | ".join(f"{want[k]:.6f} / {got[k]:.6f}" for k in keys)
        print(f"| {i + 1} | {cells} | {rel:.2e} |")
    print(json.dumps({"check": "illmrec vs PyTorch", "llm_matmul": step.cfg["llm_matmul"],
                      "steps": len(step.steps), "max_rel_diff": worst}))
    # f32 products on both sides: the first step agrees to float rounding (~1e-6); Adam's first updates
    # (lr * sign(g) for tiny g) let later steps drift apart a little, ~1e-4 by step 4.
    if not step.cfg["llm_matmul"].startswith("bf16") and worst > 1e-3:
        sys.exit(f"illmrec and PyTorch computed different steps (largest relative difference {worst:.2e})")


def timed(args, rank=0, world=1):
    torch.set_num_threads(args.threads)
    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}",
                                             rank=rank, world_size=world)
    step = Step(args.folder, args.gguf, args.dtype)
    times = []
    for i, s in enumerate(step.steps):
        start = time.perf_counter()
        step.run(s, rank, world)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    if rank == 0:
        per_step = sum(times) / max(len(times), 1)
        batch = len(step.steps[0]["targets"])
        import resource
        print(json.dumps({"side": f"torch-{args.dtype}", "ranks": world, "threads": args.threads, "batch_size": batch,
                          "steps": len(times), "seconds_per_step": per_step,
                          "samples_per_second": batch / per_step,
                          "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          "torch": torch.__version__}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--gguf", default=DEFAULT_GGUF)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--time", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--port", type=int, default=29517)
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"], help="the frozen LLM's type")
    args = ap.parse_args()
    if args.check:
        torch.set_num_threads(args.threads)
        check(Step(args.folder, args.gguf, args.dtype))
    if args.time:
        if args.ranks > 1:
            torch.multiprocessing.start_processes(_rank_main, args=(args,), nprocs=args.ranks, start_method="fork")
        else:
            timed(args)


def _rank_main(rank, args):
    timed(args, rank, args.ranks)


if __name__ == "__main__":
    main()
