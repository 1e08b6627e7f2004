"""Regime search for the offline zoo: pretrain a base, fine-tune experts, measure simple merges.

Numbers are on the tasks' validation splits (the test splits are kept for the merge benchmark).
Each run appends one JSON line to benchmarks/results/zoo_search.jsonl.

    python benchmarks/zoo_search.py --width 128 --layers 6 --epochs 8 --ft-lr 1e-4 --ft-steps 150
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch

from hf_merge.zoo.corpus import build_corpus
from hf_merge.zoo.data import TASKS, load_task
from hf_merge.zoo.finetune import FinetuneConfig, finetune
from hf_merge.zoo.modeling import ModelShape, accuracy, class_heads
from hf_merge.zoo.pretrain import PretrainConfig, pretrain
from hf_merge.zoo.tokenizer import load_clip_tokenizer

RESULTS = Path(__file__).parent / "results" / "zoo_search.jsonl"


def report() -> str:
    """Markdown table of every run recorded in zoo_search.jsonl."""
    lines = ["| run | width x vision layers / text layers | patch | pretrain epochs | elastic | fine-tuning "
             "| pretrain s | zero-shot | experts | average | TA 0.3 | TA 0.5 | task-vector cos |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for line in RESULTS.read_text().splitlines():
        r = json.loads(line)
        a = r["args"]
        if a["note"] == "smoke":
            continue
        ft = f"lr {a['ft_lr']:g}, {a['ft_steps']} steps x {a.get('ft_batch', 128)}"
        if a["last_layers"]:
            ft += f", last {a['last_layers']} blocks"
        if a["l2sp"]:
            ft += f", L2-SP {a['l2sp']:g}"
        lines.append(
            f"| {a['note'].split(':')[0]} | {a['width']} x {a['layers']} / {a['text_layers']} | {a['patch']} | {a['epochs']} "
            f"| {a.get('elastic', 0):g} | {ft} | {r['pretrain_s']} | {100 * r['zs']:.1f} | {100 * r['ft']:.1f} "
            f"| {100 * r['avg']:.1f} | {100 * r['ta0.3']:.1f} | {100 * r['ta0.5']:.1f} | {r['tau_cos']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--text-layers", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ft-batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--elastic", type=float, default=0.0)
    ap.add_argument("--corpus-scale", type=float, default=1.0)
    ap.add_argument("--ft-lr", type=float, default=1e-4)
    ap.add_argument("--ft-steps", type=int, default=100)
    ap.add_argument("--ft-wd", type=float, default=0.1)
    ap.add_argument("--l2sp", type=float, default=0.0)
    ap.add_argument("--last-layers", type=int, default=0)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--note", default="")
    ap.add_argument("--base", default=None, help="a pretrained base folder to reuse (must match the shape flags)")
    ap.add_argument("--report", action="store_true", help="print the table of recorded runs and exit")
    args = ap.parse_args()
    if args.report:
        print(report())
        return
    torch.set_num_threads(args.threads)
    t0 = time.time()
    shape = ModelShape(patch_size=args.patch, vision_width=args.width, vision_layers=args.layers,
                       text_width=args.width, text_layers=args.text_layers, heads=max(4, args.width // 32),
                       projection_dim=args.width, context_length=args.ctx)
    pcfg = PretrainConfig(epochs=args.epochs, lr=args.lr, elastic=args.elastic)
    key = hashlib.sha1(json.dumps([repr(shape), repr(pcfg), args.corpus_scale, args.seed]).encode()).hexdigest()[:10]
    cache = Path("/tmp/zoo_search") / f"base-{key}.pt"
    cache.parent.mkdir(exist_ok=True)
    tok = load_clip_tokenizer(shape.context_length)
    tasks = args.tasks.split(",")
    prompts = [t.format(c) for n in TASKS for c in TASKS[n].classnames for t in TASKS[n].templates]
    if args.base and args.base.endswith(".pt"):
        base = torch.load(args.base, weights_only=False)  # a file this script wrote itself
    elif args.base:
        from transformers import CLIPModel

        base = CLIPModel.from_pretrained(args.base, use_safetensors=True).eval()
    elif cache.exists():
        base = torch.load(cache, weights_only=False)
    else:
        corpus = build_corpus(seed=args.seed, scale=args.corpus_scale)
        base = pretrain(corpus, tok, shape, pcfg, seed=args.seed, extra_texts=prompts)
        torch.save(base, cache)
    t_pre = time.time() - t0
    res = {"args": vars(args), "pretrain_s": round(t_pre), "tasks": {}}
    experts = {}
    for name in tasks:
        info = TASKS[name]
        heads = class_heads(base, tok, info.classnames, info.templates, shape.context_length)
        cos = (heads @ heads.T)[~torch.eye(len(heads), dtype=torch.bool)].mean().item()
        xv, yv = load_task(name, "val")
        xt, yt = load_task(name, "train")
        zs = accuracy(base, heads, xv, yv)
        ft = finetune(base, heads, xt, yt, FinetuneConfig(steps=args.ft_steps, batch_size=args.ft_batch, lr=args.ft_lr, weight_decay=args.ft_wd,
                                                         l2sp=args.l2sp, last_layers=args.last_layers), seed=args.seed)
        experts[name] = (ft, heads, xv, yv)
        res["tasks"][name] = {"zs": zs, "ft": accuracy(ft, heads, xv, yv), "head_cos": round(cos, 3)}
        print(name, res["tasks"][name], flush=True)
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    taus = [{k: v - base_sd[k] for k, v in e[0].state_dict().items() if k.startswith("vision_model")} for e in experts.values()]
    norms = [torch.sqrt(sum((v.float() ** 2).sum() for v in t.values())).item() for t in taus]
    flat = [torch.cat([v.flatten() for v in t.values()]) for t in taus]
    coss = [torch.nn.functional.cosine_similarity(flat[i], flat[j], dim=0).item()
            for i in range(len(flat)) for j in range(i + 1, len(flat))]
    res["tau_norm"] = sum(norms) / len(norms)
    res["tau_cos"] = sum(coss) / max(1, len(coss))
    for label, lam in (("avg", 1.0 / len(taus)), ("ta0.3", 0.3), ("ta0.5", 0.5)):
        sd = dict(base_sd)
        for k in taus[0]:
            sd[k] = base_sd[k] + lam * sum(t[k] for t in taus)
        base.load_state_dict(sd)
        for name, (_, heads, xv, yv) in experts.items():
            res["tasks"][name][label] = accuracy(base, heads, xv, yv)
        base.load_state_dict(base_sd)
    for col in ("zs", "ft", "avg", "ta0.3", "ta0.5"):
        res[col] = round(sum(r[col] for r in res["tasks"].values()) / len(tasks), 4)
    res["total_s"] = round(time.time() - t0)
    print(json.dumps({k: res[k] for k in ("zs", "ft", "avg", "ta0.3", "ta0.5", "tau_cos", "pretrain_s", "total_s")}))
    with RESULTS.open("a") as fh:
        fh.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
