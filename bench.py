"""
Benchmarks for losa.py on random Llama models, every figure measured side by side in one run:

  1. training step (forward + backward, all 7 projections of every block wrapped, r = 16, alpha = 32):
     (a) masked LoRA, dropout 0 (folded single product)   (b) masked LoRA, dropout 0.1
     (c) plain LoRA as peft computes it, dropout 0         (d) the released code's way, dropout 0.1:
         masked BA materialised, adapter branch under activation checkpointing
     (e) = (b) + losa.AdamW step: fine-tuning tokens/s
  2. pruning pass (block_grams + prune_blocks, wanda and sparsegpt) against a plain forward pass
  3. peak host memory of the pruning pass at two depths, in units of one activation buffer

    python bench.py                                   # 2-core CPU, < 5 min
    python bench.py --device cuda --dtype bfloat16 --width 4096 --layers 2
    python bench.py --grad-checkpoint                 # also step time (and CUDA peak) with checkpointing
"""
import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # losa's progress bars off (read when tqdm is imported)
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

import losa

hf_logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=FutureWarning)  # gradient_checkpointing_enable's rename notice

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--width", default="256,512", help="comma-separated hidden sizes (head_dim 64, MLP ~2.69 d)")
p.add_argument("--layers", type=int, default=4)
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
p.add_argument("--batch", type=int, default=4, help="training step: sequences per step")
p.add_argument("--seqlen", type=int, default=256, help="training step: tokens per sequence")
p.add_argument("--nsamples", type=int, default=16, help="pruning pass: calibration sequences")
p.add_argument("--calib-seqlen", type=int, default=256, help="pruning pass: tokens per calibration sequence")
p.add_argument("--repeats", type=int, default=3, help="timed round-robin rounds (after one warm-up round)")
p.add_argument("--prune-repeats", type=int, default=2)
p.add_argument("--peak-width", type=int, default=128, help="memory test: width (small, so buffers dominate noise)")
p.add_argument("--peak-depths", default="4,16")
p.add_argument("--peak-nsamples", type=int, default=32)
p.add_argument("--grad-checkpoint", action="store_true", help="also time (a), (b) with model gradient checkpointing")
p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
p.add_argument("--_peak", type=int, help=argparse.SUPPRESS)  # internal: run the memory test for this depth
args = p.parse_args()
dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
cuda = dev.type == "cuda"
if args.threads:
    torch.set_num_threads(args.threads)
R, ALPHA = 16, 32.0


def sync():
    if cuda:
        torch.cuda.synchronize()


def build(width, layers, seqlen, seed=0):
    """A random Llama, every projection 50 % sparse at random (so the masks are real)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=width, intermediate_size=round(width * 11008 / 4096 / 8) * 8, num_hidden_layers=layers,
                      num_attention_heads=width // 64, num_key_value_heads=width // 64, vocab_size=1024,
                      max_position_embeddings=max(seqlen, 256))
    model = LlamaForCausalLM(cfg).to(dev, dtype)
    with torch.no_grad():
        for block in losa.decoder_layers(model):
            for lin in losa.projections(block).values():
                lin.weight.mul_(torch.rand_like(lin.weight, dtype=torch.float32) >= 0.5)
    return model.requires_grad_(False)


# ------------------------------------------------------------------------------------------------
# the two reference adapters


class PlainLoRA(nn.Module):
    """peft's LoRA: base(x) + s B(A(dropout(x))), no mask."""

    def __init__(self, base, r=R, alpha=ALPHA, dropout=0.0):
        super().__init__()
        self.base, self.scaling, self.dropout = base, alpha / r, nn.Dropout(dropout)
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features, device=base.weight.device) / base.in_features**0.5)
        self.lora_B = nn.Parameter(torch.randn(base.out_features, r, device=base.weight.device) * 1e-3)

    def forward(self, x):
        A, B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return self.base(x) + self.scaling * F.linear(F.linear(self.dropout(x), A), B)


class ReleasedLoRA(PlainLoRA):
    """The released code's way: base(x) + s dropout(x) ((BA) * M)^T, BA materialised, branch checkpointed."""

    def branch(self, x, A, B, mask):
        return self.scaling * F.linear(self.dropout(x), (B @ A) * mask)

    def forward(self, x):
        W = self.base.weight
        A, B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return self.base(x) + checkpoint(self.branch, x, A, B, W != 0, use_reentrant=False)


def wrap(model, make):
    for block in losa.decoder_layers(model):
        for name, lin in list(losa.projections(block).items()):
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent), child, make(lin))
    return model


def masked(model, dropout, grad_ckpt=False):
    torch.manual_seed(1)
    for block in losa.add_lora(model, R, ALPHA, dropout):
        for m in block:
            nn.init.normal_(m.lora_B, std=1e-3)  # nonzero B, so every gradient is live
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def lora_params(model):
    return [p for n, p in model.named_parameters() if "lora_" in n]


def train_step(model, ids, opt=None):
    for q in lora_params(model):
        q.grad = None
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    if opt is not None:
        torch.nn.utils.clip_grad_norm_(opt.params, 0.3)
        opt.step()


def round_robin(fns, repeats, warmup=1):
    """name -> median seconds; the variants interleaved so machine noise hits them alike."""
    times = {k: [] for k in fns}
    for i in range(warmup + repeats):
        for k, fn in fns.items():
            sync()
            tic = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                times[k].append(time.perf_counter() - tic)
    return {k: statistics.median(v) for k, v in times.items()}


# ------------------------------------------------------------------------------------------------
# 3. memory of the pruning pass (child process, one depth)


def status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":"))


def peak_child(L):
    w, N, T = args.peak_width, args.peak_nsamples, args.calib_seqlen
    model = build(w, L, T).eval()
    ids = torch.randint(1024, (N, T), generator=torch.Generator().manual_seed(0)).to(dev)
    x0, kwargs = losa.capture_block_inputs(model, ids)
    buf = x0.numel() * x0.element_size()
    weights = sum(lin.weight.numel() * lin.weight.element_size() for b in losa.decoder_layers(model) for lin in losa.projections(b).values())
    if cuda:
        sync(), torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM <- VmRSS
        base = status_kb("VmRSS") * 1024
    dense = losa.dense_weights(model)  # host copy of the projections' original weights
    losa.block_grams(model, x0, kwargs)
    losa.prune_blocks(model, x0, kwargs, [0.6] * L, "wanda", None, dense)
    sync()
    peak = torch.cuda.max_memory_allocated() if cuda else status_kb("VmHWM") * 1024
    host_copy = 0 if cuda else weights  # on CUDA the copy lives on the host, outside the measured peak
    print(json.dumps(dict(L=L, extra_buffers=(peak - base - host_copy) / buf, buffer_mb=buf / 2**20, weights_mb=weights / 2**20)))


if args._peak:
    peak_child(args._peak)
    sys.exit(0)

# ------------------------------------------------------------------------------------------------
# main

t_start = time.time()
widths = [int(w) for w in args.width.split(",")]
print(f"device {args.device}{' (' + torch.cuda.get_device_name() + ')' if cuda else ''}, {args.dtype}, torch {torch.__version__}, "
      f"{torch.get_num_threads()} threads; {args.layers} blocks, r={R}, alpha={ALPHA:g}; step {args.batch}x{args.seqlen} tokens, "
      f"calibration {args.nsamples}x{args.calib_seqlen}; median of {args.repeats} (step) / {args.prune_repeats} (pruning) round-robin rounds")
rows = {}  # metric -> {width: text}
target = {}


def put(metric, w, text, tgt=""):
    rows.setdefault(metric, {})[w] = text
    target[metric] = tgt


ckpt_ok = []
for w in widths:
    base = build(w, args.layers, args.seqlen)
    ids = torch.randint(1024, (args.batch, args.seqlen), generator=torch.Generator().manual_seed(0)).to(dev)
    # 1. training step ---------------------------------------------------------------------------
    models = {
        "a": masked(copy.deepcopy(base), 0.0),
        "b": masked(copy.deepcopy(base), 0.1),
        "c": wrap(copy.deepcopy(base), lambda l: PlainLoRA(l, dropout=0.0)),
        "d": wrap(copy.deepcopy(base), lambda l: ReleasedLoRA(l, dropout=0.1)),
        "e": masked(copy.deepcopy(base), 0.1),
    }
    if args.grad_checkpoint:
        models["a+gc"] = masked(copy.deepcopy(base), 0.0, grad_ckpt=True)
        models["b+gc"] = masked(copy.deepcopy(base), 0.1, grad_ckpt=True)
        for k in ("a", "b"):  # checkpointing must not change the gradients (same seed, same dropout masks)
            for m in (models[k], models[k + "+gc"]):
                torch.manual_seed(2)
                m.train(), train_step(m, ids)
            diff = max((g1.grad - g2.grad).abs().max().item() / g1.grad.abs().max().item()
                       for g1, g2 in zip(lora_params(models[k]), lora_params(models[k + "+gc"])))
            ckpt_ok.append(f"w={w} ({k}): max relative gradient difference with/without checkpointing {diff:.1e}")
    opt = losa.AdamW(lora_params(models["e"]), 2e-4, weight_decay=0.001)
    for m in models.values():
        m.train()
    fns = {k: (lambda m=m: train_step(m, ids)) for k, m in models.items() if k != "e"}
    fns["e"] = lambda: train_step(models["e"], ids, opt)
    print(f"w={w}: training step ...", file=sys.stderr, flush=True)
    t = round_robin(fns, args.repeats)
    names = {"a": "(a) masked LoRA p=0, ms/step", "b": "(b) masked LoRA p=0.1, ms/step", "c": "(c) plain LoRA p=0, ms/step",
             "d": "(d) released way p=0.1, ms/step", "a+gc": "(a) + grad checkpointing, ms/step",
             "b+gc": "(b) + grad checkpointing, ms/step"}
    for k in [k for k in names if k in t]:
        put(names[k], w, f"{1e3 * t[k]:.0f}")
    put("ratio (a)/(c)", w, f"{t['a'] / t['c']:.2f}", "<= 1.3")
    put("ratio (b)/(c)", w, f"{t['b'] / t['c']:.2f}")
    put("ratio (d)/(b)  (ours faster if > 1)", w, f"{t['d'] / t['b']:.2f}", ">= 1.2")
    put("fine-tune tokens/s ((b) + AdamW)", w, f"{args.batch * args.seqlen / t['e']:.0f}")
    if cuda:  # peak memory of one step, each variant alone
        for k in [k for k in ("a", "b", "c", "d", "a+gc", "b+gc") if k in models]:
            torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()
            m0 = torch.cuda.memory_allocated()
            train_step(models[k], ids)
            torch.cuda.synchronize()
            put(f"{names[k].split(',')[0]}, step peak GiB", w, f"{(torch.cuda.max_memory_allocated() - m0) / 2**30:.2f}")
    del models, opt, fns
    # 2. pruning pass ----------------------------------------------------------------------------
    model = base.eval()
    calib = torch.randint(1024, (args.nsamples, args.calib_seqlen), generator=torch.Generator().manual_seed(1)).to(dev)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        x0, kwargs = losa.capture_block_inputs(model, calib)  # once per LoSA run: not timed
        dense = losa.dense_weights(model)  # once per LoSA run: not timed
    L = args.layers

    def pruning(pruner):
        def fn():
            losa.block_grams(model, x0, kwargs)
            losa.prune_blocks(model, x0, kwargs, [0.6] * L, pruner, None, dense)
            model.load_state_dict(saved)  # restore (a copy of a few weights: negligible)
        return fn

    def forward_seq():
        with torch.no_grad():
            for s in calib:
                model(s[None], use_cache=False)

    def forward_batched():
        with torch.no_grad():
            model(calib, use_cache=False)

    fns = dict(fwd=forward_seq, fwdb=forward_batched, grams=lambda: losa.block_grams(model, x0, kwargs),
               wanda=pruning("wanda"), sparsegpt=pruning("sparsegpt"))
    print(f"w={w}: pruning pass ...", file=sys.stderr, flush=True)
    t = round_robin(fns, args.prune_repeats)
    put("forward, one sequence at a time, ms", w, f"{1e3 * t['fwd']:.0f}")
    put("forward, batched, ms", w, f"{1e3 * t['fwdb']:.0f}")
    put("RMI grams alone, ms", w, f"{1e3 * t['grams']:.0f}")
    put("wanda pass (grams + prune_blocks), ms", w, f"{1e3 * t['wanda']:.0f}")
    put("sparsegpt pass (grams + prune_blocks), ms", w, f"{1e3 * t['sparsegpt']:.0f}")
    put("ratio wanda pass / forward", w, f"{t['wanda'] / t['fwd']:.2f}", "<= 3")
    put("ratio wanda pass / batched forward", w, f"{t['wanda'] / t['fwdb']:.2f}")
    put("ratio wanda prune_blocks alone / forward", w, f"{(t['wanda'] - t['grams']) / t['fwd']:.2f}")
    put("ratio sparsegpt pass / forward", w, f"{t['sparsegpt'] / t['fwd']:.2f}")
    del model, base, saved, x0, dense

# 3. memory of the pruning pass, one child process per depth -----------------------------------------
if not args.no_memory:
    for L in (int(d) for d in args.peak_depths.split(",")):
        cmd = [sys.executable, __file__, "--_peak", str(L), "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads),
               "--peak-width", str(args.peak_width), "--peak-nsamples", str(args.peak_nsamples), "--calib-seqlen", str(args.calib_seqlen)]
        print(f"memory, {L} blocks ...", file=sys.stderr, flush=True)
        out = subprocess.run(cmd, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"memory child failed:\n{out.stderr}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        put(f"pass memory beyond weights{' + host copy' if not cuda else ''}, L={L}, buffers", widths[0], f"{r['extra_buffers']:.2f}",
            f"const (w={args.peak_width}, {args.peak_nsamples}x{args.calib_seqlen}: 1 buffer = {r['buffer_mb']:.0f} MiB, weights {r['weights_mb']:.0f} MiB)")

# print the table ---------------------------------------------------------------------------------
mw = max(map(len, rows)) + 2
print(f"{'metric':<{mw}}" + "".join(f"{'w=' + str(w):>9}" for w in widths) + "   target")
for metric, vals in rows.items():
    print(f"{metric:<{mw}}" + "".join(f"{vals.get(w, ''):>9}" for w in widths) + f"   {target[metric]}")
for line in ckpt_ok:
    print(line)
print(f"total {time.time() - t_start:.0f} s")
