"""
Benchmarks for losa.py on random Llama models, every figure measured side by side in one run:

  1. training step (forward + backward, all 7 projections of every block wrapped, r = 16, alpha = 32):
     (a) masked LoRA, dropout 0 (folded single product)   (b) masked LoRA, dropout 0.1
     (c) plain LoRA as peft computes it, dropout 0         (d) the released code's way, dropout 0.1:
         masked BA materialised, adapter branch under activation checkpointing
     (e) = (b) + losa.AdamW step: fine-tuning tokens/s
  2. pruning pass (block_grams + prune_blocks, wanda and sparsegpt) against a plain forward pass
  3. peak host memory of the pruning pass at two depths, in units of one activation buffer
  4. with --inference [MODEL], instead: the seven projections of every block executed dense or sparse
     (CPU: CSR with 32-bit indices, by F.linear and by torch.sparse.mm; CUDA: 2:4 semi-structured for 2:4
     weights, CSR otherwise), the rest of the model unchanged: MODEL's greedy decode (KV cache) and prefill;
     mat-vec at LLaMA-2-7B shapes, 50-80 % unstructured and 2:4, with the crossover; memory of each format
  5. with --processes N, instead: losa.finetune and the pruning pass under torchrun, N processes against one
     (gloo on CPU, NCCL on GPUs; one torch thread each on CPU), launched in turn, whole models and sharded
     (FSDP2, as losa.py --fsdp): fine-tuning tokens/s, the Wanda and SparseGPT pruning passes and --compare's
     perplexity scoring, each with its speed-up against the ideal N, and the activation buffer each process holds
  6. with --gpu-check, instead: PASS/FAIL lines into results/gpu/<GPU name>.txt, exit 1 on a FAIL; sized for
     one H100 in < 8 min (not yet run on one): masked LoRA against float64, Wanda's and SparseGPT's masks against
     the CPU's, a bf16 merge, losa.py end to end in bf16; 1 and 2 at LLaMA-2-7B width (also peft's LoRA) and a 2:4
     semi-structured projection; peak memory of pruning and fine-tuning scaled to 32 blocks beside the README's;
     torchrun (NCCL) against one process. --device cpu: the same parts at tiny sizes, gloo (the dry run)

    python bench.py                                   # 2-core CPU, < 5 min
    python bench.py --device cuda --dtype bfloat16 --width 4096 --layers 2
    python bench.py --grad-checkpoint                 # also step time (and CUDA peak) with checkpointing
    python bench.py --inference out/smollm2-135m-wanda-0.7   # a LoSA output; no MODEL: sweep and memory only
    python bench.py --inference MODEL --device cuda --dtype bfloat16
    python bench.py --processes 2                     # 2-core CPU: 1 vs 2 processes, one thread each
    python bench.py --gpu-check                       # one GPU, < 8 min, with nothing but torch, transformers, peft
    python bench.py --gpu-check --device cpu          # its dry run: results/gpu/cpu-dry-run.txt, < 1 min
"""
import argparse
import copy
import gc
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time

if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")  # losa's progress bars off (read when tqdm is imported)
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

import losa


def parse_args(argv=None):
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
    p.add_argument("--prune-repeats", type=int, default=2, help="pruning passes timed (--processes: the best of "
                   "them in each launch)")
    p.add_argument("--launches", type=int, default=3, help="--processes: launches of each configuration")
    p.add_argument("--peak-width", type=int, default=128, help="memory test: width (small, so buffers dominate noise)")
    p.add_argument("--peak-depths", default="4,16")
    p.add_argument("--peak-nsamples", type=int, default=32)
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="also time (a), (b) with model gradient checkpointing")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--inference", nargs="?", const="", metavar="MODEL",
                   help="instead: dense vs sparse projections at inference (decode and prefill of MODEL, a LoSA "
                        "output folder or any model eval.py loads; 7B-shape mat-vec sweep; memory of each format)")
    p.add_argument("--processes", type=int, metavar="N", help="instead: fine-tuning and the pruning pass under "
                   "torchrun, N processes against one (--width: its first value; --launches of each)")
    p.add_argument("--gpu-check", action="store_true", help="instead: correctness on the device against "
                   "independent computations, speed at LLaMA-2-7B width, memory scaled to 32 blocks, torchrun with 1 "
                   "process; PASS/FAIL lines into --gpu-out/<GPU name>.txt, exit 1 on a FAIL (--device cpu: the same "
                   "at tiny sizes, into cpu-dry-run.txt)")
    p.add_argument("--checkpoint", nargs="?", const="", metavar="MODEL", help="instead: the bytes and seconds of "
                   "losa.py's checkpoints in a run on MODEL (default SmolLM2-135M), against its steps' seconds")
    p.add_argument("--gpu-out", default=os.path.join("results", "gpu"), help="--gpu-check: folder of its file")
    p.add_argument("--accum", type=int, default=4, help="--processes: micro-batches (of --batch) per update")
    p.add_argument("--_peak", type=int, help=argparse.SUPPRESS)  # internal: run the memory test for this depth
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)  # internal: one torchrun process
    p.add_argument("--_fsdp", action="store_true", help=argparse.SUPPRESS)  # internal: the worker shards (FSDP2)
    return p.parse_args(argv)


args, dev, dtype, cuda = None, torch.device("cpu"), torch.float32, False  # set by main()
R, ALPHA = 16, 32.0


def sync():
    if cuda:
        torch.cuda.synchronize()


def build(width, layers, seqlen, seed=0, vocab=1024, head_dim=64):
    """A random Llama, every projection 50 % sparse at random (so the masks are real); built on the device."""
    torch.manual_seed(seed)
    heads = width // head_dim
    cfg = LlamaConfig(hidden_size=width, intermediate_size=round(width * 11008 / 4096 / 8) * 8,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      vocab_size=vocab, max_position_embeddings=max(seqlen, 256))
    with torch.device(dev):  # on CUDA: no host copy of a 7B-wide model first
        model = LlamaForCausalLM(cfg).to(dtype)
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
# 1., 2. the training step and the pruning pass at one width

STEP_NAMES = {"a": "(a) masked LoRA p=0, ms/step", "b": "(b) masked LoRA p=0.1, ms/step",
              "c": "(c) plain LoRA p=0, ms/step", "p": "(c') peft's own LoRA p=0, ms/step",
              "d": "(d) released way p=0.1, ms/step",
              "a+gc": "(a) + grad checkpointing, ms/step", "b+gc": "(b) + grad checkpointing, ms/step"}


def peft_lora(model):
    """(c') peft's LoRA on the seven projections, r and alpha as ours, dropout 0, B nonzero; None without peft."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None
    names = sorted({n.rpartition(".")[2] for n in losa.projections(losa.decoder_layers(model)[0])})
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=names))
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p, std=1e-3)
    return model


def step_models(base, grad_ckpt=False, with_peft=False):
    """The training-step variants (a)-(e) on copies of `base`; (c') where asked and peft imports."""
    models = {
        "a": masked(copy.deepcopy(base), 0.0),
        "b": masked(copy.deepcopy(base), 0.1),
        "c": wrap(copy.deepcopy(base), lambda l: PlainLoRA(l, dropout=0.0)),
        "d": wrap(copy.deepcopy(base), lambda l: ReleasedLoRA(l, dropout=0.1)),
        "e": masked(copy.deepcopy(base), 0.1),
    }
    if with_peft and (p := peft_lora(copy.deepcopy(base))) is not None:
        models["p"] = p
    if grad_ckpt:
        models["a+gc"] = masked(copy.deepcopy(base), 0.0, grad_ckpt=True)
        models["b+gc"] = masked(copy.deepcopy(base), 0.1, grad_ckpt=True)
    return models


def checkpoint_differences(models, ids):
    """k -> max relative gradient difference of (k) with and without checkpointing (same seed, same dropout)."""
    diffs = {}
    for k in [k for k in ("a", "b") if k + "+gc" in models]:
        for m in (models[k], models[k + "+gc"]):
            torch.manual_seed(2)
            m.train(), train_step(m, ids)
        diffs[k] = max((g1.grad - g2.grad).abs().max().item() / g1.grad.abs().max().item()
                       for g1, g2 in zip(lora_params(models[k]), lora_params(models[k + "+gc"])))
    return diffs


def step_times(models, ids, repeats):
    """Seconds per training step of every variant, round robin; (e) includes the losa.AdamW step."""
    opt = losa.AdamW(lora_params(models["e"]), 2e-4, weight_decay=0.001)
    for m in models.values():
        m.train()
    fns = {k: (lambda m=m: train_step(m, ids)) for k, m in models.items() if k != "e"}
    fns["e"] = lambda: train_step(models["e"], ids, opt)
    return round_robin(fns, repeats)


def step_peaks(models, ids):
    """CUDA: k -> peak GiB of one step of (k), each variant alone."""
    peaks = {}
    for k in [k for k in STEP_NAMES if k in models]:
        torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()
        m0 = torch.cuda.memory_allocated()
        train_step(models[k], ids)
        torch.cuda.synchronize()
        peaks[k] = (torch.cuda.max_memory_allocated() - m0) / 2**30
    return peaks


def step_rows(t, tokens):
    """(metric, value, target) lines of the training-step times."""
    rows = [(STEP_NAMES[k], f"{1e3 * t[k]:.0f}", "") for k in STEP_NAMES if k in t]
    rows += [("ratio (a)/(c)", f"{t['a'] / t['c']:.2f}", "<= 1.3"), ("ratio (b)/(c)", f"{t['b'] / t['c']:.2f}", "")]
    if "p" in t:
        rows += [("ratio (a)/(c')", f"{t['a'] / t['p']:.2f}", ""), ("ratio (c)/(c')", f"{t['c'] / t['p']:.2f}", "")]
    rows += [("ratio (d)/(b)  (ours faster if > 1)", f"{t['d'] / t['b']:.2f}", ">= 1.2"),
             ("fine-tune tokens/s ((b) + AdamW)", f"{tokens / t['e']:.0f}", "")]
    return rows


def pruning_times(model, calib, repeats):
    """Seconds of a forward pass (one sequence at a time, batched), the RMI grams, and the Wanda and SparseGPT
    passes (grams + prune_blocks at 0.6) on `model`, whose weights are restored after each pass."""
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        x0, kwargs = losa.capture_block_inputs(model, calib)  # once per LoSA run: not timed
        dense = losa.dense_weights(model)  # once per LoSA run: not timed
    L = len(losa.decoder_layers(model))

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

    return round_robin(dict(fwd=forward_seq, fwdb=forward_batched, grams=lambda: losa.block_grams(model, x0, kwargs),
                            wanda=pruning("wanda"), sparsegpt=pruning("sparsegpt")), repeats)


def pruning_rows(t):
    """(metric, value, target) lines of the pruning-pass times."""
    return [("forward, one sequence at a time, ms", f"{1e3 * t['fwd']:.0f}", ""),
            ("forward, batched, ms", f"{1e3 * t['fwdb']:.0f}", ""),
            ("RMI grams alone, ms", f"{1e3 * t['grams']:.0f}", ""),
            ("wanda pass (grams + prune_blocks), ms", f"{1e3 * t['wanda']:.0f}", ""),
            ("sparsegpt pass (grams + prune_blocks), ms", f"{1e3 * t['sparsegpt']:.0f}", ""),
            ("ratio wanda pass / forward", f"{t['wanda'] / t['fwd']:.2f}", "<= 3"),
            ("ratio wanda pass / batched forward", f"{t['wanda'] / t['fwdb']:.2f}", ""),
            ("ratio wanda prune_blocks alone / forward", f"{(t['wanda'] - t['grams']) / t['fwd']:.2f}", ""),
            ("ratio sparsegpt pass / forward", f"{t['sparsegpt'] / t['fwd']:.2f}", "")]


def width_rows(w, ckpt_notes):
    """python bench.py, one width: the training-step and pruning-pass lines."""
    base = build(w, args.layers, args.seqlen)
    ids = torch.randint(1024, (args.batch, args.seqlen), generator=torch.Generator().manual_seed(0)).to(dev)
    models = step_models(base, args.grad_checkpoint)
    ckpt_notes += [f"w={w} ({k}): max relative gradient difference with/without checkpointing {d:.1e}"
                   for k, d in checkpoint_differences(models, ids).items()]
    print(f"w={w}: training step ...", file=sys.stderr, flush=True)
    rows = step_rows(step_times(models, ids, args.repeats), args.batch * args.seqlen)
    if cuda:
        rows += [(f"{STEP_NAMES[k].split(',')[0]}, step peak GiB", f"{v:.2f}", "")
                 for k, v in step_peaks(models, ids).items()]
    models = None  # release them before the pruning pass
    calib = torch.randint(1024, (args.nsamples, args.calib_seqlen), generator=torch.Generator().manual_seed(1)).to(dev)
    print(f"w={w}: pruning pass ...", file=sys.stderr, flush=True)
    return rows + pruning_rows(pruning_times(base.eval(), calib, args.prune_repeats))


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
    weights = sum(lin.weight.numel() * lin.weight.element_size()
                  for b in losa.decoder_layers(model) for lin in losa.projections(b).values())
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
    print(json.dumps(dict(L=L, extra_buffers=(peak - base - host_copy) / buf, buffer_mb=buf / 2**20,
                          weights_mb=weights / 2**20)))


def depth_rows():
    """python bench.py: the pruning pass's memory at each of --peak-depths, one child process each."""
    rows = []
    for L in (int(d) for d in args.peak_depths.split(",")):
        cmd = [sys.executable, __file__, "--_peak", str(L),
               "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads),
               "--peak-width", str(args.peak_width), "--peak-nsamples", str(args.peak_nsamples),
               "--calib-seqlen", str(args.calib_seqlen)]
        print(f"memory, {L} blocks ...", file=sys.stderr, flush=True)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"memory child failed:\n{out.stderr}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((f"pass memory beyond weights{' + host copy' if not cuda else ''}, L={L}, buffers",
                     f"{r['extra_buffers']:.2f}",
                     f"const (w={args.peak_width}, {args.peak_nsamples}x{args.calib_seqlen}: "
                     f"1 buffer = {r['buffer_mb']:.0f} MiB, weights {r['weights_mb']:.0f} MiB)"))
    return rows


# ------------------------------------------------------------------------------------------------
# 5. several processes (torchrun): losa.finetune and the pruning pass, N processes against one


def processes_worker():
    """One torchrun process: the same random model everywhere (--_fsdp: sharded as losa.py --fsdp shards it),
    timed losa.finetune updates (the first one a warm-up), the best of --prune-repeats Wanda and SparseGPT pruning
    passes of the same weights, and (not sharded: --fsdp runs no --compare) a perplexity scoring; the first
    process prints the times and the bytes of its block-0 inputs (one activation buffer of the pass's three) as
    JSON."""
    args.device = losa.start_processes(args.device)
    w, accum = int(args.width.split(",")[0]), args.accum
    model = build(w, args.layers, args.seqlen)
    if args._fsdp:
        model = losa.shard_model(model, None, None, args.device)[0].requires_grad_(False)
    model = masked(model, 0.1)
    mods = [m for m in model.modules() if isinstance(m, losa.MaskedLoRALinear)]
    gen = torch.Generator().manual_seed(0)
    batch = lambda: dict(input_ids=(ids := torch.randint(1024, (args.batch, args.seqlen), generator=gen)),
                         labels=ids, attention_mask=torch.ones_like(ids))
    updates = [[batch() for _ in range(accum)] for _ in range(1 + args.repeats)]
    cfg = losa.Settings(lr=2e-4)
    losa.finetune(model, mods, updates[:1], cfg, 1)  # warm-up
    sync(), torch.distributed.barrier()
    tic = time.perf_counter()
    losa.finetune(model, mods, updates[1:], cfg, 1)
    sync()
    step = (time.perf_counter() - tic) / args.repeats
    losa.unwrap_(model, merge=False)
    calib = torch.randint(1024, (args.nsamples, args.calib_seqlen), generator=gen).to(dev)
    x0, kwargs = losa.capture_block_inputs(model, calib)  # this process's windows
    dense = losa.dense_weights(model)
    out = dict(update=step, tokens=accum * args.batch * args.seqlen, activations=x0.numel() * x0.element_size())
    for pruner in ("wanda", "sparsegpt") * args.prune_repeats:
        torch.distributed.barrier()
        tic = time.perf_counter()
        losa.block_grams(model, x0, kwargs)
        losa.prune_blocks(model, x0, kwargs, [0.6] * args.layers, pruner, None, dense)
        sync()
        out[pruner] = min(out.get(pruner, math.inf), time.perf_counter() - tic)
        losa.restore_(model, dense)
    if not args._fsdp:
        import eval as ev

        torch.distributed.barrier()
        tic = time.perf_counter()
        ev.perplexity(model, calib, args.calib_seqlen, args.batch, share=True)
        sync()
        out["score"] = time.perf_counter() - tic
    if losa.is_main():
        print(json.dumps(out))


def processes_table():
    """--processes N: the worker under torchrun with 1 and N processes, alternately, --repeats launches each."""
    n, w = args.processes, int(args.width.split(",")[0])
    flags = ["--_worker", "--width", str(w), "--layers", str(args.layers), "--batch", str(args.batch),
             "--seqlen", str(args.seqlen), "--accum", str(args.accum), "--repeats", str(args.repeats),
             "--nsamples", str(args.nsamples), "--calib-seqlen", str(args.calib_seqlen), "--device", args.device,
             "--prune-repeats", str(args.prune_repeats)]
    names = {1: "1 process", n: f"{n} processes", "fsdp": f"{n} processes, --fsdp",
             "apart": f"{n} independent 1-process runs side by side, each on 1/{n} of the work"}
    runs = {1: [], n: [], "fsdp": [], "apart": []}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = lambda k, extra: subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={k}", __file__, *flags,
         *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for _ in range(args.launches):
        for k in runs:
            print(f"{names[k]} ...", file=sys.stderr, flush=True)
            if k == "apart":  # the machine's own ceiling: no communication, the same cores shared
                split = ["--nsamples", str(args.nsamples // n), "--accum", str(max(1, args.accum // n))]
                procs = [launch(1, split) for _ in range(n)]
            else:
                procs = [launch(n if k == "fsdp" else k, ["--_fsdp"] if k == "fsdp" else [])]
            outs = [(p, *p.communicate()) for p in procs]
            for p, _, err in outs:
                if p.returncode:
                    sys.exit(f"torchrun with {names[k]} failed:\n{err[-3000:]}")
            times = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in outs]
            runs[k].append({key: max(t[key] for t in times) for key in times[0]})  # the slowest of them
    med = {k: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for k, rs in runs.items()}
    tokens = runs[1][0]["tokens"]
    print(f"device {args.device}, torch {torch.__version__}, gloo/NCCL via torchrun, one thread per process on CPU; "
          f"random Llama w={w}, {args.layers} blocks, r={R}; an update = {args.accum} micro-batches of "
          f"{args.batch}x{args.seqlen} tokens; median of {args.launches} launches (each: the mean of {args.repeats} "
          f"updates, the best of {args.prune_repeats} passes)")
    for k in (1, n, "fsdp"):
        print(f"fine-tune tokens/s, {names[k]}: {tokens / med[k]['update']:.0f}")
    for k in (n, "fsdp", "apart"):
        print(f"speed-up of {names[k]}: {med[1]['update'] / med[k]['update']:.2f} (ideal {n})")
    for pruner in ("wanda", "sparsegpt"):
        for k in (1, n, "fsdp"):
            print(f"{pruner} pass (grams + prune_blocks), {names[k]}: {1e3 * med[k][pruner]:.0f} ms")
        for k in (n, "fsdp", "apart"):
            note = ", each still runs every OBS sweep" if k == "apart" and pruner == "sparsegpt" else ""
            print(f"{pruner} pass speed-up of {names[k]}: {med[1][pruner] / med[k][pruner]:.2f} (ideal {n}{note})")
    print(f"perplexity scoring of {args.nsamples} windows, 1 process: {1e3 * med[1]['score']:.0f} ms, {n} processes: "
          f"{1e3 * med[n]['score']:.0f} ms, speed-up {med[1]['score'] / med[n]['score']:.2f} (ideal {n}; "
          f"{names['apart']}: {med[1]['score'] / med['apart']['score']:.2f})")
    for k in (1, n, "fsdp"):
        print(f"block-0 inputs per process (one of the pass's 3 activation buffers), {names[k]}: "
              f"{med[k]['activations'] / 2**20:.2f} MiB ({med[k]['activations'] / med[1]['activations']:.3f} of 1)")


# ------------------------------------------------------------------------------------------------
# 4. inference: the seven projections of every block executed dense or sparse

SWEEP = (0.5, 0.6, 0.7, 0.8)  # unstructured sparsities of the mat-vec sweep (and 2:4)
LLAMA7B = {"q/k/v/o": (4096, 4096, 4), "gate/up": (11008, 4096, 2), "down": (4096, 11008, 1)}  # out, in, per block
KERNELS = {"linear": "F.linear", "mm": "sparse.mm"}


def to_csr32(W):
    """Dense W -> CSR holding exactly W's non-zeros, with 32-bit row pointers and column indices."""
    c = W.to_sparse_csr()
    return torch.sparse_csr_tensor(c.crow_indices().int(), c.col_indices().int(), c.values(), c.shape,
                                   check_invariants=True)


def is_2_4(W):
    """True if every group of 4 consecutive inputs of every row holds at most 2 non-zeros."""
    return W.shape[1] % 4 == 0 and bool(((W != 0).reshape(W.shape[0], -1, 4).sum(-1) <= 2).all())


def sparse_weight(W):
    """2:4 semi-structured where W is 2:4 and on CUDA (torch's only 2:4 kernels), CSR otherwise."""
    if W.is_cuda and is_2_4(W):
        return torch.sparse.to_sparse_semi_structured(W)
    return to_csr32(W)


def sparse_linear(x, W, bias, kernel):
    """x W^T + b with W sparse: kernel "linear" = F.linear(x, W), "mm" = (W @ x^T)^T by torch.sparse.mm."""
    if kernel == "linear":
        return F.linear(x, W, bias)
    y = torch.sparse.mm(W, x.reshape(-1, x.shape[-1]).T).T.reshape(*x.shape[:-1], W.shape[0])
    return y if bias is None else y + bias


class SparseLinear(nn.Module):
    """Stands in for an nn.Linear: the same bias, the weight held sparse (sparse_weight)."""

    def __init__(self, lin, kernel="linear"):
        super().__init__()
        self.weight, self.bias, self.kernel = sparse_weight(lin.weight.detach()), lin.bias, kernel

    def forward(self, x):
        return sparse_linear(x, self.weight, self.bias, self.kernel)


def sparse_model(model, kernel="linear"):
    """A copy of model whose seven projections per block run sparse; everything else unchanged."""
    return wrap(copy.deepcopy(model), lambda lin: SparseLinear(lin, kernel))


def nbytes(W):
    """Bytes of the tensors a dense, CSR or 2:4 semi-structured weight is made of."""
    if W.layout == torch.sparse_csr:
        parts = [W.values(), W.col_indices(), W.crow_indices()]
    elif isinstance(W, torch.sparse.SparseSemiStructuredTensor):
        parts = [t for t in (W.packed, W.meta, W.packed_t, W.meta_t, W.compressed_swizzled_bitmask) if t is not None]
    else:
        parts = [W]
    return sum(t.numel() * t.element_size() for t in parts)


def prune_rows(W, sparsity, order):
    """Zero the smallest |W_ij| of every row (order = |W|.argsort(1)); sparsity "2:4": 2 of every 4 inputs."""
    if sparsity == "2:4":
        G = W.reshape(-1, 4)
        return G.scatter(1, G.abs().argsort(1)[:, :2], 0).reshape(W.shape)
    return W.scatter(1, order[:, :round(W.shape[1] * sparsity)], 0)


def compressed_24_bytes(W):
    """Bytes of 2:4 W as torch's default (CUTLASS) semi-structured tensor holds it: kept values + metadata.
    Built with the conversion its from_dense calls, which also runs on CPU."""
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass
    return sum(t.numel() * t.element_size() for t in sparse_semi_structured_from_dense_cutlass(W))


def attempt(fn, notes, what):
    """fn() or, where this torch build or device cannot run it, None and a one-line note."""
    try:
        return fn()
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as e:
        notes.append(f"{what}: not run ({(str(e).strip().splitlines() or [type(e).__name__])[0][:120]})")


def runnable(fns, notes):
    """The variants that run (each tried once)."""
    return {k: fn for k, fn in fns.items() if attempt(fn, notes, k) is not None}


def crossover(points):
    """[(sparsity, speedup)], ascending -> where the speedup first reaches 1 (linear between points)."""
    if points[0][1] >= 1:
        return f"<= {100 * points[0][0]:.0f} %"
    for (s1, r1), (s2, r2) in zip(points, points[1:]):
        if r1 < 1 <= r2:
            return f"{100 * (s1 + (1 - r1) / (r2 - r1) * (s2 - s1)):.0f} %"
    return f"> {100 * points[-1][0]:.0f} %"


@torch.no_grad()
def matvec_sweep(notes, inner=10):
    """Mat-vec (1 x in) at LLaMA-2-7B shapes: dense against each kernel at each sparsity; printed."""
    print(f"\nmat-vec 1 x in -> out at LLaMA-2-7B shapes, {args.dtype}: ms (speedup = dense time / sparse time; "
          f"{'2:4 semi-structured' if cuda else 'CSR'} for 2:4)")
    print(f"{'out x in':<12}{'dense':>7}  {'kernel':<10}"
          + "".join(f"{s:>16}" for s in [f"{100 * s:.0f} %" for s in SWEEP] + ["2:4"])
          + f"{'crossover':>12}")
    for o, i, _ in LLAMA7B.values():
        print(f"{o}x{i}: building ...", file=sys.stderr, flush=True)
        g = torch.Generator(device=dev).manual_seed(0)
        W = torch.randn(o, i, device=dev, dtype=dtype, generator=g)
        x = torch.randn(1, i, device=dev, dtype=dtype, generator=g)
        order = W.abs().argsort(1)
        weights = {s: attempt(lambda: sparse_weight(prune_rows(W, s, order)), notes, f"{o}x{i} at {s}")
                   for s in SWEEP + ("2:4",)}
        weights = {s: Ws for s, Ws in weights.items() if Ws is not None}
        order = None  # release it (rebound, not del: the lambdas above read it)
        fns = {"dense": lambda: F.linear(x, W)}
        fns.update({(s, k): (lambda Ws=Ws, k=k: sparse_linear(x, Ws, None, k))
                    for s, Ws in weights.items() for k in KERNELS})
        fns = runnable(fns, notes)
        t = round_robin({k: (lambda fn=fn: [fn() for _ in range(inner)]) for k, fn in fns.items()},
                        max(args.repeats, 5))
        for k, kname in KERNELS.items():
            cells = [f"{1e3 * t[s, k] / inner:.2f} ({t['dense'] / t[s, k]:.2f}x)" if (s, k) in t else "-"
                     for s in SWEEP + ("2:4",)]
            points = [(s, t["dense"] / t[s, k]) for s in SWEEP if (s, k) in t]
            print(f"{f'{o}x{i}':<12}{1e3 * t['dense'] / inner:>7.2f}  {kname:<10}" + "".join(f"{c:>16}" for c in cells)
                  + f"{crossover(points) if points else '-':>12}")
        W = weights = fns = None  # release them (rebound, not del: the lambdas above read them)


def memory_table():
    """Bytes of each format per projection and for the seven projections of LLaMA-2-7B's 32 blocks, fp16."""
    print("\nmemory of the projection weights, float16, from the tensors built (CSR: values + 32-bit column indices "
          "+ row pointers; 2:4: kept values + metadata in torch's CUTLASS layout)")
    print(f"{'format':<16}"
          + "".join(f"{f'{o}x{i} MiB':>17}" for o, i, _ in LLAMA7B.values())
          + f"{'7B, 32 blocks GB':>19}{'/ dense':>9}")
    sizes = {}
    for o, i, n in LLAMA7B.values():
        W = torch.randn(o, i, generator=torch.Generator().manual_seed(0)).half()
        order = W.float().abs().argsort(1)
        sizes.setdefault("dense", []).append((nbytes(W), n))
        for s in SWEEP:
            sizes.setdefault(f"CSR {100 * s:.0f} %", []).append((nbytes(to_csr32(prune_rows(W, s, order))), n))
        sizes.setdefault("2:4 compressed", []).append((compressed_24_bytes(prune_rows(W, "2:4", order)), n))
    total = {f: 32 * sum(b * n for b, n in v) for f, v in sizes.items()}
    for f, v in sizes.items():
        print(f"{f:<16}"
              + "".join(f"{b / 2**20:>17.1f}" for b, _ in v)
              + f"{total[f] / 1e9:>19.2f}{total[f] / total['dense']:>9.2f}")


def greedy_decoder(model, prompt, new_tokens):
    """Runs the prompt once (not timed); the returned fn decodes new_tokens single-token greedy steps
    with the KV cache from there and returns them, shape (1, new_tokens)."""
    out = model(prompt, use_cache=True)
    prompt_cache, first = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def decode():
        cache, tok, toks = copy.deepcopy(prompt_cache), first, []  # the copy: a few MB, negligible
        for _ in range(new_tokens):
            tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            toks.append(tok)
        return torch.cat(toks, 1)
    return decode


def projection_bytes(model):
    return sum(nbytes(m.weight)
               for b in losa.decoder_layers(model) for m in b.modules()
               if isinstance(m, (nn.Linear, SparseLinear)))


@torch.no_grad()
def model_decode_prefill(model, tokenizer, notes, prompt_len=128, new_tokens=128, prefill_len=512):
    """Dense vs sparse projections of one model: greedy decode with the KV cache, and prefill; printed."""
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[k] for k in sorted(topics))[:40 * prefill_len]  # Python's own documentation
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :prefill_len].to(dev)
    W = [lin.weight for b in losa.decoder_layers(model) for lin in losa.projections(b).values()]
    zeros = sum(int((w == 0).sum()) for w in W) / sum(w.numel() for w in W)
    print(f"\nmodel {args.inference}: projections {100 * zeros:.1f} % zeros, "
          f"{'2:4' if all(map(is_2_4, W)) else 'unstructured'}; "
          f"decode: {new_tokens} greedy single-token steps with the KV cache after a {prompt_len}-token prompt; "
          f"prefill: 1 x {prefill_len} tokens")
    models = {"dense": model}
    for k, kname in KERNELS.items():
        print(f"sparse model ({kname}) ...", file=sys.stderr, flush=True)
        models[f"sparse, {kname}"] = attempt(lambda: sparse_model(model, k), notes, f"sparse model ({kname})")
    models = {k: m for k, m in models.items()
              if m is not None and attempt(lambda: m(ids[:, :8]), notes, k) is not None}
    logits = {k: m(ids, use_cache=False).logits for k, m in models.items()}
    decoders = {k: greedy_decoder(m, ids[:, :prompt_len], new_tokens) for k, m in models.items()}
    tokens = {k: d() for k, d in decoders.items()}
    print("decode ...", file=sys.stderr, flush=True)
    td = round_robin(decoders, args.repeats)
    print("prefill ...", file=sys.stderr, flush=True)
    tp = round_robin({k: (lambda m=m: m(ids, use_cache=False, logits_to_keep=1)) for k, m in models.items()},
                     args.repeats)
    print(f"{'variant':<20}{'decode tok/s':>13}{'speedup':>9}{'prefill ms':>12}{'speedup':>9}{'projections MiB':>17}"
          f"{'same tokens':>13}{'max |dlogit| / max |logit|':>28}")
    for k, m in models.items():
        same = int((tokens[k] == tokens["dense"]).cumprod(1).sum())  # greedy tokens equal to dense, from the start
        err = (logits[k] - logits["dense"]).abs().max().item() / logits["dense"].abs().max().item()
        print(f"{k:<20}{new_tokens / td[k]:>13.1f}{td['dense'] / td[k]:>8.2f}x"
              f"{1e3 * tp[k]:>12.0f}{tp['dense'] / tp[k]:>8.2f}x"
              f"{projection_bytes(m) / 2**20:>17.1f}{f'{same}/{new_tokens}':>13}{err:>28.1e}")


def checkpoint_cost():
    """--checkpoint [MODEL]: the bytes and seconds of losa.py's checkpoints in a run on MODEL (default SmolLM2-135M;
    the demo's settings, T = 2), against the seconds of the steps that wrote them."""
    import tempfile

    saves, save, inodes = [], losa.Checkpoint.save, set()

    def timed(self, t, u, opt, losses):
        tic = time.time()
        save(self, t, u, opt, losses)
        seconds = time.time() - tic
        files = {os.stat(os.path.join(self.folder, f)).st_ino: m["bytes"] for f, m in self.files.items()}
        linked = sum(b for ino, b in files.items() if ino in inodes)  # the files of the checkpoint before
        inodes.clear()
        inodes.update(files)
        saves.append(dict(step=t, update=u, seconds=seconds, bytes=sum(files.values()), linked=linked))

    losa.Checkpoint.save = timed
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--model", args.checkpoint or losa.smollm2_gguf(), "--calib", "pydoc", "--train", "pydoc",
                "--sparsity", "0.7", "--nsamples", "16", "--seqlen", "64", "--train-samples", "64", "--max-len", "96",
                "--batch-size", "4", "--grad-accum", "1", "--lr", "1e-3", "--steps", "2", "--save-every", "4",
                "--device", args.device, "--out", os.path.join(tmp, "out")]
        losa.main(argv)
        with open(os.path.join(tmp, "out", "losa_report.json")) as f:
            steps = json.load(f)["steps"]
    print(f"python losa.py {' '.join(argv[:-2])}: {len(saves)} checkpoints")
    for s in saves:
        print(f"step {s['step']}, update {s['update']:>2}: {s['seconds']:.2f} s, {s['bytes'] / 1e6:.1f} MB, "
              f"{(s['bytes'] - s['linked']) / 1e6:.1f} MB written ({s['linked'] / 1e6:.1f} MB hard-linked)")
    for st in steps:
        mine = [s["seconds"] for s in saves if s["step"] == st["step"]]
        print(f"step {st['step']}: {st['seconds']:.1f} s ({st['updates']} updates), its {len(mine)} checkpoints "
              f"{sum(mine):.2f} s = {sum(mine) / st['seconds']:.1%} of it")


def inference():
    """python bench.py --inference [MODEL]: model decode/prefill (given MODEL), 7B-shape mat-vec sweep, memory."""
    import eval as ev
    t_start = time.time()
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")  # CSR "beta" and invariant-check notices
    model = None
    if args.inference:
        try:
            model, tokenizer = ev.load_model(args.inference, args.device, args.dtype)
        except OSError as e:
            print(f"bench.py: error: {e}", file=sys.stderr)  # one line, exit code 2
            sys.exit(2)
    print(f"device {args.device}{' (' + torch.cuda.get_device_name() + ')' if cuda else ''}, "
          f"{args.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median of round-robin rounds after one warm-up round")
    notes = []
    if model is not None:
        model_decode_prefill(model, tokenizer, notes)
        del model
    matvec_sweep(notes)
    memory_table()
    for line in notes:
        print(line)
    print(f"total {time.time() - t_start:.0f} s")


# ------------------------------------------------------------------------------------------------
# 6. --gpu-check: correctness, speed at LLaMA-2-7B width, memory, torchrun; on CPU the same parts at tiny sizes

CHECK_SIZES = {  # what --gpu-check runs at, on CUDA (one H100, < 8 min) and on CPU (the dry run, < 1 min)
    "cuda": dict(
        lora=(1024, 2048),  # masked LoRA against float64: out, in
        prune=(512, 2048, 4096),  # pruner masks against the CPU's: rows, columns, tokens
        width=4096, layers=2, batch=4, seqlen=256, nsamples=16, calib_seqlen=256, repeats=3,  # bench's lines
        semi=(11008, 4096, 4096),  # 2:4 semi-structured projection: out, in, tokens
        mem=dict(width=4096, head_dim=128, vocab=32000, nsamples=128, calib_seqlen=2048, batch=4, max_len=1024),
    ),
    "cpu": dict(
        lora=(48, 64), prune=(32, 256, 512),
        width=64, layers=2, batch=2, seqlen=32, nsamples=4, calib_seqlen=32, repeats=1,
        semi=(176, 64, 16),
        mem=dict(width=64, head_dim=64, vocab=1024, nsamples=8, calib_seqlen=64, batch=2, max_len=32),
    ),
}
README_GB = {  # the README's LLaMA-2-7B figures (section "Full scale"), decimal GB
    "pruning, wanda": 20.0, "pruning, sparsegpt": 22.0, "fine-tuning, --grad-checkpoint": 20.5,
    "fine-tuning": 80.0,  # no figure: "an 80 GB one does not [need --grad-checkpoint]"
}
LOSA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "losa.py")


class Checks:
    """Lines printed as they come and kept for the results file; PASS/FAIL lines counted."""

    def __init__(self):
        self.lines, self.passed, self.failed = [], 0, 0

    def say(self, line):
        print(line, flush=True)
        self.lines.append(line)

    def check(self, ok, what):
        self.passed, self.failed = self.passed + bool(ok), self.failed + (not ok)
        self.say(f"{'PASS' if ok else 'FAIL'} {what}")
        return ok


def rel_err(got, ref):
    """max |got - ref| / max |ref|, in float64 on the CPU."""
    ref = ref.detach().double().cpu()
    return ((got.detach().double().cpu() - ref).abs().max() / ref.abs().max()).item()


class FixedDropout(nn.Module):
    """Dropout with a given keep-mask, so that a float64 reference can apply the very same mask."""

    def __init__(self, p, keep):
        super().__init__()
        self.p, self.keep = p, keep

    def forward(self, x):
        return x * self.keep / (1 - self.p)


def masked_lora_vs_float64(c, out_f, in_f, dt, p):
    """MaskedLoRALinear on the device in dt, forward and backward, against autograd through the plainly merged
    weight in float64 on the CPU: y = x W^T + b + s xa ((BA) * M)^T, xa = x * keep / (1 - p)."""
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(out_f, in_f, generator=g) * (torch.rand(out_f, in_f, generator=g) >= 0.5)).to(dt)
    b, x, gy = (torch.randn(*s, generator=g).to(dt) for s in ((out_f,), (3, 17, in_f), (3, 17, out_f)))
    A, B = torch.randn(R, in_f, generator=g) / in_f**0.5, torch.randn(out_f, R, generator=g) / R**0.5
    keep = (torch.rand(3, 17, in_f, generator=g) >= p).to(dt)
    lin = nn.Linear(in_f, out_f, device=dev, dtype=dt)
    with torch.no_grad():
        lin.weight.copy_(W), lin.bias.copy_(b)
    mod = losa.MaskedLoRALinear(lin, R, ALPHA, p).train()
    with torch.no_grad():
        mod.lora_A.copy_(A), mod.lora_B.copy_(B)
    mod.dropout = FixedDropout(p, keep.to(dev)) if p else mod.dropout
    xd = x.to(dev, copy=True).requires_grad_()
    y = mod(xd)
    y.backward(gy.to(dev))
    x64, A64, B64 = (t.double().requires_grad_() for t in (x, A.to(dt), B.to(dt)))  # the values the device used
    ref = F.linear(x64, W.double(), b.double()) + ALPHA / R * F.linear(x64 * keep.double() / (1 - p),
                                                                       (B64 @ A64) * (W != 0))
    ref.backward(gy.double())
    err = max(rel_err(y, ref), rel_err(xd.grad, x64.grad), rel_err(mod.lora_A.grad, A64.grad),
              rel_err(mod.lora_B.grad, B64.grad))
    tol = 1e-5 if dt == torch.float32 else 2e-2
    c.check(err <= tol, f"masked LoRA on {dev.type}, {str(dt)[6:]}, dropout {p}: y and the gradients of x, A, B "
                        f"against float64 autograd through W + s (BA) * M: max rel. error {err:.1e} (<= {tol:g})")


def pruner_masks_vs_cpu(c, rows, cols, tokens):
    """Wanda's and SparseGPT's masks on the device (float32) against the CPU's, for the same weights and the same
    statistics (computed once in float64; each device's own statistic of the same inputs checked beside)."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(tokens, cols, generator=g) * torch.rand(cols, generator=g) @ (
        torch.eye(cols) + 0.1 * torch.randn(cols, cols, generator=g))  # correlated inputs of unequal scales
    act, H = (X.double() ** 2).mean(0).float(), (2 / tokens * X.double().T @ X.double()).float()
    mine = losa.PRUNERS["wanda"][0](X.to(dev)) / tokens
    c.check(rel_err(mine, act) <= 1e-5, f"wanda statistic mean x^2 on {dev.type} against float64: "
                                        f"rel. error {rel_err(mine, act):.1e} (<= 1e-5)")
    for nm in (None, (2, 4)):
        pattern = "2:4" if nm else "50 %"
        same = torch.equal(losa.wanda_mask(W.to(dev), act.to(dev), 0.5, nm).cpu(), losa.wanda_mask(W, act, 0.5, nm))
        c.check(same, f"wanda mask on {dev.type} (float32) equals the CPU's, {pattern}, {rows}x{cols}")
        Wd, Wc = W.to(dev), W.clone()
        kd, kc = losa.sparsegpt_prune_(Wd, H.to(dev), 0.5, nm)[0].cpu(), losa.sparsegpt_prune_(Wc, H, 0.5, nm)[0]
        agree = (kd == kc).double().mean().item()
        counts = torch.equal((~kd).reshape(rows, -1, 128).sum((0, 2)), (~kc).reshape(rows, -1, 128).sum((0, 2)))
        err = rel_err(Wd, Wc)
        c.check(agree >= 0.999 and counts and err <= 1e-3,
                f"sparsegpt on {dev.type} (float32) against the CPU's, {pattern}, {rows}x{cols}, the same H: "
                f"masks agree in {100 * agree:.3f} % (>= 99.9 %; cuBLAS/cuSOLVER round differently), equal pruned "
                f"count in every 128-column block: {counts}, updated weights rel. error {err:.1e} (<= 1e-3)")


@torch.no_grad()
def bf16_merge_keeps_zeros(c, out_f, in_f):
    """merge() in bf16 on the device keeps the zero pattern exactly, also where W + s (BA) M is exactly 0: A, B
    small integers, so s (BA) M is exact, and 1 % of the kept weights set to -s (BA) M; the merged values against
    W + s (BA) M in float64 rounded once to bf16 (the exact zeros: the smallest normal with the sign of W)."""
    g = torch.Generator().manual_seed(2)
    W = torch.randn(out_f, in_f, generator=g) * (torch.rand(out_f, in_f, generator=g) >= 0.7)
    A, B = torch.randint(-2, 3, (R, in_f), generator=g).float(), torch.randint(-2, 3, (out_f, R), generator=g).float()
    d = ALPHA / R * (B.double() @ A.double()) * (W != 0)
    cancel = (torch.rand(out_f, in_f, generator=g) < 0.01) & (W != 0) & (d != 0)
    W = torch.where(cancel, -d.float(), W).bfloat16()
    lin = nn.Linear(in_f, out_f, bias=False, device=dev, dtype=torch.bfloat16)
    lin.weight.copy_(W)
    mod = losa.MaskedLoRALinear(lin, R, ALPHA, 0.0)
    mod.lora_A.copy_(A), mod.lora_B.copy_(B)
    merged = mod.merge().weight.cpu()
    ref = (W.double() + d).bfloat16()
    ref = torch.where((ref == 0) & (W != 0), torch.finfo(torch.bfloat16).tiny * W.sign(), ref).double()
    rounded = ((merged.double() - ref).abs() <= 2**-7 * ref.abs()).all().item()  # within one bf16 ulp
    c.check(torch.equal(merged == 0, W == 0) and rounded,
            f"bf16 merge on {dev.type}, {out_f}x{in_f}, 70 % zeros: zero pattern unchanged, the {int(cancel.sum())} "
            f"weights where W + s (BA) M is exactly 0 kept at the smallest normal, every value W + s (BA) M in "
            f"float64 to one bf16 ulp")


def tiny_folder(tmp):
    """A tiny random Llama with a byte-level BPE tokenizer trained here (no Hub, no gguf), saved as a model
    folder, and local calibration (.txt) and fine-tuning (.jsonl) files, as test_losa.py's tiny_run."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    calib, train, _ = losa.pydoc_slices()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator([calib[:50000]], trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, bos_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(os.path.join(tmp, "model"))
    tok.save_pretrained(os.path.join(tmp, "model"))
    with open(os.path.join(tmp, "calib.txt"), "w") as f:
        f.write(calib[:20000])
    with open(os.path.join(tmp, "train.jsonl"), "w") as f:
        f.writelines(json.dumps({"instruction": f"Explain topic {i}.", "input": "", "output": train[300 * i:][:200]})
                     + "\n" for i in range(24))
    return tmp


def losa_cli(tmp, out, nproc=0):
    """python losa.py on the tiny folder (bf16, 2 steps, Wanda 50 %) into tmp/out; nproc > 0: under torchrun."""
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                                 if nproc else [])
    flags = ["--model", os.path.join(tmp, "model"), "--calib", os.path.join(tmp, "calib.txt"),
             "--train", os.path.join(tmp, "train.jsonl"), "--sparsity", "0.5", "--steps", "2", "--nsamples", "4",
             "--seqlen", "32", "--train-samples", "16", "--batch-size", "4", "--grad-accum", "1", "--max-len", "48",
             "--device", dev.type, "--dtype", "bfloat16", "--out", os.path.join(tmp, out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}  # one thread in both: CPU runs bit for bit
    return subprocess.run(launch + [LOSA] + flags, capture_output=True, text=True, env=env, timeout=300)


def ran(c, run, what):
    """A PASS/FAIL line for a losa.py run's exit status, with its last error line."""
    tail = (run.stderr.strip().splitlines() or [""])[-1][:200]
    return c.check(run.returncode == 0, f"{what}: exit status {run.returncode}" + (f" ({tail})" if run.returncode
                                                                                    else ""))


def losa_end_to_end(c, tmp):
    """python losa.py on the device in bf16: exact per-row zeros, finite losses, a saved folder that loads."""
    from transformers import AutoModelForCausalLM

    if not ran(c, losa_cli(tmp, "plain"), f"losa.py end to end on {dev.type}, bf16, tiny random Llama"):
        return
    out = os.path.join(tmp, "plain")
    with open(os.path.join(out, "losa_report.json")) as f:
        report = json.load(f)
    losses = [v for s in report["steps"] for v in s["train_loss"]]
    c.check(losses and all(map(math.isfinite, losses)), f"losa.py: {len(losses)} fine-tuning losses, all finite")
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    exact = all(torch.equal((lin.weight == 0).sum(1), torch.full((lin.out_features,), int(s * lin.in_features)))
                for s, block in zip(report["steps"][-1]["layer_sparsity"]["assigned"], losa.decoder_layers(model))
                for lin in losa.projections(block).values())
    logits = model(torch.arange(16)[None]).logits
    c.check(model.dtype == torch.bfloat16 and exact and logits.isfinite().all().item(),
            f"losa.py: the saved folder loads with from_pretrained in {str(model.dtype)[6:]}, every row of every "
            f"projection holds floor(s_l d_in) exact zeros, finite logits")


def correctness(c, sz, tmp):
    """Part 1, each against an independent computation."""
    for dt in (torch.float32, torch.bfloat16):
        for p in (0.0, 0.1):
            masked_lora_vs_float64(c, *sz["lora"], dt, p)
    pruner_masks_vs_cpu(c, *sz["prune"])
    bf16_merge_keeps_zeros(c, *sz["lora"])
    losa_end_to_end(c, tmp)


def cpu_txt():
    """metric -> its w=512 value in results/bench/cpu.txt (the CPU's figures, to print beside)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench", "cpu.txt")
    with open(path) as f:
        lines = [l.rstrip() for l in f]
    head = next(l for l in lines if l.startswith("metric"))
    mw = head.index("w=") + len("w=256") - 9  # the metric column's width: values are right-aligned in 9
    col = head.index("w=512") + len("w=512")
    rows = lines[lines.index(head) + 1:]
    return {l[:mw].strip(): l[col - 9:col].strip() for l in rows if len(l) > mw and not l.startswith("total")}


@torch.no_grad()
def semi_structured_24(c, out_f, in_f, tokens, repeats):
    """A projection of 2:4 weights, x W^T: sparse_weight (CUDA: torch's semi-structured 2:4; CPU: CSR, float32)
    against the dense product of the same weights, timed round robin."""
    g = torch.Generator(device=dev).manual_seed(0)
    W = prune_rows(torch.randn(out_f, in_f, device=dev, dtype=dtype, generator=g), "2:4", None)
    x = torch.randn(tokens, in_f, device=dev, dtype=dtype, generator=g)
    Ws = sparse_weight(W)
    kind = "2:4 semi-structured" if isinstance(Ws, torch.sparse.SparseSemiStructuredTensor) else "CSR"
    err, tol = rel_err(F.linear(x, Ws), F.linear(x.double(), W.double())), 1e-2 if cuda else 1e-5
    c.check(kind == ("2:4 semi-structured" if cuda else "CSR") and err <= tol,
            f"{kind} {out_f}x{in_f} x {tokens} tokens, {args.dtype}: rel. error against float64 {err:.1e} "
            f"(<= {tol:g})")
    t = round_robin({"dense": lambda: F.linear(x, W), "sparse": lambda: F.linear(x, Ws)}, max(repeats, 5))
    c.say(f"  dense {1e3 * t['dense']:.3f} ms, {kind} {1e3 * t['sparse']:.3f} ms: "
          f"speed-up {t['dense'] / t['sparse']:.2f}x")


def speed(c, sz):
    """Part 2: bench.py's training-step and pruning-pass lines at sz's width (CUDA: LLaMA-2-7B's, bf16), with
    peft's own LoRA where peft imports, beside results/bench/cpu.txt's w=512; then a 2:4 projection."""
    w, layers, T = sz["width"], sz["layers"], sz["seqlen"]
    base = build(w, layers, T)
    ids = torch.randint(1024, (sz["batch"], T), generator=torch.Generator().manual_seed(0)).to(dev)
    models = step_models(base, with_peft=True)
    if "p" not in models:
        c.say("  peft is not installed: (c') not run")
    rows = step_rows(step_times(models, ids, sz["repeats"]), sz["batch"] * T)
    models = None
    calib = torch.randint(1024, (sz["nsamples"], sz["calib_seqlen"]), generator=torch.Generator().manual_seed(1))
    rows += pruning_rows(pruning_times(base.eval(), calib.to(dev), sz["repeats"]))
    ref = cpu_txt()
    c.say(f"  w={w} ({round(w * 11008 / 4096 / 8) * 8} MLP), {layers} blocks, {args.dtype}, r={R}; step "
          f"{sz['batch']}x{T}, calibration {sz['nsamples']}x{sz['calib_seqlen']}; median of {sz['repeats']}")
    c.say(f"  {'metric':<44}{'here':>8}{'cpu.txt w=512':>15}   target")
    for metric, text, tgt in rows:
        c.say(f"  {metric:<44}{text:>8}{ref.get(metric, '-'):>15}   {tgt}")
    c.check(all(math.isfinite(float(text)) and float(text) > 0 for _, text, _ in rows),
            f"{len(rows)} speed lines measured, every one finite and positive")
    semi_structured_24(c, *sz["semi"], sz["repeats"])


def peak_bytes(fn):
    """Peak memory while fn() runs. CUDA: allocated bytes (all that is live, the model included). CPU: the growth
    of resident memory (a dry-run figure only: the host allocator keeps and reuses memory)."""
    if cuda:
        sync(), torch.cuda.reset_peak_memory_stats()
        fn()
        sync()
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM <- VmRSS
    base = status_kb("VmRSS")
    fn()
    return (status_kb("VmHWM") - base) * 1024


def memory_of(what, L, m):
    """Peak memory of one LoSA phase on L random blocks of a LLaMA-2-7B-shaped config (sizes m), bf16 on CUDA:
    the pruning pass of a step (capture, RMI grams, prune_blocks), or one update of fine-tuning (2 micro-batches
    of batch x max_len, r_max 16 on all projections, x0 still held as losa() holds it)."""
    gc.collect()  # the previous measurement's model, gone before this one's peak is counted
    model = build(m["width"], L, m["calib_seqlen"], vocab=m["vocab"], head_dim=m["head_dim"]).eval()
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(m["vocab"], (m["nsamples"], m["calib_seqlen"]), generator=g).to(dev)
    fixed = 0 if cuda else sum(p.numel() * p.element_size() for p in model.parameters())  # CPU: outside the growth
    if what.startswith("pruning"):
        def prune():
            x0, kwargs = losa.capture_block_inputs(model, calib)
            dense = losa.dense_weights(model)  # on the host
            losa.block_grams(model, x0[:64], kwargs)
            losa.prune_blocks(model, x0, kwargs, [0.6] * L, what.split(", ")[1], None, dense)
        return peak_bytes(prune) + fixed
    x0 = losa.capture_block_inputs(model, calib)[0]  # noqa: F841  (held while fine-tuning, as losa() holds it)
    if "checkpoint" in what:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mods = [mod for block in losa.add_lora(model, R, ALPHA, 0.1) for mod in block]
    ids = torch.randint(m["vocab"], (m["batch"], m["max_len"]), generator=g)
    update = [[dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)] * 2]
    return peak_bytes(lambda: losa.finetune(model, mods, update, losa.Settings(), 1)) + fixed


def memory(c, sz):
    """Part 3: peak memory of pruning and fine-tuning at 1 and 2 blocks; 32 blocks = m(2) + 30 (m(2) - m(1)):
    what grows with depth (a block's weights, LoRA and optimizer state, saved inputs or activations) 30 times
    more, the rest (activation buffers, embeddings, logits) once, as the README's tables add them up."""
    m = sz["mem"]
    c.say(f"  LLaMA-2-7B-shaped config at width {m['width']} (head_dim {m['head_dim']}, vocab {m['vocab']}), "
          f"{args.dtype}; pruning: {m['nsamples']}x{m['calib_seqlen']} calibration tokens; fine-tuning: "
          f"2 x {m['batch']}x{m['max_len']} tokens, r_max {R}")
    c.say(f"  {'phase':<34}{'1 block GB':>11}{'2 blocks GB':>12}{'32 blocks GB':>13}{'README GB':>11}")
    for what, readme in README_GB.items():
        m1, m2 = (memory_of(what, L, m) / 1e9 for L in (1, 2))
        if cuda:
            torch.cuda.empty_cache()
        scaled = m2 + 30 * (m2 - m1)
        c.say(f"  {what:<34}{m1:>11.3f}{m2:>12.3f}{scaled:>13.2f}{readme if cuda else '-':>11}")
        if cuda:
            c.check(scaled <= 1.1 * readme, f"{what}: {scaled:.1f} GB at 32 blocks <= 1.1 x the README's {readme} GB")
        else:
            c.check(m2 > 0 and math.isfinite(scaled), f"{what}: measured (CPU: resident memory, no README figure)")


def safetensors_of(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


def same_weights(a, b):
    """'bitwise', 'close' (equal zero pattern, every weight within 1 % of the largest: CUDA's attention backward
    need not add in the same order twice) or None."""
    if a.keys() != b.keys():
        return None
    if all(torch.equal(a[k], b[k]) for k in a):
        return "bitwise"
    close = all(torch.equal(a[k] == 0, b[k] == 0) and rel_err(b[k], a[k]) <= 1e-2 for k in a)
    return "close" if close and cuda else None


def torchrun_one_process(c, tmp):
    """Part 4: torchrun --nproc-per-node 1 (NCCL on CUDA, gloo on CPU) saves the weights of the plain run."""
    if not os.path.isdir(os.path.join(tmp, "plain")) and not ran(c, losa_cli(tmp, "plain"), "losa.py, plain"):
        return
    backend = "nccl" if cuda else "gloo"
    if not ran(c, losa_cli(tmp, "torchrun", nproc=1), f"torchrun --nproc-per-node 1 losa.py on {dev.type}"):
        return
    with open(os.path.join(tmp, "torchrun", "losa_report.json")) as f:
        env = json.load(f)["machine"]
    how = same_weights(safetensors_of(os.path.join(tmp, "plain")), safetensors_of(os.path.join(tmp, "torchrun")))
    c.check(how is not None and (env["backend"], env["processes"]) == (backend, 1),
            f"torchrun, 1 process, {env['backend']}: model.safetensors {how or 'differs'} against the plain run's"
            f"{'' if cuda else ' (CPU: bitwise required)'}")


def machine_line():
    """What ran the check: device, versions, threads (losa.machine() reads `datasets`, which a GPU host may lack)."""
    import platform

    import transformers
    try:
        import peft
        peft = f", peft {peft.__version__}"
    except ImportError:
        peft = ", no peft"
    if cuda:
        p = torch.cuda.get_device_properties(dev)
        where = f"{p.name} ({p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, {os.cpu_count()} CPU cores"
    else:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), platform.machine())
        where = f"{cpu}, {os.cpu_count()} cores, CPU dry run"
    return (f"{where} ({torch.get_num_threads()} torch threads), torch {torch.__version__}, "
            f"transformers {transformers.__version__}{peft}, Python {platform.python_version()}")


def commit():
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    return out.stdout.strip() if out.returncode == 0 else "unknown (no git here)"


def run_part(c, name, fn):
    """One part; an exception is one FAIL line (traceback on stderr), and the other parts still run."""
    import traceback

    c.say(f"\n{name}")
    tic = time.time()
    try:
        fn()
    except Exception as e:
        traceback.print_exc()
        c.check(False, f"{name} stopped: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}")
    c.say(f"  ({time.time() - tic:.0f} s)")


def gpu_check():
    """python bench.py --gpu-check: the four parts; writes --gpu-out/<GPU name>.txt (CPU: cpu-dry-run.txt);
    exits 1 if any check fails."""
    global dtype
    import tempfile

    t_start, c = time.time(), Checks()
    sz = CHECK_SIZES["cuda" if cuda else "cpu"]
    dtype = torch.bfloat16 if cuda else torch.float32  # CPU: float32 (no bf16 CSR product on CPU)
    args.dtype = str(dtype)[6:]
    import eval  # noqa: F401  (what losa.py imports when it runs)
    found = [m for m in ("datasets", "gguf") if m in sys.modules]
    c.check(not found, f"import losa, eval, bench import neither datasets nor gguf (a GPU host may lack both)"
                       f"{': found ' + ', '.join(found) if found else ''}")
    with tempfile.TemporaryDirectory() as tmp:
        tiny_folder(tmp)
        run_part(c, f"1. correctness on {dev.type}", lambda: correctness(c, sz, tmp))
        run_part(c, f"2. speed at width {sz['width']}", lambda: speed(c, sz))
        run_part(c, "3. memory, scaled to 32 blocks", lambda: memory(c, sz))
        run_part(c, f"4. torchrun, 1 process ({'NCCL' if cuda else 'gloo'})", lambda: torchrun_one_process(c, tmp))
    name = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(dev).lower()).strip("-") if cuda else "cpu-dry-run"
    path = os.path.join(args.gpu_out, f"{name}.txt")
    wall = "{} min {} s".format(*divmod(round(time.time() - t_start), 60))
    c.say(f"\n{c.passed} passed, {c.failed} failed, {wall}")
    os.makedirs(args.gpu_out, exist_ok=True)
    with open(path, "w") as f:
        f.write(f"command: python bench.py --gpu-check{'' if cuda else ' --device cpu'}\nmachine: {machine_line()}\n"
                f"code: commit {commit()} (bench.py, losa.py as run)\nwall: {wall}\n\n"
                + "\n".join(c.lines).lstrip("\n") + "\n")
    print(f"written to {path}")
    if c.failed:
        sys.exit(1)


# ------------------------------------------------------------------------------------------------
# main


def table():
    """python bench.py: training step and pruning pass at each --width, then the pruning pass's memory."""
    t_start = time.time()
    widths = [int(w) for w in args.width.split(",")]
    print(f"device {args.device}{' (' + torch.cuda.get_device_name() + ')' if cuda else ''}, "
          f"{args.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.layers} blocks, r={R}, alpha={ALPHA:g}; "
          f"step {args.batch}x{args.seqlen} tokens, "
          f"calibration {args.nsamples}x{args.calib_seqlen}; "
          f"median of {args.repeats} (step) / {args.prune_repeats} (pruning) round-robin rounds")
    rows, target, ckpt_notes = {}, {}, []  # metric -> {width: text}, metric -> target
    for w in widths:
        for metric, text, tgt in width_rows(w, ckpt_notes):
            rows.setdefault(metric, {})[w], target[metric] = text, tgt
    for metric, text, tgt in [] if args.no_memory else depth_rows():
        rows[metric], target[metric] = {widths[0]: text}, tgt
    mw = max(map(len, rows)) + 2
    print(f"{'metric':<{mw}}" + "".join(f"{'w=' + str(w):>9}" for w in widths) + "   target")
    for metric, vals in rows.items():
        print(f"{metric:<{mw}}" + "".join(f"{vals.get(w, ''):>9}" for w in widths) + f"   {target[metric]}")
    for line in ckpt_notes:
        print(line)
    print(f"total {time.time() - t_start:.0f} s")


def main(argv=None):
    global args, dev, dtype, cuda
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # gradient_checkpointing_enable's rename notice
    args = parse_args(argv)
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cuda = dev.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._peak:
        peak_child(args._peak)
        sys.exit(0)
    if args._worker:
        return processes_worker()
    if args.gpu_check:
        return gpu_check()
    if args.inference is not None:
        return inference()
    if args.checkpoint is not None:
        return checkpoint_cost()
    if args.processes:
        return processes_table()
    table()


if __name__ == "__main__":
    main()
