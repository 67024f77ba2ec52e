"""Train mumoe's bundled qwen3_moe model on a balanced domain mix (seeded, resumable).

    python tools/train_tiny.py --corpus /work/cache/corpus --tokenizer /work/cache/tokenizer \
        --ckpt /work/cache/train --steps 1280 --batch 16 --seqlen 512

Every step draws batch/len(domains) random windows from each domain's train split. Checkpoints (model,
optimizer, step, RNG) go to --ckpt every --save-every steps; re-running the same command resumes. Logs
per-domain validation perplexity on the calib split every --eval-every steps. `--export DIR` writes the
final model in bf16 safetensors with its tokenizer.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM


def model_config(vocab: int, seqlen: int, eos: int) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        num_experts=16, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=seqlen, tie_word_embeddings=True, output_router_logits=True,
        router_aux_loss_coef=0.02, rope_theta=10000.0, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
        initializer_range=0.02,
    )


def per_layer_balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-style load balancing, computed per layer and averaged: E * sum_i f_i * P_i, where f_i is the
    fraction of routing slots given to expert i and P_i its mean router probability. (transformers'
    built-in loss pools all layers' tokens before balancing, which lets an expert die in one layer while
    the same index is busy in another.) Equals 1.0 when balanced. router_logits: per layer [T, E]."""
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
        E = probs.shape[-1]
        chosen = torch.topk(probs, top_k, dim=-1).indices  # [T, k]
        f = torch.zeros(E).scatter_add_(0, chosen.flatten(), torch.ones(chosen.numel())) / chosen.numel()
        losses.append(E * (f * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def tokenize_domain(path: Path, tok, eos: int) -> torch.Tensor:
    ids: list[int] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            ids.extend(tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"])
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)


def windows(text: str, tok, seqlen: int) -> torch.Tensor:
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    n = ids.numel() // seqlen
    return ids[: n * seqlen].view(n, seqlen)


@torch.no_grad()
def validate(model, val: dict[str, torch.Tensor]) -> dict[str, float]:
    model.eval()
    out = {}
    for name, w in val.items():
        nll, count = 0.0, 0
        for i in range(0, len(w), 8):
            batch = w[i : i + 8]
            logits = model(input_ids=batch).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
            nll, count = nll + loss.item(), count + batch[:, 1:].numel()
        out[name] = math.exp(nll / count)
    model.train()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=1280)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--val-windows", type=int, default=16)
    ap.add_argument("--experts-impl", default="grouped_mm")
    ap.add_argument("--export", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    args.ckpt.mkdir(parents=True, exist_ok=True)

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    eos = tok.eos_token_id
    domains = sorted(p.name for p in args.corpus.iterdir() if p.is_dir())
    cache = args.ckpt / "tokens.pt"
    if cache.exists():
        data = torch.load(cache)
    else:
        data = {d: tokenize_domain(args.corpus / d / "train.jsonl", tok, eos) for d in domains}
        torch.save(data, cache)
    print({d: v.numel() for d, v in data.items()}, flush=True)
    val = {d: windows((args.corpus / d / "calib.txt").read_text("utf-8"), tok, args.seqlen)[: args.val_windows]
           for d in domains}

    config = model_config(len(tok), args.seqlen, eos)
    config._experts_implementation = args.experts_impl
    model = Qwen3MoeForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    step = 0
    state_path = args.ckpt / "state.pt"
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        step = state["step"]
        print(f"resumed at step {step}", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params={n_params:,} tokens/step={args.batch * args.seqlen}", flush=True)

    def lr_at(s: int) -> float:
        if s < args.warmup:
            return args.lr * (s + 1) / args.warmup
        frac = (s - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    per = args.batch // len(domains)
    log = open(args.ckpt / "log.jsonl", "a")
    t0, tokens0 = time.time(), step
    model.train()
    while step < args.steps:
        rows = []
        for d in domains:
            starts = torch.randint(0, data[d].numel() - args.seqlen - 1, (per,), generator=gen)
            rows += [data[d][s : s + args.seqlen].long() for s in starts.tolist()]
        batch = torch.stack(rows)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        out = model(input_ids=batch)
        lm = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
        aux = per_layer_balance_loss(out.router_logits, config.num_experts_per_tok)
        loss = lm + config.router_aux_loss_coef * aux
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        rec = {"step": step, "loss": round(lm.item(), 4), "aux": round(aux.item(), 4), "lr": lr_at(step - 1)}
        if step % 10 == 0:
            rate = (step - tokens0) * args.batch * args.seqlen / (time.time() - t0)
            rec["tok_s"] = round(rate)
            print(json.dumps(rec), flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            rec["val_ppl"] = validate(model, val)
            print(json.dumps({"step": step, "val_ppl": rec["val_ppl"]}), flush=True)
        log.write(json.dumps(rec) + "\n")
        log.flush()
        if step % args.save_every == 0 or step == args.steps:
            tmp = args.ckpt / "state.tmp"
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "step": step}, tmp)
            tmp.replace(state_path)

    if args.export:
        model.config.output_router_logits = False
        model.config._experts_implementation = None
        model.to(torch.bfloat16).save_pretrained(args.export)
        tok.save_pretrained(args.export)
        print(f"exported to {args.export}")


if __name__ == "__main__":
    main()
