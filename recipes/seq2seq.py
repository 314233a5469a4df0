"""An RNN encoder-decoder for translation: the `seq2seq` model kind of recipes/base.py (task kind "translate").

The encoder reads the source sentence: an RNN over WordPiece embeddings (recipes/rnn.py's `Recurrent`, GRU or
LSTM, optionally bidirectional), or a pretrained BERT (`model.encoder`). The decoder is a unidirectional RNN of
the same cell that writes the target sentence piece by piece, from [CLS] (begin) to [SEP] (end).

- `attention: none` (Sutskever et al. 2014): the encoder's final state is the only context; it initializes the
  decoder. A bidirectional encoder's two directions are concatenated per layer and bridged to the decoder's
  size by a linear layer (with tanh); a BERT's [CLS] state is projected to every decoder layer the same way.
- `bahdanau` (additive, Bahdanau et al. 2015): before each step, the previous decoder state scores every
  encoder output, v^T tanh(W_q s_{t-1} + W_k h_j); their softmax-weighted sum (the context) joins the input.
- `luong` ("general" multiplicative, Luong et al. 2015): after each step, the new state scores s_t^T W h_j;
  the output is tanh(W_c [s_t; c_t]). It needs no per-step loop when the gold targets are fed, so it trains
  as fast as plain teacher forcing.

Source padding gets zero attention weight (masked before the softmax). Training feeds the gold previous token
with probability `teacher_forcing` and the model's own argmax otherwise (scheduled sampling at a constant
rate). Decoding is greedy or a batched beam search; beam scores are summed log-probabilities divided by GNMT's
length penalty ((5 + |Y|) / 6) ** alpha (Wu et al. 2016; alpha 0 = raw log-probability), |Y| counting the
generated pieces with the end token. A sentence's search stops once `beam` hypotheses have ended (among the
top `beam` candidates of a step, as in fairseq) and the best live one, scored as if it ended now, cannot beat
the best ended one (HF's `early_stopping=False` rule), or at its length limit: `max_len_ratio` * source pieces
+ 10, at most `max_new_tokens`. With a beam of 1 this is exactly greedy decoding. BLEU is sacrebleu's corpus
BLEU of the detokenized output against the raw reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import sacrebleu
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from pipeline.errors import BertpipeError
from recipes.base import Built, FinetuneConfig, RnnConfig, Seq2seqConfig, TaskModule, TrainerConfig, tokenizer_files
from recipes.rnn import FUSED, Embeddings, Recurrent, State
from recipes.tasks import PairExample, TaskDataModule, TaskSpec, WordPieceEncoder, encode_text

log = logging.getLogger(__name__)

NO_SPACE_BEFORE = set(".,;:!?)]}%“”’'-/")  # detokenization: these attach to the word before them ...
NO_SPACE_AFTER = set("([{„‚‘'-/")  # ... and these to the word after them; `"` alternates opening and closing


# ---- vocabularies and detokenization ---------------------------------------------------------------------


class PairEncoder:
    """The source and the target vocabularies, saved side by side (model/source/, model/target/).

    TextEncoder's attributes are the source side's: the data side encodes sources like any other text.
    """

    def __init__(self, source: WordPieceEncoder, target: WordPieceEncoder):
        self.source, self.target = source, target
        self.pad_id, self.unk_id, self.vocab_size = source.pad_id, source.unk_id, source.vocab_size
        self.prefix, self.suffix = source.prefix, source.suffix

    @classmethod
    def load(cls, directory: Path) -> PairEncoder:
        return cls(WordPieceEncoder(directory / "source"), WordPieceEncoder(directory / "target"))

    def pieces(self, texts: list[str]) -> list[list[int]]:
        return self.source.pieces(texts)

    def save(self, directory: Path) -> None:
        for name, encoder in (("source", self.source), ("target", self.target)):
            (directory / name).mkdir(parents=True, exist_ok=True)
            encoder.save(directory / name)


def detokenize(tokens: list[str]) -> str:
    """WordPiece tokens back to text: `##` pieces joined to their word, punctuation attached by its usual side.

    BERT's pre-tokenizer split every punctuation mark off, so the spaces around it are a guess: none before
    `.,;:!?)` and closing quotes, none after `(` and opening quotes, none around `-`, `/` and `'` (Multi30k's
    hyphens are inside words: `T-Shirt`).
    """
    words: list[str] = []
    for token in tokens:
        if token.startswith("##"):  # a continuation; an untrained decoder may start with one
            words[-1:] = ["".join(words[-1:]) + token[2:]]
        else:
            words.append(token)
    text, glue, quotes = "", True, 0
    for word in words:
        if word == '"':
            opening = quotes % 2 == 0
            quotes += 1
            text += ("" if glue or not opening else " ") + word
            glue = opening
            continue
        text += ("" if glue or word in NO_SPACE_BEFORE else " ") + word
        glue = word in NO_SPACE_AFTER
    return text


def decode_ids(encoder: WordPieceEncoder, ids: list[int]) -> str:
    """A decoder's output ids as text: up to the end token, specials and unused slots other than [UNK] dropped."""
    end = encoder.suffix[0]
    ids = ids[:ids.index(end)] if end in ids else ids
    specials = set(encoder.special.reserved) - {encoder.unk_id}
    return detokenize([encoder.tokenizer.id_to_token(i) for i in ids if i not in specials])


# ---- the network -----------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Queries (B, T, Q) against encoder outputs (B, S, M): masked softmax weights (B, T, S), contexts (B, T, M).

    bahdanau: v^T tanh(W_q q + W_k h_j) (additive); luong: q^T W_k h_j ("general"). W_k h_j is computed once
    per sentence (`keys`), not once per step.
    """

    def __init__(self, kind: str, query_dim: int, memory_dim: int, dim: int):
        super().__init__()
        self.kind = kind
        self.key = nn.Linear(memory_dim, dim if kind == "bahdanau" else query_dim, bias=False)
        if kind == "bahdanau":
            self.query = nn.Linear(query_dim, dim)
            self.v = nn.Linear(dim, 1, bias=False)

    def keys(self, memory: torch.Tensor) -> torch.Tensor:
        return self.key(memory)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "bahdanau":
            scores = self.v(torch.tanh(self.query(query)[:, :, None] + keys[:, None])).squeeze(-1)
        else:
            scores = query @ keys.transpose(1, 2)
        weights = scores.float().masked_fill(~mask[:, None], -math.inf).softmax(-1).to(memory.dtype)
        return weights @ memory, weights


@dataclass
class Encoded:
    """What the decoder reads: encoder outputs (B, S, M), their attention keys, the source mask, the first state."""

    memory: torch.Tensor
    keys: torch.Tensor | None
    mask: torch.Tensor  # (B, S) bool, True on real source pieces
    state: State  # (layers, B, H), or (h, c) for the LSTM

    def select(self, index: torch.Tensor) -> Encoded:
        """Rows `index` of everything (beam search: each sentence repeated once per hypothesis)."""
        state = tuple(s[:, index] for s in self.state) if isinstance(self.state, tuple) else self.state[:, index]
        keys = None if self.keys is None else self.keys[index]
        return Encoded(self.memory[index], keys, self.mask[index], state)


def _top(state: State) -> torch.Tensor:
    """The last layer's hidden state (B, H)."""
    return (state[0] if isinstance(state, tuple) else state)[-1]


def _reorder(state: State, index: torch.Tensor) -> State:
    return tuple(s[:, index] for s in state) if isinstance(state, tuple) else state[:, index]


def length_penalty(length: int, alpha: float) -> float:
    """GNMT's lp(Y) = ((5 + |Y|) / 6) ** alpha: a beam score is log P(Y|X) / lp(Y)."""
    return ((5 + length) / 6) ** alpha


class Seq2seq(nn.Module):
    """Encoder (RNN or BERT) -> bridge -> RNN decoder with optional attention -> next-piece logits."""

    def __init__(self, src_vocab: int, tgt_vocab: int, src_pad: int, tgt_pad: int, rnn: RnnConfig,
                 cfg: Seq2seqConfig, bert: nn.Module | None = None):
        super().__init__()
        self.rnn_cfg, self.cfg, self.tgt_vocab = rnn, cfg, tgt_vocab
        hidden, layers, embed = rnn.hidden, rnn.layers, rnn.embed_dim
        if bert is None:
            self.embed = Embeddings(src_vocab, src_pad, embed)
            self.encoder = Recurrent(rnn, embed)
            memory_dim = self.encoder.output_size
            self.bridge = nn.Linear(2 * hidden, hidden) if rnn.bidirectional else None  # per layer
        else:
            bert.pooler = nn.Identity()  # unused parameters would stall DDP
            self.bert = bert
            memory_dim = bert.config.hidden_size
            self.bridge = nn.Linear(memory_dim, layers * hidden)  # [CLS] -> every decoder layer's first state
        self.tgt_embed = nn.Embedding(tgt_vocab, embed, padding_idx=tgt_pad)
        feed = memory_dim if cfg.attention == "bahdanau" else 0  # Bahdanau's context joins the decoder input
        self.decoder = FUSED[rnn.cell](embed + feed, hidden, layers, batch_first=True,
                                       dropout=rnn.dropout if layers > 1 else 0.0)
        if cfg.attention != "none":
            self.attention = Attention(cfg.attention, hidden, memory_dim, hidden)
            self.combine = nn.Linear(hidden + memory_dim, hidden)
        self.dropout = nn.Dropout(rnn.dropout)
        self.head = nn.Linear(hidden, tgt_vocab)
        self.register_buffer("never", torch.zeros(tgt_vocab, dtype=torch.bool), persistent=False)

    def never_generate(self, target: WordPieceEncoder) -> Seq2seq:
        """Keep decoding off the target vocabulary's specials and [unusedN] slots, wherever its layout has them
        (Google's reserves about a thousand ids); [UNK] and the end token stay."""
        self.never.zero_()
        self.never[sorted(set(target.special.reserved) - {target.unk_id, target.suffix[0]})] = True
        return self

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Encoded:
        mask = attention_mask.bool()
        layers, hidden = self.rnn_cfg.layers, self.rnn_cfg.hidden
        if hasattr(self, "bert"):
            memory = self.bert(input_ids, torch.zeros_like(input_ids), attention_mask).last_hidden_state
            h = torch.tanh(self.bridge(memory[:, 0])).view(-1, layers, hidden).transpose(0, 1).contiguous()
            state: State = (h, torch.zeros_like(h)) if self.rnn_cfg.cell == "lstm" else h
        else:
            memory, final = self.encoder(self.dropout(self.embed(input_ids)), attention_mask.sum(1))
            state = final
            if self.bridge is not None:  # (layers * 2, B, H): each layer's two directions -> (layers, B, H)
                def bridge(s: torch.Tensor) -> torch.Tensor:
                    both = s.view(layers, 2, s.size(1), hidden).permute(0, 2, 1, 3).flatten(2)
                    return torch.tanh(self.bridge(both))

                state = tuple(bridge(s) for s in final) if isinstance(final, tuple) else bridge(final)
        keys = self.attention.keys(memory) if self.cfg.attention != "none" else None
        return Encoded(memory, keys, mask, state)

    def _output(self, out: torch.Tensor, enc: Encoded, context: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decoder outputs (B, T, H) -> logits (B, T, V) and attention weights (B, T, S) (luong computes them)."""
        weights = None
        if self.cfg.attention == "luong":
            context, weights = self.attention(out, enc.keys, enc.memory, enc.mask)
        if context is not None:
            out = torch.tanh(self.combine(torch.cat([out, context], -1)))
        return self.head(self.dropout(out)), weights

    def step(self, tokens: torch.Tensor, state: State, enc: Encoded
             ) -> tuple[torch.Tensor, State, torch.Tensor | None]:
        """One decoder step: previous pieces (N,) -> logits (N, V), the new state, attention weights (N, S)."""
        x = self.dropout(self.tgt_embed(tokens))[:, None]
        context = weights = None
        if self.cfg.attention == "bahdanau":
            context, weights = self.attention(_top(state)[:, None], enc.keys, enc.memory, enc.mask)
            x = torch.cat([x, context], -1)
        out, state = self.decoder(x, state)
        logits, luong = self._output(out, enc, context)
        weights = luong if weights is None else weights
        return logits[:, 0], state, None if weights is None else weights[:, 0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_ids: torch.Tensor,
                teacher_forcing: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T - 1, V) for target positions 1.. given the pieces before each, and attention (B, T-1, S).

        With every gold token fed and no attention before the step, the decoder runs over the whole target at
        once (torch's fused RNN); otherwise step by step, each input the gold token with probability
        `teacher_forcing`, else the previous step's argmax.
        """
        enc = self.encode(input_ids, attention_mask)
        inputs = target_ids[:, :-1]
        if teacher_forcing >= 1 and self.cfg.attention != "bahdanau":
            out, _ = self.decoder(self.dropout(self.tgt_embed(inputs)), enc.state)
            return self._output(out, enc)
        return self.stepwise(inputs, enc, teacher_forcing)

    def stepwise(self, inputs: torch.Tensor, enc: Encoded, teacher_forcing: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        state, token, logits, weights = enc.state, inputs[:, 0], [], []
        for t in range(inputs.size(1)):
            step_logits, state, step_weights = self.step(token, state, enc)
            logits.append(step_logits)
            weights.append(step_weights)
            if t + 1 < inputs.size(1):
                token = inputs[:, t + 1]
                if teacher_forcing < 1:  # scheduled sampling: some inputs are the model's own guesses
                    own = step_logits.detach().argmax(-1)
                    gold = torch.rand(token.shape, device=token.device) < teacher_forcing
                    token = torch.where(gold, token, own)
        stacked = None if weights[0] is None else torch.stack(weights, 1)
        return torch.stack(logits, 1), stacked

    # ---- decoding --------------------------------------------------------------------------------------

    def limits(self, attention_mask: torch.Tensor, max_new_tokens: int | None = None) -> list[int]:
        """Each sentence's length limit: max_len_ratio * source pieces + 10, at most max_new_tokens."""
        cap = max_new_tokens or self.cfg.max_new_tokens
        return [min(cap, int(self.cfg.max_len_ratio * n) + 10) for n in attention_mask.sum(1).tolist()]

    @torch.no_grad()
    def greedy(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, bos: int, eos: int,
               max_new_tokens: int | None = None) -> list[list[int]]:
        """The most likely next piece at every step, until the end token or the length limit."""
        limits = self.limits(attention_mask, max_new_tokens)
        enc = self.encode(input_ids, attention_mask)
        state, token = enc.state, torch.full((input_ids.size(0),), bos, device=input_ids.device)
        steps, done = [], torch.zeros_like(token, dtype=torch.bool)
        limit = torch.tensor(limits, device=token.device)
        for t in range(max(limits)):
            logits, state, _ = self.step(token, state, enc)
            token = logits.masked_fill(self.never, -math.inf).argmax(-1)
            steps.append(token)
            done |= (token == eos) | (t + 1 >= limit)
            if done.all():
                break
        out = torch.stack(steps, 1).tolist()
        return [row[:n][:row.index(eos) + 1] if eos in row[:n] else row[:n] for row, n in zip(out, limits,
                                                                                                strict=True)]

    @torch.no_grad()
    def beam_search(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, bos: int, eos: int,
                    beam: int | None = None, max_new_tokens: int | None = None,
                    alpha: float | None = None) -> list[list[int]]:
        """Batched beam search: each sentence keeps `beam` live hypotheses (rows b * beam ...), ranked by summed
        log-probability; ended ones are scored by log P / GNMT's length penalty, the best of them returned."""
        k = beam or self.cfg.beam
        alpha = self.cfg.length_penalty if alpha is None else alpha
        limits = self.limits(attention_mask, max_new_tokens)
        batch, device = input_ids.size(0), input_ids.device
        enc = self.encode(input_ids, attention_mask).select(torch.arange(batch, device=device).repeat_interleave(k))
        state = enc.state
        scores = torch.full((batch, k), -math.inf, device=device)
        scores[:, 0] = 0.0  # one live hypothesis at first: k copies would fill the beam with duplicates
        token = torch.full((batch * k,), bos, device=device)
        history = torch.zeros(batch * k, 0, dtype=torch.long, device=device)
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
        done = [False] * batch
        for t in range(max(limits)):
            logits, state, _ = self.step(token, state, enc)
            logp = F.log_softmax(logits.float().masked_fill(self.never, -math.inf), -1)
            vocab = logp.size(-1)
            total = (scores.view(-1, 1) + logp).view(batch, k * vocab)
            top_scores, top_index = total.topk(min(2 * k, k * vocab), dim=-1)  # 2k: k survive even if k end here
            new_scores = torch.full((batch, k), -math.inf, device=device)
            origin = torch.zeros(batch, k, dtype=torch.long)
            word = torch.full((batch, k), eos, dtype=torch.long)
            candidates = zip(top_scores.tolist(), (top_index // vocab).tolist(), (top_index % vocab).tolist(),
                             strict=True)
            for b, (row_scores, row_origin, row_word) in enumerate(candidates):
                if done[b]:
                    continue
                last, alive = t + 1 >= limits[b], 0
                for rank, (score, o, w) in enumerate(zip(row_scores, row_origin, row_word, strict=True)):
                    if score == -math.inf or alive == k:
                        break
                    if w == eos or last:
                        if rank < k:  # an end among the top k candidates: a finished hypothesis
                            ids = history[b * k + o].tolist() + [w]
                            finished[b].append((score / length_penalty(t + 1, alpha), ids))
                        continue
                    new_scores[b, alive], origin[b, alive], word[b, alive] = score, o, w
                    alive += 1
                # done at the limit, or once k have ended and the best live hypothesis, scored as if it ended
                # now, cannot beat the best ended one (HF's heuristic; with k = 1 exactly greedy decoding)
                best = max(score for score, _ in finished[b]) if finished[b] else -math.inf
                done[b] = last or (len(finished[b]) >= k and float(new_scores[b, 0]) / length_penalty(t + 1, alpha)
                                   <= best)
            if all(done):
                break
            rows = (torch.arange(batch)[:, None] * k + origin).flatten().to(device)
            scores, token = new_scores, word.flatten().to(device)
            history = torch.cat([history[rows], token[:, None]], 1)
            state = _reorder(state, rows)
        return [max(hyps, key=lambda h: h[0])[1] for hyps in finished]


# ---- data ------------------------------------------------------------------------------------------------


@dataclass
class PairCollator:
    """Pads sources and targets; `index` points back at each pair's raw reference in the split."""

    src_pad: int
    tgt_pad: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        sources = [torch.tensor(f["source"]) for f in features]
        targets = [torch.tensor(f["target"]) for f in features]
        input_ids = pad_sequence(sources, batch_first=True, padding_value=self.src_pad)
        target_ids = pad_sequence(targets, batch_first=True, padding_value=self.tgt_pad)
        src_len, tgt_len = torch.tensor([len(s) for s in sources]), torch.tensor([len(t) for t in targets])
        return {"input_ids": input_ids, "token_type_ids": torch.zeros_like(input_ids),
                "attention_mask": (torch.arange(input_ids.size(1))[None] < src_len[:, None]).long(),
                "target_ids": target_ids,
                "target_mask": (torch.arange(target_ids.size(1))[None] < tgt_len[:, None]).long(),
                "index": torch.tensor([f["index"] for f in features])}


def encode_pairs(examples: list[PairExample], encoder: PairEncoder, max_len: int) -> list[dict]:
    """Source ids ([CLS] ... [SEP]) and target ids ([CLS] = begin ... [SEP] = end), each capped at max_len."""
    sources = encoder.source.pieces([ex.source for ex in examples])
    targets = encoder.target.pieces([ex.target for ex in examples])
    return [{"source": encode_text(encoder.source, s, max_len), "target": encode_text(encoder.target, t, max_len),
             "reference": ex.target, "index": i}
            for i, (ex, s, t) in enumerate(zip(examples, sources, targets, strict=True))]


class PairDataModule(TaskDataModule):
    """Batches of sentence pairs: shuffled for training, in file order for evaluation."""

    def encode(self, examples: list[PairExample]) -> list[dict]:
        return encode_pairs(examples, self.encoder, self.max_len)

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return PairCollator(self.encoder.source.pad_id, self.encoder.target.pad_id)(features)


# ---- the task module -------------------------------------------------------------------------------------


def bleu(hypotheses: list[str], references: list[str]) -> float:
    return sacrebleu.corpus_bleu(hypotheses, [references]).score


class TranslationModule(TaskModule):
    """The base's optimizer, schedule and loop with next-piece cross-entropy; dev BLEU from greedy decoding
    after each validation (cheap), evaluate() with the configured beam and with greedy decoding.

    Under DDP each rank's dev BLEU covers its share of the dev split; results.json's comes from one process.
    """

    def __init__(self, net: Seq2seq, spec: TaskSpec, optim: TrainerConfig, target: WordPieceEncoder):
        super().__init__(net, spec, optim)
        self.target = target
        self.hypotheses: list[str] = []
        self.references: list[str] = []

    def new_metrics(self, **kwargs):
        return None  # BLEU is computed from texts, in on_validation_epoch_end and evaluate

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ratio = self.net.cfg.teacher_forcing if self.training else 1.0
        return self.net(batch["input_ids"], batch["attention_mask"], batch["target_ids"], ratio)[0]

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["target_ids"][:, 1:].masked_fill(batch["target_mask"][:, 1:] == 0, -100)

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, -2).float(), self.targets(batch).flatten(), ignore_index=-100)

    def translate_batch(self, batch: dict[str, torch.Tensor], beam: int = 1) -> list[str]:
        bos, eos = self.target.prefix[0], self.target.suffix[0]
        args = (batch["input_ids"], batch["attention_mask"], bos, eos)
        ids = self.net.greedy(*args) if beam == 1 else self.net.beam_search(*args, beam=beam)
        return [decode_ids(self.target, row) for row in ids]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("dev/loss", self.loss(self(batch), batch), batch_size=batch["input_ids"].size(0), sync_dist=True)
        dataset = self.trainer.val_dataloaders.dataset
        self.hypotheses += self.translate_batch(batch)
        self.references += [dataset[i]["reference"] for i in batch["index"].tolist()]

    def on_validation_epoch_end(self) -> None:
        self.log(f"dev/{self.spec.main_metric}", bleu(self.hypotheses, self.references))
        self.hypotheses, self.references = [], []

    @torch.no_grad()
    def evaluate(self, loader, device: torch.device | str = "cpu") -> dict[str, float]:
        """Loss and perplexity per target piece, BLEU with the configured beam and with greedy decoding."""
        self.eval().to(device)
        loss, count, references = 0.0, 0, []
        hypotheses: dict[int, list[str]] = {self.net.cfg.beam: [], 1: []}
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            n = int((self.targets(batch) != -100).sum())
            loss += float(self.loss(self(batch), batch)) * n
            count += n
            references += [loader.dataset[i]["reference"] for i in batch["index"].tolist()]
            for beam, texts in hypotheses.items():
                texts += self.translate_batch(batch, beam)
        loss /= max(count, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
                "bleu": bleu(hypotheses[self.net.cfg.beam], references), "bleu_greedy": bleu(hypotheses[1], references)}


# ---- build and restore (recipes/base.py's model-kind interface) ------------------------------------------


def _check(cfg: FinetuneConfig, spec: TaskSpec) -> None:
    r = cfg.model.rnn
    if spec.kind != "translate":
        raise BertpipeError(f"model.kind=seq2seq translates: task {spec.name} is a {spec.kind} task (use multi30k)")
    if r.explicit or r.truncate_bptt or r.word_vocab or r.init_embeddings:
        raise BertpipeError("model.kind=seq2seq uses WordPiece vocabularies and torch's fused RNNs: unset "
                            "model.rnn.explicit, truncate_bptt, word_vocab and init_embeddings")
    if not cfg.model.seq2seq.tgt_vocab_dir:
        raise BertpipeError("set model.seq2seq.tgt_vocab_dir, the target language's WordPiece vocabulary "
                            "(bertpipe vocab --config recipes/vocab/multi30k-de.yaml)")


def build(cfg: FinetuneConfig, spec: TaskSpec) -> Built:
    _check(cfg, spec)
    m, r, s = cfg.model, cfg.model.rnn, cfg.model.seq2seq
    target = WordPieceEncoder(s.tgt_vocab_dir)
    bert, bert_config, origin = None, None, "random init"
    if m.encoder:
        from recipes.bert import load_encoder, size_name

        # the BERT's own tokenizer for the source side: its embedding rows are indexed by that vocabulary
        bert_cfg = dataclasses.replace(cfg, model=dataclasses.replace(m, kind="bert", preset=None, vocab_dir=None))
        bert, source, _, inputs = load_encoder(bert_cfg)
        bert_config, origin = dataclasses.asdict(bert.config), f"{m.encoder} (BERT {size_name(bert.config)})"
    else:
        if not m.vocab_dir:
            raise BertpipeError("set model.vocab_dir (the source language's WordPiece vocabulary, e.g. "
                                "build/vocab/multi30k-en) or model.encoder (a pretrained BERT)")
        source = WordPieceEncoder(m.vocab_dir)
        inputs = {"tokenizer": tokenizer_files(m.vocab_dir)}
    inputs["target_tokenizer"] = tokenizer_files(s.tgt_vocab_dir)
    net = Seq2seq(source.vocab_size, target.vocab_size, source.pad_id, target.pad_id, r, s, bert)
    encoder_name = "bert" if bert is not None else f"{'bi' if r.bidirectional else ''}{r.cell}"
    describe = {"kind": "seq2seq", "size": f"{encoder_name}-{r.cell}-L{r.layers}-H{r.hidden}-{s.attention}",
                "cell": r.cell, "layers": r.layers, "hidden": r.hidden, "bidirectional": r.bidirectional,
                "embed_dim": r.embed_dim, "attention": s.attention, "beam": s.beam, "length_penalty": s.length_penalty,
                "teacher_forcing": s.teacher_forcing, "src_vocab_size": source.vocab_size,
                "tgt_vocab_size": target.vocab_size, "encoder": origin}
    meta = {"rnn": dataclasses.asdict(r), "seq2seq": dataclasses.asdict(s), "src_vocab_size": source.vocab_size,
            "tgt_vocab_size": target.vocab_size, "src_pad": source.pad_id, "tgt_pad": target.pad_id,
            "bert_config": bert_config}
    return Built(net.never_generate(target), PairEncoder(source, target), meta, describe, inputs)


def task_module(built: Built, spec: TaskSpec, cfg: FinetuneConfig) -> TranslationModule:
    return TranslationModule(built.net, spec, cfg.trainer, built.encoder.target)


def data_module(splits: dict[str, list], built: Built, cfg: FinetuneConfig) -> PairDataModule:
    return PairDataModule(splits, built.encoder, cfg.task.max_len, cfg.trainer.batch_size, cfg.trainer.num_workers)


def restore(meta: dict, directory: Path) -> tuple[nn.Module, PairEncoder]:
    bert = None
    if meta["bert_config"]:
        from pipeline.model import BertConfig, BertModel

        bert = BertModel(BertConfig(**meta["bert_config"]))
    net = Seq2seq(meta["src_vocab_size"], meta["tgt_vocab_size"], meta["src_pad"], meta["tgt_pad"],
                  RnnConfig(**meta["rnn"]), Seq2seqConfig(**meta["seq2seq"]), bert)
    encoder = PairEncoder.load(directory)
    return net.never_generate(encoder.target), encoder


# ---- bertpipe translate ----------------------------------------------------------------------------------


def translate(run: str | Path, sentences: list[str], beam: int | None = None, max_new_tokens: int | None = None,
              batch_size: int = 32) -> list[str]:
    """Translations of `sentences` by a finished seq2seq run (beam 1 = greedy; default: the run's beam), through
    the same Predictor as `bertpipe predict` and `bertpipe serve`."""
    from recipes.predict import Predictor

    predictor = Predictor(run, batch_size=batch_size, beam=beam, max_new_tokens=max_new_tokens)
    if predictor.kind != "translate":
        raise BertpipeError(f"{run}: a {predictor.meta['kind']} run; translation needs model.kind=seq2seq")
    return [result["translation"] for result in predictor(sentences)]


def translate_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bertpipe translate", description="Translate sentences with a finished "
                                     "encoder-decoder run (model.kind=seq2seq), e.g. Multi30k English -> German.")
    parser.add_argument("--run", required=True, help="the run directory (or its model/ directory)")
    parser.add_argument("sentences", nargs="+", metavar="SENTENCE", help="source sentences; - reads one a line "
                        "from stdin")
    parser.add_argument("--beam", type=int, help="beam size; 1 = greedy (default: the run's model.seq2seq.beam)")
    parser.add_argument("--max-len", type=int, help="at most this many new pieces per translation "
                        "(default: the run's model.seq2seq.max_new_tokens)")
    args = parser.parse_args(argv)
    sentences = []
    for sentence in args.sentences:
        sentences += [line.strip() for line in sys.stdin if line.strip()] if sentence == "-" else [sentence]
    for line in translate(args.run, sentences, args.beam, args.max_len):
        print(line)
    return 0
