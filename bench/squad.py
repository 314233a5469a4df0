"""SQuAD features and decoding against HF run_qa's, the trivial baselines, and the GPU recipe's expected time.

1. Windows: recipes/squad.py's `build_windows` (one `tokenizers` batch call, answers located by binary search
   over the context pieces' offsets) against run_qa's `prepare_train_features` (transformers' BertTokenizerFast
   with `return_overflowing_tokens`/`return_offsets_mapping`, then its per-window Python loop), same tokenizer,
   questions, max_len and doc_stride: windows/s, and whether both give the same windows and start/end labels.
2. Decoding: our exact n-best pairs per window (a banded (S, S) score matrix on the tensors, top-k) against
   run_qa's `postprocess_qa_predictions` (top-n starts x top-n ends, filtered in Python), on the same logits:
   questions/s and how often both pick the same answer (ours never scores lower: it searches every pair).
3. The trivial baselines on the dev articles (38-47): the context's first k words, its first sentence.
4. The GPU recipe (recipes/finetune/squad.yaml, BERT-base) from the FLOPs of its real windows: 6 x parameters x
   tokens for the matrix products plus the attention scores, at a stated sustained rate.

    .venv/bin/python bench/squad.py                       # the 30k Wikipedia vocabulary, windows of 384
    .venv/bin/python bench/squad.py --questions 2000 --gpu-tflops 400
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.model import BertForPreTraining, from_preset
from recipes.squad import (
    Answers,
    SpanCollator,
    SpanSettings,
    answer_chars,
    build_windows,
    cut_questions,
    read_squad,
    top_spans,
    trivial_baselines,
)
from recipes.tasks import WordPieceEncoder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_dir, ensure_wiki_vocab, table  # noqa: E402


def hf_windows(examples, vocab: Path, settings: SpanSettings, questions: list[str]) -> list[dict]:
    """run_qa's prepare_train_features, as written there (the answer's characters: ours, whitespace stripped)."""
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast.from_pretrained(vocab)
    enc = tok(questions, [ex.context for ex in examples], truncation="only_second", max_length=settings.max_len,
              stride=settings.doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True, padding=False)
    out = []
    for i, offsets in enumerate(enc["offset_mapping"]):
        ids, sequence_ids = enc["input_ids"][i], enc.sequence_ids(i)
        start_char, end_char = answer_chars(examples[enc["overflow_to_sample_mapping"][i]])
        token_start = 0
        while sequence_ids[token_start] != 1:
            token_start += 1
        token_end = len(ids) - 1
        while sequence_ids[token_end] != 1:
            token_end -= 1
        if not (offsets[token_start][0] <= start_char and offsets[token_end][1] >= end_char):
            start = end = ids.index(tok.cls_token_id)
        else:
            while token_start < len(offsets) and offsets[token_start][0] <= start_char:
                token_start += 1
            start = token_start - 1
            while offsets[token_end][1] >= end_char:
                token_end -= 1
            end = token_end + 1
        out.append({"input_ids": ids, "start_position": start, "end_position": end})
    return out


def hf_decode(features: list[dict], logits: list[np.ndarray], n_best: int, max_answer_len: int) -> dict[str, str]:
    """run_qa's postprocess_qa_predictions (utils_qa.py) for v1.1: top-n starts x top-n ends per window."""
    best: dict[str, tuple[float, str]] = {}
    for f, (start_logits, end_logits) in zip(features, logits, strict=True):
        ex, first, offsets = f["example"], f["context_start"], f["offsets"]
        for s in np.argsort(start_logits)[-1:-n_best - 1:-1].tolist():
            for e in np.argsort(end_logits)[-1:-n_best - 1:-1].tolist():
                if not (first <= s < first + len(offsets) and first <= e < first + len(offsets)):
                    continue  # outside the context (offsets None in run_qa)
                if e < s or e - s + 1 > max_answer_len:
                    continue
                score = float(start_logits[s] + end_logits[e])
                if score > best.get(ex.id, (-np.inf, ""))[0]:
                    best[ex.id] = (score, ex.context[offsets[s - first, 0]:offsets[e - first, 1]])
    return {qid: text for qid, (_, text) in best.items()}


def trivial(examples) -> list[dict]:
    return [{"baseline": name, "EM": f"{s['exact_match']:.2f}", "F1": f"{s['f1']:.2f}"}
            for name, s in trivial_baselines(examples, ks=(1, 2, 3, 5, 8)).items()]


def gpu_estimate(features: list[dict], tflops: float, epochs: int = 2) -> dict:
    """BERT-base's training FLOPs over these windows (padded to the longest of each batch of 32, in a random order)
    and the time at `tflops` sustained."""
    config = from_preset("base", 30522)
    model = BertForPreTraining(config)
    params = sum(p.numel() for name, p in model.named_parameters() if not name.startswith(("cls.", "bert.embeddings")))
    lengths = np.array([len(f["input_ids"]) for f in features])
    np.random.default_rng(0).shuffle(lengths)
    batches = [(len(b), int(b.max())) for b in np.array_split(lengths, max(1, len(lengths) // 32))]
    padded = sum(n * width for n, width in batches)
    layers, hidden = config.num_hidden_layers, config.hidden_size
    # forward + backward = 3 x forward: 2 FLOPs per weight and token, and QK^T and AV (2 x 2 S H per token a layer)
    flops = epochs * sum(n * width * 6 * params + n * 12 * layers * hidden * width ** 2 for n, width in batches)
    return {"windows": len(features), "tokens (padded)": padded, "PFLOP": f"{flops / 1e15:.2f}",
            f"seconds at {tflops:.0f} TFLOP/s": f"{flops / (tflops * 1e12):.0f}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=3000, help="training questions windowed by both")
    parser.add_argument("--max-len", type=int, default=384)
    parser.add_argument("--doc-stride", type=int, default=128)
    parser.add_argument("--gpu-tflops", type=float, default=300.0, help="sustained bf16 rate for the estimate")
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = data_dir() / "finetune" / "squad" / "dev-v1.1.json"
    train, dev = read_squad(f"{path}#articles=0-37"), read_squad(f"{path}#articles=38-47")
    vocab = ensure_wiki_vocab()
    encoder = WordPieceEncoder(vocab)
    settings = SpanSettings(args.max_len, args.doc_stride, 64, 30, 20).check()
    examples = train[:args.questions]

    start = time.perf_counter()
    ours = build_windows(examples, encoder, settings)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs = hf_windows(examples, vocab, settings, cut_questions(encoder, [ex.question for ex in examples], 64))
    theirs_s = time.perf_counter() - start
    same_ids = len(ours) == len(theirs) and all(o["input_ids"].tolist() == t["input_ids"]
                                                for o, t in zip(ours, theirs, strict=True))
    same_labels = sum((o["start_position"], o["end_position"]) == (t["start_position"], t["end_position"])
                      for o, t in zip(ours, theirs, strict=False))
    print(f"windows of {len(examples):,} training questions (max_len {args.max_len}, doc_stride {args.doc_stride}):")
    print(table([{"": "bertpipe build_windows", "windows": len(ours), "seconds": f"{ours_s:.2f}",
                  "windows/s": f"{len(ours) / ours_s:.0f}"},
                 {"": "run_qa prepare_train_features", "windows": len(theirs), "seconds": f"{theirs_s:.2f}",
                  "windows/s": f"{len(theirs) / theirs_s:.0f}"}], ["", "windows", "seconds", "windows/s"]))
    print(f"same ids: {same_ids}; same start/end labels: {same_labels}/{len(ours)}; "
          f"speed ratio {theirs_s / ours_s:.2f}x\n")

    # decoding: a random tiny BERT's logits are flat; sharpen them so the n-best lists are not ties
    features = build_windows(dev, encoder, settings)
    generator = torch.Generator().manual_seed(0)
    batches = [SpanCollator(encoder.pad_id)(features[i:i + 32]) for i in range(0, len(features), 32)]
    logits = [torch.randn(*b["input_ids"].shape, 2, generator=generator) * 3 for b in batches]
    contexts = []  # run_qa lets an answer start and end at any context piece: so does ours here
    for b in batches:
        context = torch.zeros_like(b["start_mask"])
        for row, i in enumerate(b["index"].tolist()):
            context[row, features[i]["context_start"]:features[i]["context_start"] + len(features[i]["offsets"])] = 1
        contexts.append(context)
    start = time.perf_counter()
    answers = Answers(settings.n_best)
    for b, lg, context in zip(batches, logits, contexts, strict=True):
        masked = lg.masked_fill(b["attention_mask"][..., None] == 0, -1e4)
        answers.add([features[i] for i in b["index"].tolist()],
                    *top_spans(masked[..., 0], masked[..., 1], context, context, 20, 30))
    ours_text, ours_s = answers.texts(), time.perf_counter() - start
    flat = [(lg[i, :len(features[j]["input_ids"]), 0].numpy(), lg[i, :len(features[j]["input_ids"]), 1].numpy())
            for b, lg in zip(batches, logits, strict=True) for i, j in enumerate(b["index"].tolist())]
    start = time.perf_counter()
    theirs_text = hf_decode(features, flat, 20, 30)
    theirs_s = time.perf_counter() - start
    agree = sum(ours_text[q] == theirs_text.get(q) for q in ours_text)
    print(f"decoding {len(dev):,} dev questions ({len(features):,} windows), n_best 20, max_answer_len 30:")
    print(table([{"": "bertpipe top_spans + Answers", "seconds": f"{ours_s:.2f}",
                  "questions/s": f"{len(dev) / ours_s:.0f}"},
                 {"": "run_qa postprocess_qa_predictions", "seconds": f"{theirs_s:.2f}",
                  "questions/s": f"{len(dev) / theirs_s:.0f}"}], ["", "seconds", "questions/s"]))
    print(f"same answer: {agree}/{len(dev)}; speed ratio {theirs_s / ours_s:.2f}x\n")

    print("trivial baselines on articles 38-47 (1,988 questions):")
    print(table(trivial(dev), ["baseline", "EM", "F1"]) + "\n")

    all_train = build_windows(train, encoder, settings)
    print(f"GPU recipe (BERT-base, 2 epochs over articles 0-37, batch 32, windows of {args.max_len}):")
    estimate = gpu_estimate(all_train, args.gpu_tflops)
    print(table([estimate], list(estimate)))


if __name__ == "__main__":
    main()
