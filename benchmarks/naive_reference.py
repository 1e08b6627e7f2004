"""The naive way to merge, for comparison: every model in memory, full-matrix SVDs.

This is how the reference implementations work: load θ0 and every expert as whole state dicts,
compute on whole-model tensors, and build OPCM's projections with ``full_matrices=True`` SVDs
(P = Uᵀ τ V with square U and V). It produces the same weights as :mod:`hf_merge.merging.engine` (up to
float rounding) and exists only so that ``merge_speed.py`` can measure what streaming saves.

Usage: ``python naive_reference.py [--fsync] METHOD OUT_DIR BASE_DIR EXPERT_DIR...``. With ``--fsync``
the written file is made durable (fsynced, with its folder) before the clock stops, as every file
hf-merge writes is: the same work, at the same guarantee.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

VISION = ("vision_model.", "visual_projection.")
LINEAR = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight", "fc1.weight", "fc2.weight")


def vision_names(state):
    return sorted(n for n, t in state.items() if n.startswith(VISION) and t.is_floating_point())


def is_linear(name):
    return name.endswith(LINEAR) or name == "visual_projection.weight"


def whole_norm(tensors):
    return float(torch.cat([t.reshape(-1) for t in tensors]).norm())


def opcm(base, experts, alpha=0.5):
    names = vision_names(base)
    merged = {n: experts[0][n].float().clone() for n in names}
    norms = [whole_norm([experts[0][n].float() - base[n].float() for n in names])]
    prev_lambda = 1.0
    for expert in experts[1:]:
        norms.append(whole_norm([expert[n].float() - base[n].float() for n in names]))
        avg = sum(norms) / len(norms)
        summed = {}
        for n in names:
            delta = merged[n] - base[n].float()
            tau = expert[n].float() - base[n].float()
            if is_linear(n) and delta.any():
                u, s, vh = torch.linalg.svd(delta, full_matrices=True)
                r = int((s.cumsum(0) / s.sum() > alpha).float().argmax())
                p = u.T @ tau @ vh.T
                p.diagonal().zero_()
                p[:r, :r] = 0
                tau = u @ p @ vh
            summed[n] = prev_lambda * delta + tau
        lam = whole_norm(summed.values()) / avg
        merged = {n: base[n].float() + summed[n] / lam for n in names}
        prev_lambda = lam
    return merged


def average(base, experts):
    return {n: torch.stack([e[n].float() for e in experts]).mean(0) for n in vision_names(base)}


def task_arithmetic(base, experts, lam=0.3):
    return {n: base[n].float() + lam * sum(e[n].float() - base[n].float() for e in experts) for n in vision_names(base)}


def magmax(base, experts, scale=0.5):
    out = {}
    for n in vision_names(base):
        taus = torch.stack([e[n].float() - base[n].float() for e in experts])
        # the last expert wins ties, as in the streaming version
        best = taus.abs().flip(0).argmax(0, keepdim=True)
        out[n] = base[n].float() + scale * taus.flip(0).gather(0, best)[0]
    return out


def ties(base, experts, lam=0.3, keep=0.2):
    names = vision_names(base)
    flat = lambda d: torch.cat([d[n].reshape(-1) for n in names])  # noqa: E731
    merged = {n: base[n].float() + lam * (experts[0][n].float() - base[n].float()) for n in names}
    for expert in experts[1:]:
        checks = torch.vstack([
            flat({n: merged[n] - base[n].float() for n in names}),
            flat({n: expert[n].float() - base[n].float() for n in names}),
        ])
        d = checks.shape[1]
        kth = checks.abs().kthvalue(d - int(d * keep), dim=1, keepdim=True).values
        trimmed = checks * (checks.abs() >= kth)
        sign = torch.sign(trimmed.sum(0))
        sign[sign == 0] = torch.sign(sign.sum())
        tv = (trimmed * torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)).sum(0)
        offset = 0
        for n in names:
            size = merged[n].numel()
            merged[n] = merged[n] + lam * tv[offset : offset + size].reshape(merged[n].shape)
            offset += size
    return merged


def iso_c(base, experts, scale=1.0):
    """FusionBench's iso_c: every 2-D tensor's Σ τ with its singular values set to their mean."""
    out = {}
    for n in vision_names(base):
        taus = [e[n].float() - base[n].float() for e in experts]
        merged = sum(taus) / len(taus)
        if merged.dim() == 2:
            u, s, vh = torch.linalg.svd(merged * len(taus), full_matrices=False)
            merged = u @ torch.diag(torch.full_like(s, float(s.mean()))) @ vh
        out[n] = base[n].float() + scale * merged
    return out


def tsv_m(base, experts, scale=1.0):
    """FusionBench's compute_and_sum_svd_mem_reduction: each τ's leading int(r/T) triplets,
    concatenated, U and Vᵀ replaced by their polar factors."""
    out = {}
    for n in vision_names(base):
        taus = [e[n].float() - base[n].float() for e in experts]
        if taus[0].dim() != 2:
            out[n] = base[n].float() + scale * sum(taus) / len(taus)
            continue
        r = min(taus[0].shape)
        k = int(r * (1 / len(taus)))
        u_cat = torch.zeros(taus[0].shape[0], r)
        s_cat = torch.zeros(r)
        vh_cat = torch.zeros(r, taus[0].shape[1])
        for i, tau in enumerate(taus):
            u, s, vh = torch.linalg.svd(tau, full_matrices=False)
            u_cat[:, i * k:(i + 1) * k], s_cat[i * k:(i + 1) * k], vh_cat[i * k:(i + 1) * k] = u[:, :k], s[:k], vh[:k]
        uu, _, uvh = torch.linalg.svd(u_cat, full_matrices=False)
        vu, _, vvh = torch.linalg.svd(vh_cat, full_matrices=False)
        out[n] = base[n].float() + scale * (uu @ uvh @ torch.diag(s_cat) @ vu @ vvh)
    return out


METHODS = {"opcm": opcm, "average": average, "task_arithmetic": task_arithmetic, "ties": ties, "magmax": magmax,
           "iso_c": iso_c, "tsv_m": tsv_m}


def main(argv):
    durable = argv[:1] == ["--fsync"]
    method, out_dir, base_dir, *expert_dirs = argv[1:] if durable else argv
    started = time.perf_counter()
    base = load_file(str(Path(base_dir) / "model.safetensors"))
    experts = [load_file(str(Path(e) / "model.safetensors")) for e in expert_dirs]
    merged = METHODS[method](base, experts)
    state = {n: merged[n].to(t.dtype) if n in merged else t for n, t in base.items()}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    save_file(state, str(Path(out_dir) / "model.safetensors"), metadata={"format": "pt"})
    if durable:
        for path in (Path(out_dir) / "model.safetensors", Path(out_dir)):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    status = Path("/proc/self/status")
    if status.is_file():  # ru_maxrss would include the parent's memory at fork time
        peak = next(int(line.split()[1]) * 1024 for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
    print(json.dumps({"seconds": seconds, "peak_rss": peak}))


if __name__ == "__main__":
    main(sys.argv[1:])
