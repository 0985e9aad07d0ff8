# PyTorch reference for the illmrec training-step cost through the frozen SmolLM2-135M-Instruct.
# Measures, on CPU in float32 (or bfloat16 with --dtype bf16: weights, inputs and activations in bf16,
# transformers' RMSNorm and softmax upcasting inside as they do): inputs_embeds [B, T, 576] (leaf, requires_grad) -> all 30 decoder
# layers (causal, no padding mask) -> final RMSNorm; loss = (hidden * fixed_random).sum(); backward.
# All LLM parameters are frozen. Forward and backward are timed separately (wall + process CPU) after
# one warm-up step; prints one JSON line per (shape, attention implementation).
# Weights come from the Q4_1 GGUF (dequantized to f32 with the `gguf` package), so numbers match the
# weights the Rust side uses; q/k are un-permuted from llama.cpp's interleaved-RoPE layout to HF's.
#
# Install: python3 -m pip install -r scripts/reference/requirements-torch.txt
# Check:   python3 scripts/reference/torch_step.py --check      (greedy answer must contain "Paris")
# Time:    python3 scripts/reference/torch_step.py [GGUF] [--shapes 2x537,1x512,4x128] [--attn sdpa,eager]
#          [--threads 2] [--reps 1] [--device cuda] [--dtype f32|bf16]. With several configs each runs in its own subprocess.
#          On a GPU the clocks read after torch.cuda.synchronize() and the memory columns are the host's.
# Roof:    python3 scripts/reference/torch_step.py --peak [--threads 1] [--dtype f32|bf16]: GFLOP/s of one
#          product of the FFN's shape ([512, 576] x [576, 1536]) on CPU, the rate the frozen products
#          cannot beat, and the work of those products per token (forward + input gradient).
# Memory: rss_after_imports_mb = VmRSS after importing torch/transformers (before weights);
# rss_before_step_mb = VmRSS with the model loaded and inputs built; step_peak_rss_mb = VmHWM and
# peak_rss_mb = ru_maxrss at the end; both are reset through /proc/self/clear_refs just before the
# warm-up, so they cover the warm-up + timed steps, not weight loading/dequantization (~1.8 GB peak).
import argparse, ctypes, gc, json, os, resource, statistics, subprocess, sys, time

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from transformers import LlamaConfig, LlamaForCausalLM

DEFAULT_GGUF = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                            "../../.cache/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, VOCAB = 576, 30, 9, 3, 1536, 49152
HEAD_DIM = HIDDEN // HEADS
LAYER_MAP = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def unpermute(w, n_head):
    # inverse of llama.cpp convert_hf_to_gguf's permute (reshape(n_head, 2, hd/2, ...).swapaxes(1, 2))
    return w.reshape(n_head, HEAD_DIM // 2, 2, w.shape[-1]).swapaxes(1, 2).reshape(w.shape)


def load(path, attn="sdpa"):
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                      hidden_act="silu", max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                      attn_implementation=attn)
    model = LlamaForCausalLM(cfg)
    state = {}
    reader = GGUFReader(path)
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)  # [out, in]
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif parts[0] == "blk":
            if parts[2] == "attn_q":
                w = unpermute(w, HEADS)
            elif parts[2] == "attn_k":
                w = unpermute(w, KV_HEADS)
            name = f"model.layers.{parts[1]}.{LAYER_MAP[parts[2]]}.weight"
        else:
            raise KeyError(t.name)
        state[name] = torch.from_numpy(np.array(w))  # writable copy
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    inv = 1.0 / (100000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
    assert torch.allclose(model.model.rotary_emb.inv_freq, inv), "rope theta not applied"
    model.eval().requires_grad_(False)
    return model, reader


def tokenizer_from_gguf(reader):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    f = reader.fields
    toks = [bytes(f["tokenizer.ggml.tokens"].parts[i]).decode() for i in f["tokenizer.ggml.tokens"].data]
    merges = [tuple(bytes(f["tokenizer.ggml.merges"].parts[i]).decode().split(" ", 1))
              for i in f["tokenizer.ggml.merges"].data]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(toks)}, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([t for t in toks if t.startswith("<|") and t.endswith("|>")])
    return tok


def check(path):
    model, reader = load(path)
    tok = tokenizer_from_gguf(reader)
    prompt = "<|im_start|>user\nWhat is the capital of France? Answer with one word.<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([tok.encode(prompt).ids]); n = ids.shape[1]
    with torch.no_grad():
        for _ in range(8):  # greedy, no cache
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
            if nxt.item() == 2:
                break
    answer = tok.decode(ids[0, n:].tolist(), skip_special_tokens=True).strip()
    ok = "Paris" in answer
    print(json.dumps({"check": "capital_of_france", "answer": answer, "ok": ok}))
    return ok


def proc_status_mb(key):  # Linux: VmRSS (current) / VmHWM (peak since start or last reset)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) / 1024 for l in f if l.startswith(key + ":"))


def reset_peak_rss():  # Linux >= 4.0: resets VmHWM to the current RSS
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def time_step(path, b, t, attn, threads, reps, device, dtype):
    torch.set_num_threads(threads)
    rss_imports = proc_status_mb("VmRSS")
    model, reader = load(path, attn)
    del reader
    dt = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model.to(device=device, dtype=dt)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    llm = model.model
    assert llm.config._attn_implementation == attn, llm.config._attn_implementation
    assert not any(p.requires_grad for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (b, t), generator=g)
    x = llm.embed_tokens(ids.to(device)).detach().clone().requires_grad_(True)  # [b, t, 576] leaf
    target = torch.randn(b, t, HIDDEN, generator=g).to(device=device, dtype=dt)
    gc.collect()
    try:  # hand freed load-time heap back to the OS so VmRSS reflects the model, not the loader
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    rss_before = proc_status_mb("VmRSS")
    reset_ok = reset_peak_rss()
    fw, fc, bw, bc = [], [], [], []
    for i in range(reps + 1):
        x.grad = None
        sync()
        w0, c0 = time.perf_counter(), time.process_time()
        h = llm(inputs_embeds=x, use_cache=False).last_hidden_state
        loss = (h * target).float().sum()
        sync()
        w1, c1 = time.perf_counter(), time.process_time()
        loss.backward()
        sync()
        w2, c2 = time.perf_counter(), time.process_time()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        if i > 0:  # i == 0 is the warm-up
            fw.append(w1 - w0); fc.append(c1 - c0); bw.append(w2 - w1); bc.append(c2 - c1)
    med = statistics.median
    fwd, bwd = med(fw), med(bw)
    return {"impl": "torch", "torch": torch.__version__, "device": device, "dtype": dtype, "attn": attn, "threads": threads,
            "batch": b, "T": t,
            "reps": reps, "fwd_wall_s": round(fwd, 4), "bwd_wall_s": round(bwd, 4),
            "fwd_cpu_s": round(med(fc), 4), "bwd_cpu_s": round(med(bc), 4),
            "ms_per_token": round(1000 * (fwd + bwd) / (b * t), 4),
            "products_gflop_per_token": round(product_gflop_per_token() + attention_gflop_per_token(t), 4),
            "cpu_ms_per_token": round(1000 * (med(fc) + med(bc)) / (b * t), 4),
            "loss": round(loss.item(), 4), "rss_after_imports_mb": round(rss_imports, 1),
            "rss_before_step_mb": round(rss_before, 1),
            "step_peak_rss_mb": round(proc_status_mb("VmHWM"), 1) if reset_ok else None,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def product_gflop_per_token():
    """Multiply-adds of the decoder's frozen products per token, x2 for the input gradient's (no
    weight gradients: the LLM is frozen), in GFLOP."""
    per_layer = HIDDEN * (HIDDEN + 2 * KV_HEADS * HEAD_DIM + HIDDEN) + 3 * HIDDEN * FFN
    return 2 * 2 * LAYERS * per_layer / 1e9


def attention_gflop_per_token(t):
    """The attention's products per token of a causal sequence of t tokens: forward Q·Kᵀ and P·V,
    backward dP, dV, dQ and dK, each over the t(t+1)/2 (query, key) pairs of every head, in GFLOP."""
    return 2 * 6 * (t + 1) / 2 * HEAD_DIM * HEADS * LAYERS / 1e9


def peak(threads, dtype, reps=50):
    torch.set_num_threads(threads)
    dt = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, HIDDEN, generator=g).to(dt), torch.randn(HIDDEN, FFN, generator=g).to(dt)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    seconds = min(times)  # the roof: the fastest the product ran
    return {"peak": "torch matmul [512,576]x[576,1536]", "dtype": dtype, "threads": threads,
            "gflops": round(2 * 512 * HIDDEN * FFN / seconds / 1e9, 1),
            "product_gflop_per_token": round(product_gflop_per_token(), 4)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf", nargs="?", default=DEFAULT_GGUF)
    ap.add_argument("--check", action="store_true", help="only run the greedy 'Paris' correctness check")
    ap.add_argument("--shapes", default="2x537,1x512,4x128", help="comma-separated BATCHxT")
    ap.add_argument("--attn", default="sdpa", help="comma-separated: sdpa, eager")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=1, help="timed steps after the warm-up (median reported)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"], help="weights and activations")
    ap.add_argument("--peak", action="store_true", help="only time one product of the FFN's shape")
    a = ap.parse_args()
    if a.check:
        sys.exit(0 if check(a.gguf) else 1)
    if a.peak:
        print(json.dumps(peak(a.threads, a.dtype)), flush=True)
        return
    configs = [(s, m) for s in a.shapes.split(",") for m in a.attn.split(",")]
    if len(configs) > 1:  # one process per config so ru_maxrss is per config
        rc = 0
        for s, m in configs:
            rc |= subprocess.run([sys.executable, os.path.abspath(__file__), a.gguf, "--shapes", s, "--attn", m,
                                  "--threads", str(a.threads), "--reps", str(a.reps),
                                  "--device", a.device, "--dtype", a.dtype]).returncode
        sys.exit(rc)
    (s, m), = configs
    b, t = map(int, s.lower().split("x"))
    print(json.dumps(time_step(a.gguf, b, t, m, a.threads, a.reps, a.device, a.dtype)), flush=True)


if __name__ == "__main__":
    main()
