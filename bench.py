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

    python bench.py                                   # 2-core CPU, < 5 min
    python bench.py --device cuda --dtype bfloat16 --width 4096 --layers 2
    python bench.py --grad-checkpoint                 # also step time (and CUDA peak) with checkpointing
    python bench.py --inference out/smollm2-135m-wanda-0.7   # a LoSA output; no MODEL: sweep and memory only
    python bench.py --inference MODEL --device cuda --dtype bfloat16
    python bench.py --processes 2                     # 2-core CPU: 1 vs 2 processes, one thread each
"""
import argparse
import copy
import json
import os
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
    p.add_argument("--prune-repeats", type=int, default=2)
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
                   "torchrun, N processes against one (--width: its first value; --repeats launches of each)")
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


def build(width, layers, seqlen, seed=0):
    """A random Llama, every projection 50 % sparse at random (so the masks are real)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=width, intermediate_size=round(width * 11008 / 4096 / 8) * 8,
                      num_hidden_layers=layers, num_attention_heads=width // 64, num_key_value_heads=width // 64,
                      vocab_size=1024, max_position_embeddings=max(seqlen, 256))
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


# ------------------------------------------------------------------------------------------------
# 5. several processes (torchrun): losa.finetune and the pruning pass, N processes against one


def processes_worker():
    """One torchrun process: the same random model everywhere (--_fsdp: sharded as losa.py --fsdp shards it),
    timed losa.finetune updates (the first one a warm-up), a Wanda and a SparseGPT pruning pass of the same
    weights, and (not sharded: --fsdp runs no --compare) a perplexity scoring; the first process prints the times
    and the bytes of its block-0 inputs (one activation buffer of the pass's three) as JSON."""
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
    for pruner in ("wanda", "sparsegpt"):
        torch.distributed.barrier()
        tic = time.perf_counter()
        losa.block_grams(model, x0, kwargs)
        losa.prune_blocks(model, x0, kwargs, [0.6] * args.layers, pruner, None, dense)
        sync()
        out[pruner] = time.perf_counter() - tic
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
             "--nsamples", str(args.nsamples), "--calib-seqlen", str(args.calib_seqlen), "--device", args.device]
    names = {1: "1 process", n: f"{n} processes", "fsdp": f"{n} processes, --fsdp"}
    runs = {1: [], n: [], "fsdp": []}
    for _ in range(2):
        for k in runs:
            print(f"{names[k]} ...", file=sys.stderr, flush=True)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={n if k == 'fsdp' else k}", __file__]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            out = subprocess.run(cmd + flags + (["--_fsdp"] if k == "fsdp" else []), capture_output=True, text=True,
                                 env=env)
            if out.returncode:
                sys.exit(f"torchrun with {names[k]} failed:\n{out.stderr[-3000:]}")
            runs[k].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {k: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for k, rs in runs.items()}
    tokens = runs[1][0]["tokens"]
    print(f"device {args.device}, torch {torch.__version__}, gloo/NCCL via torchrun, one thread per process on CPU; "
          f"random Llama w={w}, {args.layers} blocks, r={R}; an update = {args.accum} micro-batches of "
          f"{args.batch}x{args.seqlen} tokens; median of 2 launches x {args.repeats} updates")
    for k in runs:
        print(f"fine-tune tokens/s, {names[k]}: {tokens / med[k]['update']:.0f}")
    for k in (n, "fsdp"):
        print(f"speed-up of {names[k]}: {med[1]['update'] / med[k]['update']:.2f} (ideal {n})")
    for pruner in ("wanda", "sparsegpt"):
        for k in runs:
            print(f"{pruner} pass (grams + prune_blocks), {names[k]}: {1e3 * med[k][pruner]:.0f} ms")
        for k in (n, "fsdp"):
            print(f"{pruner} pass speed-up of {names[k]}: {med[1][pruner] / med[k][pruner]:.2f} (ideal {n})")
    print(f"perplexity scoring of {args.nsamples} windows, 1 process: {1e3 * med[1]['score']:.0f} ms, {n} processes: "
          f"{1e3 * med[n]['score']:.0f} ms, speed-up {med[1]['score'] / med[n]['score']:.2f} (ideal {n})")
    for k in runs:
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
# main


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
    if args.inference is not None:
        inference()
        return
    if args._worker:
        return processes_worker()
    if args.processes:
        return processes_table()

    t_start = time.time()
    widths = [int(w) for w in args.width.split(",")]
    print(f"device {args.device}{' (' + torch.cuda.get_device_name() + ')' if cuda else ''}, "
          f"{args.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.layers} blocks, r={R}, alpha={ALPHA:g}; "
          f"step {args.batch}x{args.seqlen} tokens, "
          f"calibration {args.nsamples}x{args.calib_seqlen}; "
          f"median of {args.repeats} (step) / {args.prune_repeats} (pruning) round-robin rounds")
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
        names = {"a": "(a) masked LoRA p=0, ms/step", "b": "(b) masked LoRA p=0.1, ms/step",
                 "c": "(c) plain LoRA p=0, ms/step", "d": "(d) released way p=0.1, ms/step",
                 "a+gc": "(a) + grad checkpointing, ms/step", "b+gc": "(b) + grad checkpointing, ms/step"}
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
                put(f"{names[k].split(',')[0]}, step peak GiB", w,
                    f"{(torch.cuda.max_memory_allocated() - m0) / 2**30:.2f}")
        models = opt = fns = None  # release them (rebound, not del: the lambdas above read them)
        # 2. pruning pass ----------------------------------------------------------------------------
        model = base.eval()
        calib = torch.randint(1024, (args.nsamples, args.calib_seqlen),
                              generator=torch.Generator().manual_seed(1)).to(dev)
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
        model = base = saved = x0 = dense = None  # release them (rebound, not del: the closures above read them)

    # 3. memory of the pruning pass, one child process per depth -----------------------------------------
    if not args.no_memory:
        for L in (int(d) for d in args.peak_depths.split(",")):
            cmd = [sys.executable, __file__, "--_peak", str(L),
                   "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads),
                   "--peak-width", str(args.peak_width), "--peak-nsamples", str(args.peak_nsamples),
                   "--calib-seqlen", str(args.calib_seqlen)]
            print(f"memory, {L} blocks ...", file=sys.stderr, flush=True)
            out = subprocess.run(cmd, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"memory child failed:\n{out.stderr}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            put(f"pass memory beyond weights{' + host copy' if not cuda else ''}, L={L}, buffers",
                widths[0],
                f"{r['extra_buffers']:.2f}",
                f"const (w={args.peak_width}, {args.peak_nsamples}x{args.calib_seqlen}: "
                f"1 buffer = {r['buffer_mb']:.0f} MiB, weights {r['weights_mb']:.0f} MiB)")

    # print the table ---------------------------------------------------------------------------------
    mw = max(map(len, rows)) + 2
    print(f"{'metric':<{mw}}" + "".join(f"{'w=' + str(w):>9}" for w in widths) + "   target")
    for metric, vals in rows.items():
        print(f"{metric:<{mw}}" + "".join(f"{vals.get(w, ''):>9}" for w in widths) + f"   {target[metric]}")
    for line in ckpt_ok:
        print(line)
    print(f"total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
