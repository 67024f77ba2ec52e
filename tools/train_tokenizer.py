"""Train the bundled model's byte-level BPE tokenizer on the corpus' train split (equal chars per domain).

    python tools/train_tokenizer.py --corpus /work/cache/corpus --vocab 8192 --out /work/cache/tokenizer
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"


def domain_texts(corpus: Path, chars_per_domain: int):
    for domain in sorted(p for p in corpus.iterdir() if p.is_dir()):
        used = 0
        with open(domain / "train.jsonl", encoding="utf-8") as f:
            for line in f:
                text = json.loads(line)["text"]
                yield text
                used += len(text)
                if used >= chars_per_domain:
                    break


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--chars-per-domain", type=int, default=3_500_000)
    args = ap.parse_args()

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=[EOS], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True)
    tok.train_from_iterator(domain_texts(args.corpus, args.chars_per_domain), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                   pad_token=EOS)
    fast.save_pretrained(args.out)
    print(f"vocab={tok.get_vocab_size()} saved to {args.out}")


if __name__ == "__main__":
    main()
