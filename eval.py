"""
WikiText-2 perplexity and zero-shot accuracy, computed the way lm-evaluation-harness computes
them for the pruning papers (Wanda, SparseGPT, LoSA), without depending on the harness.

The protocol (prompts, splits, token rules, metrics; README, "Evaluation"):
  perplexity : non-overlapping windows of seqlen tokens over the joined test split, last partial
               window dropped, PPL = exp(mean over windows of the per-window mean cross-entropy)
  zero-shot  : score of a choice = sum of log p(continuation tokens | context), in float32;
               acc = argmax of scores, acc_norm = argmax of score / len(choice) in characters

    python eval.py --model out/ --output results.json
    python eval.py --model model.gguf --data-dir data/ --limit 100     # offline, local jsonl files
"""

import argparse
import json
import math
import os
import re
import sys
from collections import namedtuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

# every Hub dataset the project loads: (Hub id, config, split used, fields a row must have, data_files)
Hub = namedtuple("Hub", "id config split fields files", defaults=(None,))
TASKS = {  # the seven zero-shot tasks, at their evaluated split
    "boolq": Hub("aps/super_glue", "boolq", "validation", ["passage", "question", "label"]),
    "piqa": Hub("baber/piqa", None, "validation", ["goal", "sol1", "sol2", "label"]),
    "hellaswag": Hub("Rowan/hellaswag", None, "validation", ["activity_label", "ctx_a", "ctx_b", "endings", "label"]),
    "winogrande": Hub(
        "allenai/winogrande", "winogrande_xl", "validation", ["sentence", "option1", "option2", "answer"]
    ),
    "arc_easy": Hub(
        "allenai/ai2_arc", "ARC-Easy", "test", ["question", "choices.text", "choices.label", "answerKey"]
    ),
    "arc_challenge": Hub(
        "allenai/ai2_arc", "ARC-Challenge", "test", ["question", "choices.text", "choices.label", "answerKey"]
    ),
    "openbookqa": Hub(
        "allenai/openbookqa", "main", "test", ["question_stem", "choices.text", "choices.label", "answerKey"]
    ),
}
DATASETS = {
    **TASKS,
    "wikitext2": Hub("Salesforce/wikitext", "wikitext-2-raw-v1", "test", ["text"]),
    "c4": Hub("allenai/c4", None, "train", ["text"], "en/c4-train.00000-of-01024.json.gz"),  # calibration (losa.py)
    "alpaca-gpt4": Hub("vicgalle/alpaca-gpt4", None, "train", ["text"]),  # fine-tuning (losa.py)
}
NO_ACC_NORM = {"boolq", "winogrande"}  # choices score the same tokens (winogrande) or have no text worth normalising
COLUMNS = {"boolq": "BoolQ", "piqa": "PIQA", "hellaswag": "HellaSwag", "winogrande": "WinoGrande",
           "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "openbookqa": "OBQA"}

# -----------------------------------------------------------------------------
# model

def looks_local(name):
    """A path, not a Hub id (name or owner/name): it starts with /, . or ~, or has more than one /."""
    return name.startswith(("/", ".", "~", os.sep)) or name.count("/") > 1


def load_model(name, device="cpu", dtype="float32"):
    """Hub id, local folder or .gguf file -> (model in eval mode, tokenizer). Raises OSError."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kwargs, given, name = {}, name, os.path.expanduser(name)
    if looks_local(given) and not os.path.exists(name):
        raise OSError(f"cannot load model {given}: no such file or folder")
    if name.endswith(".gguf"):
        if not os.path.isfile(name):
            raise OSError(f"cannot load model {given}: no such file")
        name, kwargs["gguf_file"] = os.path.split(os.path.abspath(name))
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=getattr(torch, dtype), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    except Exception as e:  # transformers raises many types; the CLI wants one line, not a traceback
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise OSError(f"cannot load model {given}: {first}") from e
    if "gguf_file" in kwargs:
        # the weights were dequantized on load; without these the model claims to be gguf-quantized
        # and refuses save_pretrained
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
    return model.to(device).eval(), tokenizer

# -----------------------------------------------------------------------------
# several processes (losa.py --compare under torchrun): each scores its share of the batches

def dealt(batches, share):
    """The batches this process scores: all of them, or with `share` under torch.distributed batch k, k + N, ...
    on process k of N (each batch as one process forms it, so every score is one process's)."""
    if share and dist.is_initialized():
        return batches[dist.get_rank() :: dist.get_world_size()]
    return batches


def summed(scores, share):
    """Each process's scores, zero where another process scored -> every process's (adding zeros is exact)."""
    if share and dist.is_initialized():
        dist.all_reduce(scores)
    return scores

# -----------------------------------------------------------------------------
# perplexity

@torch.no_grad()
def perplexity(model, input_ids, seqlen, batch_size=1, progress=False, bos=None, share=False):
    """exp(mean over non-overlapping seqlen windows of the window's mean next-token cross-entropy).

    With `bos` (a token id) a window is BOS + the next seqlen - 1 tokens of input_ids; the loss
    covers those seqlen - 1 tokens, as many as without it. `share`: see dealt().
    """
    ids = input_ids.reshape(-1)
    step = seqlen - (bos is not None)  # tokens of input_ids per window
    n = ids.numel() // step  # the last partial window is dropped
    if n == 0:
        raise ValueError(f"perplexity: {ids.numel()} tokens is less than one window of {seqlen}")
    windows = ids[: n * step].view(n, step)
    if bos is not None:
        windows = F.pad(windows, (1, 0), value=bos)
    windows = windows.to(model.device)  # (n, seqlen)
    losses = torch.zeros(n, device=windows.device)
    for i in tqdm(dealt(range(0, n, batch_size), share), desc="perplexity", disable=not progress):
        x = windows[i : i + batch_size]
        logits = model(x).logits[:, :-1].float()  # predict tokens 1..seqlen-1
        ce = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")  # (b, seqlen-1)
        losses[i : i + batch_size] = ce.mean(dim=1)
    return math.exp(summed(losses, share).mean().item())

# -----------------------------------------------------------------------------
# zero-shot tasks

def hellaswag_preprocess(text):
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def build_requests(task, doc):
    """One document -> ([(context, continuation) per choice], index of the gold choice)."""
    if task == "boolq":
        ctx = f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
        return [(ctx, " no"), (ctx, " yes")], int(doc["label"])
    if task == "piqa":
        ctx = f"Question: {doc['goal']}\nAnswer:"
        return [(ctx, " " + doc["sol1"]), (ctx, " " + doc["sol2"])], int(doc["label"])
    if task == "hellaswag":
        ctx = hellaswag_preprocess(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
        return [(ctx, " " + hellaswag_preprocess(e)) for e in doc["endings"]], int(doc["label"])
    if task == "winogrande":
        # the options go into the context, the rest of the sentence is the shared continuation
        i = doc["sentence"].index("_")
        cont = " " + doc["sentence"][i + 1 :].strip()
        prefix = doc["sentence"][:i]
        return [(prefix + doc["option1"], cont), (prefix + doc["option2"], cont)], {"1": 0, "2": 1}[doc["answer"]]
    if task in ("arc_easy", "arc_challenge"):
        ctx = f"Question: {doc['question']}\nAnswer:"
        choices = doc["choices"]
        return [(ctx, " " + t) for t in choices["text"]], choices["label"].index(doc["answerKey"])
    if task == "openbookqa":
        choices = doc["choices"]
        return (
            [(doc["question_stem"], " " + t) for t in choices["text"]],
            choices["label"].index(doc["answerKey"].strip()),
        )
    raise ValueError(f"unknown task {task}")


def encode_request(tokenizer, context, continuation, add_bos=False):
    """(context, continuation) -> (context token ids, continuation token ids), harness rules."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:  # trailing spaces belong to the continuation, where BPE tokenizers put them
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)
    ctx_ids = enc(context)
    # split the joint encoding: tokens may merge across the boundary
    cont_ids = enc(context + continuation)[len(ctx_ids) :]
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if add_bos or not ctx_ids:  # an empty context is conditioned on the prefix token, as in the harness
        ctx_ids = [prefix] + ctx_ids
    return ctx_ids, cont_ids


@torch.no_grad()
def loglikelihoods(model, tokenizer, requests, batch_size, add_bos=False, max_length=None, share=False):
    """[(context, continuation)] -> [sum of float32 log p(continuation tokens | context)]; `share`: see dealt()."""
    max_length = max_length or model.config.max_position_embeddings
    rows = []  # (input ids, continuation ids)
    for context, continuation in requests:
        ctx_ids, cont_ids = encode_request(tokenizer, context, continuation, add_bos)
        # the last token is only predicted; a context too long for the window is cut on the left
        rows.append(((ctx_ids + cont_ids)[-(max_length + 1) :][:-1], cont_ids))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # longest first: padding stays small
    scores = [0.0] * len(rows)
    for b in tqdm(dealt(range(0, len(order), batch_size), share), desc="loglikelihood", leave=False):
        batch = order[b : b + batch_size]
        T = len(rows[batch[0]][0])
        ids = torch.zeros(len(batch), T, dtype=torch.long)
        mask = torch.zeros(len(batch), T, dtype=torch.long)
        for j, i in enumerate(batch):  # right padding: real positions never see the padding
            ids[j, : len(rows[i][0])] = torch.tensor(rows[i][0])
            mask[j, : len(rows[i][0])] = 1
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
        for j, i in enumerate(batch):
            inp, cont = rows[i]
            logp = logits[j, len(inp) - len(cont) : len(inp)].float().log_softmax(-1)  # (len(cont), vocab)
            target = torch.tensor(cont, device=logp.device)
            scores[i] = logp.gather(1, target[:, None]).sum().item()
    return summed(torch.tensor(scores, dtype=torch.float64, device=model.device), share).tolist() if share else scores


def score_choices(lls, gold, choice_lens=None):
    """-> (acc, acc_norm) of one document, each 0 or 1; acc_norm is None without choice_lens.
    Ties go to the first index (max returns the first maximum)."""
    argmax = lambda xs: max(range(len(xs)), key=lambda i: xs[i])
    acc = float(argmax(lls) == gold)
    if choice_lens is None:
        return acc, None
    return acc, float(argmax([ll / n for ll, n in zip(lls, choice_lens)]) == gold)


def evaluate_task(model, tokenizer, task, docs, batch_size, add_bos=False, share=False):
    """-> (results {acc, acc_norm, n}, samples). All choices of all documents go in one batch queue (`share`: see
    dealt())."""
    built = [build_requests(task, doc) for doc in docs]
    flat = [r for reqs, _ in built for r in reqs]
    lls = loglikelihoods(model, tokenizer, flat, batch_size, add_bos=add_bos, share=share)
    accs, norms, samples, k = [], [], [], 0
    for i, (reqs, gold) in enumerate(built):
        doc_lls, k = lls[k : k + len(reqs)], k + len(reqs)
        lens = None if task in NO_ACC_NORM else [len(cont) - 1 for _, cont in reqs]  # minus the leading space
        acc, norm = score_choices(doc_lls, gold, lens)
        accs.append(acc)
        norms.append(norm)
        samples.append({"doc_index": i, "target": gold, "loglikelihoods": doc_lls})
    acc_norm = None if task in NO_ACC_NORM else sum(norms) / len(norms)
    return {"acc": sum(accs) / len(accs), "acc_norm": acc_norm, "n": len(docs)}, samples

# -----------------------------------------------------------------------------
# data

def read_jsonl(path):
    if not os.path.isfile(path):
        raise ValueError(f"missing data file {path}")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def check_fields(task, docs, where):
    for i, doc in enumerate(docs):
        for field in TASKS[task].fields:
            value = doc
            for key in field.split("."):  # "choices.text" is a field inside "choices"
                if not isinstance(value, dict) or key not in value:
                    raise ValueError(f"{task}: document {i} of {where} lacks field '{field}'")
                value = value[key]
        if task == "winogrande" and "_" not in doc["sentence"]:
            raise ValueError(f"{task}: document {i} of {where} has no '_' in field 'sentence'")


def hub_source(repo_id):
    """What `datasets.load_dataset` is given for a Hub repository (a test points it at a local copy)."""
    return repo_id


def hub_rows(name):
    """The rows of DATASETS[name], through `datasets` (downloaded once, then cached)."""
    import datasets
    hub = DATASETS[name]
    rows = datasets.load_dataset(hub_source(hub.id), hub.config, split=hub.split,
                                 data_files={hub.split: hub.files} if hub.files else None)
    for field in hub.fields:
        if field.split(".")[0] not in rows.column_names:
            raise ValueError(f"{name}: {hub.id} ({hub.split}) has no field '{field}'")
    return rows


def load_docs(task, data_dir=None, limit=None):
    if data_dir:
        where = os.path.join(data_dir, f"{task}.jsonl")
        docs = read_jsonl(where)
    else:
        where = f"{TASKS[task].id} ({TASKS[task].split})"
        docs = list(hub_rows(task))
    docs = docs[:limit] if limit else docs
    if not docs:
        raise ValueError(f"{task}: no documents in {where}")
    check_fields(task, docs, where)
    return docs


def load_wikitext(data_dir=None):
    """Test split rows joined with blank lines, as one string."""
    if data_dir:
        where = os.path.join(data_dir, "wikitext2.jsonl")
        rows = read_jsonl(where)
    else:
        where = f"{DATASETS['wikitext2'].id} ({DATASETS['wikitext2'].split})"
        rows = list(hub_rows("wikitext2"))
    for i, row in enumerate(rows):
        if "text" not in row:
            raise ValueError(f"wikitext2: row {i} of {where} lacks field 'text'")
    return "\n\n".join(row["text"] for row in rows)

# -----------------------------------------------------------------------------
# CLI

def format_table(results):
    """Markdown table: acc and acc_norm per task in percent, mean acc, WikiText-2 PPL."""
    tasks = [t for t in TASKS if t in results]
    head = (
        [COLUMNS[t] for t in tasks]
        + (["Mean"] if tasks else [])
        + (["WikiText-2 PPL"] if "wikitext2" in results else [])
    )
    pct = lambda x: "—" if x is None else f"{100 * x:.2f}"
    acc = [pct(results[t]["acc"]) for t in tasks]
    norm = [pct(results[t]["acc_norm"]) for t in tasks]
    if tasks:
        acc.append(pct(sum(results[t]["acc"] for t in tasks) / len(tasks)))
        norm.append("")
    if "wikitext2" in results:
        acc.append(f"{results['wikitext2']['ppl']:.2f}")
        norm.append("")
    lines = ["| metric | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    lines += ["| acc | " + " | ".join(acc) + " |", "| acc_norm | " + " | ".join(norm) + " |"]
    return "\n".join(lines)


def fail(message):
    print(f"eval.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="WikiText-2 perplexity and zero-shot accuracy, lm-eval-harness protocol.")
    p.add_argument("--model", required=True, help="Hub id, local folder, or .gguf file")
    p.add_argument("--tasks", default=",".join(["wikitext2", *TASKS]), help="comma-separated; default: all eight")
    p.add_argument("--data-dir", help="read <task>.jsonl (Hub schema, evaluated split) and wikitext2.jsonl "
                   "({'text'} rows of the test split) from here instead of the Hub")
    p.add_argument("--limit", type=int, help="first N documents of each zero-shot task (WikiText-2 is always whole)")
    p.add_argument("--seqlen", type=int,
                   help="WikiText-2 window; default: min(model.config.max_position_embeddings, 4096)")
    p.add_argument("--window-bos", action="store_true",
                   help="start every WikiText-2 window with BOS: BOS + seqlen-1 tokens of the "
                   "text tokenized without special tokens (for models trained with BOS at the start of every "
                   "sequence, such as Gemma); off: windows cut from one token stream with the tokenizer's own "
                   "BOS once at the start (the published protocol)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--add-bos", action="store_true",
                   help="prepend BOS to zero-shot contexts (newer harness versions do; the published numbers do not); "
                   "perplexity windows: --window-bos")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--output", help="write results (and samples) as JSON here")
    p.add_argument("--log-samples", action="store_true", help="include per-document log-likelihoods in --output")
    p.error = fail  # one line and exit code 2, without argparse's usage block
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in args.tasks:
        if t != "wikitext2" and t not in TASKS:
            fail(f"unknown task '{t}' (choose from wikitext2, {', '.join(TASKS)})")
    if args.limit is not None and args.limit <= 0:
        fail(f"--limit must be positive, got {args.limit}")
    if args.seqlen is not None and args.seqlen < 2:
        fail(f"--seqlen must be at least 2, got {args.seqlen}")
    if args.batch_size < 1:
        fail(f"--batch-size must be positive, got {args.batch_size}")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:  # data first: a bad file should not cost a model load
        text = load_wikitext(args.data_dir) if "wikitext2" in args.tasks else None
        docs = {t: load_docs(t, args.data_dir, args.limit) for t in args.tasks if t in TASKS}
        model, tokenizer = load_model(args.model, args.device, args.dtype)
    except (ValueError, OSError) as e:
        fail(e)

    results, samples = {}, {}
    if text is not None:
        seqlen = args.seqlen or min(model.config.max_position_embeddings, 4096)  # LLaMA-2's 4096 at most
        bos = tokenizer.bos_token_id if args.window_bos else None
        if args.window_bos and bos is None:
            fail("--window-bos: the tokenizer has no BOS token")
        # tokenizer defaults: BOS once, if it adds one; with --window-bos, BOS opens every window instead
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=bos is None).input_ids
        step = seqlen - (bos is not None)
        if ids.numel() < step:
            fail(f"wikitext2: {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}")
        results["wikitext2"] = {"ppl": perplexity(model, ids, seqlen, args.batch_size, progress=True, bos=bos),
                                "windows": ids.numel() // step}
    for task, task_docs in docs.items():
        results[task], samples[task] = evaluate_task(model, tokenizer, task, task_docs, args.batch_size, args.add_bos)

    print(format_table(results))
    if args.output:
        out = {"results": results, **({"samples": samples} if args.log_samples else {})}
        with open(args.output, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
