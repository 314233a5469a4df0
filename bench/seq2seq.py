"""The seq2seq recipe's speed on real Multi30k batches, CPU: training target tokens/s (forward, backward and an
AdamW step) of the GRU encoder-decoder with Bahdanau or Luong attention against the same network without
attention and against torch's nn.Transformer of similar size; then decoding sentences/s, greedy against beam 4.

    .venv/bin/python bench/seq2seq.py --batch 64 --hidden 256 --threads 1

The networks are untrained, so decoding runs every sentence to the length limit (`--decode-len` new pieces,
about twice a Multi30k caption): the decoding rows compare the cost per step, not a finished translation.
Vocabularies: build/vocab/multi30k-{en,de} (the recipes'), built here if missing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from recipes.base import RnnConfig, Seq2seqConfig
from recipes.seq2seq import PairCollator, PairEncoder, Seq2seq, encode_pairs
from recipes.tasks import WordPieceEncoder, get_task

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, data_dir, table  # noqa: E402


class TransformerBaseline(nn.Module):
    """nn.Transformer with learned positions, the same embeddings width and output head as the RNNs."""

    def __init__(self, src_vocab: int, tgt_vocab: int, dim: int, layers: int, max_len: int = 128):
        super().__init__()
        self.src_embed, self.tgt_embed = nn.Embedding(src_vocab, dim), nn.Embedding(tgt_vocab, dim)
        self.position = nn.Embedding(max_len, dim)
        self.transformer = nn.Transformer(dim, nhead=4, num_encoder_layers=layers, num_decoder_layers=layers,
                                          dim_feedforward=4 * dim, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, tgt_vocab)

    def forward(self, input_ids, attention_mask, target_ids):
        tgt = target_ids[:, :-1]
        pos_s, pos_t = torch.arange(input_ids.size(1)), torch.arange(tgt.size(1))
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.size(1))
        out = self.transformer(self.src_embed(input_ids) + self.position(pos_s), self.tgt_embed(tgt) +
                               self.position(pos_t), tgt_mask=causal, src_key_padding_mask=attention_mask == 0,
                               memory_key_padding_mask=attention_mask == 0)
        return self.head(out), None


def vocabularies() -> PairEncoder:
    dirs = {lang: ROOT / "build" / "vocab" / f"multi30k-{lang}" for lang in ("en", "de")}
    for lang, out in dirs.items():
        if not (out / "tokenizer.json").exists():
            from pipeline.cli import main as bertpipe

            bertpipe(["vocab", "--config", str(ROOT / f"recipes/vocab/multi30k-{lang}.yaml"), f"output_dir={out}",
                      "--quiet"])
    return PairEncoder(WordPieceEncoder(dirs["en"]), WordPieceEncoder(dirs["de"]))


def train_step_seconds(net: nn.Module, batches: list[dict], repeats: int) -> float:
    """Median seconds of one training step over `repeats` batches, after one warm-up step."""
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net.train()
    times = []
    for i in range(repeats + 1):
        batch = batches[i % len(batches)]
        start = time.perf_counter()
        logits, _ = net(batch["input_ids"], batch["attention_mask"], batch["target_ids"])
        target = batch["target_ids"][:, 1:].masked_fill(batch["target_mask"][:, 1:] == 0, -100)
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64, help="sentence pairs per batch")
    parser.add_argument("--hidden", type=int, default=256, help="RNN hidden size per direction; Transformer width")
    parser.add_argument("--embed", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="training steps measured per model")
    parser.add_argument("--decode-batches", type=int, default=2, help="batches decoded per decoder")
    parser.add_argument("--decode-len", type=int, default=30, help="new pieces per sentence when decoding")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    encoder = vocabularies()
    examples = get_task("multi30k").read(data_dir() / "finetune" / "multi30k" / "train")[:args.batch * 8]
    features = encode_pairs(examples, encoder, 64)
    collate = PairCollator(encoder.source.pad_id, encoder.target.pad_id)
    batches = [collate(features[i:i + args.batch]) for i in range(0, len(features), args.batch)]
    sizes = (encoder.source.vocab_size, encoder.target.vocab_size, encoder.source.pad_id, encoder.target.pad_id)
    rnn = RnnConfig(cell="gru", hidden=args.hidden, embed_dim=args.embed, bidirectional=True)
    models = {
        "biGRU, no attention": Seq2seq(*sizes, rnn, Seq2seqConfig(attention="none")),
        "biGRU + Bahdanau": Seq2seq(*sizes, rnn, Seq2seqConfig(attention="bahdanau")),
        "biGRU + Luong": Seq2seq(*sizes, rnn, Seq2seqConfig(attention="luong")),
        "nn.Transformer 3+3": TransformerBaseline(encoder.source.vocab_size, encoder.target.vocab_size,
                                                  args.hidden, 3),
    }
    rows = []
    for name, net in models.items():
        seconds = train_step_seconds(net, batches, args.repeats)
        tokens = sum(int(b["target_mask"][:, 1:].sum()) for b in batches) / len(batches)  # mean per batch
        rows.append({"training": name, "params": f"{sum(p.numel() for p in net.parameters()) / 1e6:.1f}M",
                     "ms/step": f"{seconds * 1000:.0f}", "target tokens/s": f"{tokens / seconds:,.0f}"})
    base = float(rows[0]["ms/step"])
    for row in rows:
        row["vs no attention"] = f"{float(row['ms/step']) / base:.2f}x time"

    net = models["biGRU + Bahdanau"].eval()
    bos, eos = encoder.target.prefix[0], encoder.target.suffix[0]
    net.cfg.max_len_ratio = 100.0  # the limit is --decode-len for every sentence
    decoding = []
    for name, beam in (("greedy", 1), ("beam 4", 4), ("beam 8", 8)):
        start, sentences = time.perf_counter(), 0
        for batch in batches[:args.decode_batches]:
            inputs = (batch["input_ids"], batch["attention_mask"], bos, eos)
            if beam == 1:
                net.greedy(*inputs, max_new_tokens=args.decode_len)
            else:
                net.beam_search(*inputs, beam=beam, max_new_tokens=args.decode_len)
            sentences += batch["input_ids"].size(0)
        seconds = time.perf_counter() - start
        decoding.append({"decoding (biGRU + Bahdanau)": name, "sentences/s": f"{sentences / seconds:.1f}",
                         "ms/sentence": f"{seconds / sentences * 1000:.1f}"})
    greedy = float(decoding[0]["ms/sentence"])
    for row in decoding:
        row["vs greedy"] = f"{float(row['ms/sentence']) / greedy:.2f}x time"
    print(f"Multi30k train pairs, batch {args.batch} (mean {tokens:.0f} target tokens), hidden {args.hidden}, "
          f"embed {args.embed}, {args.threads} thread(s), torch {torch.__version__}; decoding {args.decode_len} "
          f"pieces per sentence, {sentences} sentences")
    print(table(rows, ["training", "params", "ms/step", "target tokens/s", "vs no attention"]))
    print()
    print(table(decoding, ["decoding (biGRU + Bahdanau)", "sentences/s", "ms/sentence", "vs greedy"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
