"""Autoencoders: the `autoencoder` model kind of recipes/base.py, on images (digits) and on text (sentences).

An autoencoder learns x -> code -> x' through a bottleneck narrower than x, so the code has to keep what
matters about x. The variants (`model.autoencoder.variant`) differ in what stops it from copying:

- undercomplete: the bottleneck alone (an MLP, linear code);
- denoising: the input is corrupted (Gaussian noise, or masking: pixels set to 0) and the *clean* input is the
  target, so the network has to learn the data's structure to undo the noise;
- sparse: a penalty on the code — L1 (lambda * mean |h|, linear codes) or, on sigmoid codes, KL(rho || rho_j)
  between a target rate rho and each unit's mean activation rho_j over the batch (Ng's sparse autoencoder);
- variational: the encoder gives a Gaussian q(z|x) = N(mu, sigma^2); z = mu + sigma * eps (reparameterization)
  is decoded; the loss is the negative ELBO, the reconstruction's negative log-likelihood summed over pixels
  plus beta * KL(q(z|x) || N(0, I)); decoding z ~ N(0, I) samples new images;
- convolutional: Conv2d encoder, ConvTranspose2d decoder, for the same undercomplete objective.

Image decoders end in a sigmoid (pixels in [0, 1]); the loss is `mse` or `bce` per pixel. The dev metric is
the per-pixel MSE of the reconstruction (lower is better); `report()` adds the mean training image's MSE as
the trivial baseline, a linear probe on the codes (and on raw pixels, for contrast) and PNG grids.

Text: a sequence autoencoder. An LSTM (model.rnn) reads the sentence; its final state becomes the code
(a linear map to code_dim); the decoder LSTM starts from a state computed from the code, reads the
code again at every step (through the initial state alone it fades within a few tokens, as in
LabelLM) and rebuilds the sentence with teacher forcing. The denoising variant corrupts the encoder's input
only: tokens masked to [UNK] or dropped. The dev metric is teacher-forced token accuracy (higher is better);
evaluate() adds greedy reconstruction accuracy, exact matches and the accuracy with another sentence's code.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import MeanSquaredError, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from pipeline.artifacts import write_json
from pipeline.errors import BertpipeError
from recipes.base import AutoencoderConfig, Built, FinetuneConfig, RnnConfig, TaskModule, tokenizer_files
from recipes.rnn import Embeddings, Recurrent, State, WordEncoder, decode
from recipes.tasks import TaskDataModule, TaskSpec, TextEncoder, WordPieceEncoder, encode_text, read_splits

log = logging.getLogger(__name__)

TEXT_VARIANTS = ("undercomplete", "denoising")


@dataclass
class Output:
    logits: torch.Tensor  # images: (B, C, H, W) before the sigmoid; text: (B, S, vocab)
    code: torch.Tensor  # (B, code_dim): what the probe reads (the VAE's mean)
    logvar: torch.Tensor | None = None  # the VAE's log sigma^2


# ---- corruption ------------------------------------------------------------------------------------------


def corrupt_pixels(x: torch.Tensor, noise: str, level: float, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
    """Gaussian noise of sigma `level` (clipped to [0, 1]), or a share `level` of the pixels set to 0."""
    if noise == "gaussian":
        eps = torch.randn(x.shape, generator=generator, device=x.device)
        return (x + level * eps).clamp(0, 1)
    keep = torch.rand(x.shape, generator=generator, device=x.device) >= level
    return x * keep


def corrupt_tokens(ids: torch.Tensor, mask: torch.Tensor, noise: str, level: float, unk_id: int, pad_id: int,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A share `level` of the tokens between the first and the last (the bounds stay) masked to [UNK], or
    dropped (the rest shift left). Returns the new ids and attention mask."""
    lengths = mask.sum(1)
    positions = torch.arange(ids.size(1), device=ids.device)[None, :]
    inner = (positions > 0) & (positions < lengths[:, None] - 1)
    hit = (torch.rand(ids.shape, generator=generator).to(ids.device) < level) & inner
    if noise == "masking":
        return ids.masked_fill(hit, unk_id), mask
    keep = mask.bool() & ~hit
    order = torch.argsort((~keep).int(), dim=1, stable=True)  # kept tokens first, in their order
    new_mask = (positions < keep.sum(1)[:, None]).long()
    return torch.gather(ids, 1, order).masked_fill(new_mask == 0, pad_id), new_mask


# ---- the image autoencoders ------------------------------------------------------------------------------


def _mlp(cfg: AutoencoderConfig, shape: tuple[int, ...], out: int) -> tuple[nn.Module, nn.Module]:
    size = math.prod(shape)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(size, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, out))
    decoder = nn.Sequential(nn.Linear(cfg.code_dim, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, size),
                            nn.Unflatten(1, shape))
    return encoder, decoder


def _conv(cfg: AutoencoderConfig, shape: tuple[int, ...], out: int) -> tuple[nn.Module, nn.Module]:
    """8x8 -> 16 maps of 8x8 -> 32 maps of 4x4 -> code, and back with transposed convolutions."""
    channels, height, width = shape
    if height % 2 or width % 2:
        raise BertpipeError(f"the convolutional autoencoder needs even image sides, not {height}x{width}")
    inner = (32, height // 2, width // 2)
    encoder = nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(),
                            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                            nn.Flatten(), nn.Linear(math.prod(inner), out))
    decoder = nn.Sequential(nn.Linear(cfg.code_dim, math.prod(inner)), nn.ReLU(), nn.Unflatten(1, inner),
                            nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1), nn.ReLU(),  # 4x4 -> 8x8
                            nn.ConvTranspose2d(16, channels, 3, padding=1))
    return encoder, decoder


class ImageAutoencoder(nn.Module):
    """Encoder -> code -> decoder for images of one shape; logits out, sigmoid(logits) the reconstruction."""

    def __init__(self, cfg: AutoencoderConfig, shape: tuple[int, ...]):
        super().__init__()
        self.cfg, self.shape = cfg, tuple(shape)
        self.variational = cfg.variant == "variational"
        out = 2 * cfg.code_dim if self.variational else cfg.code_dim  # the VAE's encoder gives mu and log sigma^2
        build = _conv if cfg.variant == "convolutional" else _mlp
        self.encoder, self.decoder = build(cfg, self.shape, out)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The code (the VAE's mean) and, for the VAE, log sigma^2."""
        h = self.encoder(x)
        if self.variational:
            mu, logvar = h.chunk(2, -1)
            return mu, logvar
        if self.cfg.variant == "sparse" and self.cfg.sparsity == "kl":
            return torch.sigmoid(h), None  # activations in (0, 1): a rate the KL penalty can target
        return h, None

    def forward(self, x: torch.Tensor) -> Output:
        code, logvar = self.encode(x)
        z = code
        if logvar is not None and self.training:  # reparameterization: the noise is an input, mu and sigma learn
            z = code + torch.randn_like(code) * torch.exp(0.5 * logvar)
        return Output(self.decoder(z), code, logvar)

    @torch.no_grad()
    def sample(self, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """`num` images decoded from z ~ N(0, I), the VAE's prior: (num, C, H, W) in [0, 1]."""
        device = next(self.parameters()).device
        z = torch.randn(num, self.cfg.code_dim, generator=generator).to(device)
        return torch.sigmoid(self.decoder(z))


def kl_to_prior(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) per example, summed over the code's dimensions."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)


def sparsity_kl(code: torch.Tensor, rho: float) -> torch.Tensor:
    """sum_j KL(rho || rho_j) between Bernoulli rates, rho_j a unit's mean activation over the batch."""
    rate = code.mean(0).clamp(1e-6, 1 - 1e-6)
    return (rho * torch.log(rho / rate) + (1 - rho) * torch.log((1 - rho) / (1 - rate))).sum()


class ImageModule(TaskModule):
    """Reconstruction as the task: the base's optimizer, schedule and loop; per-pixel MSE as the dev metric."""

    def __init__(self, net: ImageAutoencoder, spec: TaskSpec, cfg: FinetuneConfig):
        super().__init__(net, spec, cfg.trainer)
        self.ae = cfg.model.autoencoder

    def new_metrics(self, **kwargs) -> MetricCollection:
        return MetricCollection({self.spec.main_metric: MeanSquaredError(**kwargs)})

    def forward(self, pixels: torch.Tensor) -> Output:
        return self.net(pixels)

    def terms(self, out: Output, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss and its parts: reconstruction, and the sparsity penalty or the VAE's KL."""
        ae = self.ae
        if self.net.variational:  # the negative ELBO: log-likelihood summed over pixels, KL over the code
            if ae.loss == "bce":
                recon = F.binary_cross_entropy_with_logits(out.logits, target, reduction="none")
            else:
                recon = (torch.sigmoid(out.logits) - target).pow(2)
            recon, kl = recon.flatten(1).sum(1).mean(), kl_to_prior(out.code, out.logvar).mean()
            return {"loss": recon + ae.beta * kl, "reconstruction": recon, "kl": kl}
        if ae.loss == "bce":
            recon = F.binary_cross_entropy_with_logits(out.logits, target)
        else:
            recon = F.mse_loss(torch.sigmoid(out.logits), target)
        terms = {"reconstruction": recon}
        if ae.variant == "sparse":
            penalty = out.code.abs().mean() if ae.sparsity == "l1" else sparsity_kl(out.code, ae.sparsity_target)
            terms["sparsity"] = penalty
            recon = recon + ae.sparsity_weight * penalty
        return {"loss": recon} | terms

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        clean = batch["pixels"]
        noisy = corrupt_pixels(clean, self.ae.noise, self.ae.noise_level) if self.ae.variant == "denoising" else clean
        terms = self.terms(self(noisy), clean)
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, batch_size=clean.size(0))
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0], batch_size=clean.size(0))
        return terms["loss"]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self(batch["pixels"])
        self.log("dev/loss", self.terms(out, batch["pixels"])["loss"], batch_size=batch["pixels"].size(0),
                 sync_dist=True)
        self.dev_metrics.update(torch.sigmoid(out.logits), batch["pixels"])

    @torch.no_grad()
    def evaluate(self, loader, device: torch.device | str = "cpu") -> dict[str, float]:
        """Loss terms and the reconstruction MSE of clean inputs; mean |code| and the code units' mean rate;
        for the denoising AE, the MSE of corrupted inputs and of their reconstructions (both to the clean ones),
        with noise seeded so every split and run sees the same corruption."""
        self.eval().to(device)
        generator = torch.Generator().manual_seed(0)
        sums: dict[str, float] = {}
        count = 0
        for batch in loader:
            clean = batch["pixels"].to(device)
            n = clean.size(0)
            out = self(clean)
            values = {k: float(v) for k, v in self.terms(out, clean).items()}
            values |= {"mse": float(F.mse_loss(torch.sigmoid(out.logits), clean)),
                       "code_abs_mean": float(out.code.abs().mean()), "code_mean": float(out.code.mean())}
            if self.ae.variant == "denoising":
                noisy = corrupt_pixels(clean.cpu(), self.ae.noise, self.ae.noise_level, generator).to(device)
                values["noisy_mse"] = float(F.mse_loss(noisy, clean))
                values["denoised_mse"] = float(F.mse_loss(torch.sigmoid(self(noisy).logits), clean))
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v * n
            count += n
        return {k: v / max(count, 1) for k, v in sums.items()}


# ---- the sequence autoencoder ----------------------------------------------------------------------------


class SequenceAutoencoder(nn.Module):
    """An RNN encoder's final state -> code (linear) -> an RNN decoder that rebuilds the sentence token by token."""

    def __init__(self, vocab_size: int, pad_id: int, rnn: RnnConfig, code_dim: int):
        super().__init__()
        self.rnn_cfg, self.vocab_size = rnn, vocab_size
        self.embed = Embeddings(vocab_size, pad_id, rnn.embed_dim)  # shared by encoder and decoder
        self.encoder = Recurrent(rnn, rnn.embed_dim)
        self.to_code = nn.Linear(self.encoder.output_size, code_dim)
        self.to_state = nn.Linear(code_dim, rnn.layers * rnn.hidden)
        self.decoder = Recurrent(dataclasses.replace(rnn, bidirectional=False), rnn.embed_dim + code_dim)
        self.dropout = nn.Dropout(rnn.dropout)
        self.head = nn.Linear(rnn.hidden, vocab_size)

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        _, state = self.encoder(self.dropout(self.embed(ids)), mask.sum(1))
        return self.to_code(self.encoder.summary(state))  # linear: a tanh here saturated and the code went dead

    def initial(self, code: torch.Tensor) -> State:
        r = self.rnn_cfg
        h = torch.tanh(self.to_state(code)).view(-1, r.layers, r.hidden).transpose(0, 1).contiguous()
        return (h, torch.zeros_like(h)) if r.cell == "lstm" else h

    def decode(self, code: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor, state: State | None = None
               ) -> tuple[torch.Tensor, State]:
        """Next-token logits after each of `ids` (teacher forcing), and the decoder's state."""
        x = torch.cat([self.embed(ids), code[:, None].expand(-1, ids.size(1), -1)], -1)
        out, state = self.decoder(self.dropout(x), lengths, self.initial(code) if state is None else state)
        return self.head(self.dropout(out)), state

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor
                ) -> Output:
        """Encode `ids` (maybe corrupted), decode `target_ids` (the clean sentence, bounds included) shifted by one:
        logits (B, S - 1, vocab) for target_ids[:, 1:]."""
        code = self.encode(ids, mask)
        logits, _ = self.decode(code, target_ids[:, :-1], (target_mask.sum(1) - 1).clamp(min=1))
        return Output(logits, code)

    @torch.no_grad()
    def greedy(self, code: torch.Tensor, start_id: int, steps: int) -> torch.Tensor:
        """The most likely token at each step, fed back: (B, steps)."""
        token = torch.full((code.size(0), 1), start_id, device=code.device)
        ones = torch.ones(code.size(0), dtype=torch.long, device=code.device)
        state, out = None, []
        for _ in range(steps):
            logits, state = self.decode(code, token, ones, state)
            token = logits[:, -1].argmax(-1, keepdim=True)
            out.append(token)
        return torch.cat(out, 1)


class SequenceModule(TaskModule):
    """Sentence reconstruction: cross-entropy of each clean token given the code and the tokens before it."""

    def __init__(self, net: SequenceAutoencoder, spec: TaskSpec, cfg: FinetuneConfig, encoder: TextEncoder):
        super().__init__(net, spec, cfg.trainer)
        self.ae = cfg.model.autoencoder
        self.pad_id, self.unk_id = encoder.pad_id, encoder.unk_id
        self.start_id, self.end_id = encoder.prefix[0], encoder.suffix[0]

    def new_metrics(self, **kwargs) -> MetricCollection:
        return MetricCollection({self.spec.main_metric: MulticlassAccuracy(self.net.vocab_size, average="micro",
                                                                           ignore_index=-100, **kwargs)})

    def forward(self, batch: dict[str, torch.Tensor], noisy: bool = False) -> Output:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if noisy:
            ids, mask = corrupt_tokens(ids, mask, self.ae.noise, self.ae.noise_level, self.unk_id, self.pad_id)
        return self.net(ids, mask, batch["input_ids"], batch["attention_mask"])

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, -2).float(), self.targets(batch).flatten(), ignore_index=-100)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(self(batch, noisy=self.ae.variant == "denoising").logits, batch)
        size = batch["input_ids"].size(0)
        self.log("train/loss", loss, batch_size=size)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0], batch_size=size)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch).logits
        self.log("dev/loss", self.loss(logits, batch), batch_size=batch["input_ids"].size(0), sync_dist=True)
        self.dev_metrics.update(logits.argmax(-1), self.targets(batch))

    @torch.no_grad()
    def evaluate(self, loader, device: torch.device | str = "cpu") -> dict[str, float]:
        """Teacher-forced loss and token accuracy; the same with each sentence given another one's code (the
        decoder as a plain language model); greedy decoding's token accuracy and exact-match rate (up to and
        including the end token); for the denoising AE, teacher-forced accuracy from corrupted inputs."""
        self.eval().to(device)
        generator = torch.Generator().manual_seed(0)
        sums = dict.fromkeys(("loss", "token_accuracy", "shuffled_code_accuracy", "greedy_accuracy"), 0.0)
        if self.ae.variant == "denoising":
            sums["noisy_token_accuracy"] = 0.0
        tokens, sentences, exact = 0, 0, 0
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            target = self.targets(batch)
            known = target != -100
            n = int(known.sum())
            out = self(batch)
            sums["loss"] += float(self.loss(out.logits, batch)) * n
            sums["token_accuracy"] += float((out.logits.argmax(-1) == target)[known].sum())
            lengths = (batch["attention_mask"].sum(1) - 1).clamp(min=1)
            other, _ = self.net.decode(out.code.roll(1, 0), batch["input_ids"][:, :-1], lengths)
            sums["shuffled_code_accuracy"] += float((other.argmax(-1) == target)[known].sum())
            greedy = self.net.greedy(out.code, self.start_id, target.size(1))
            right = (greedy == target) | ~known
            sums["greedy_accuracy"] += float((greedy == target)[known].sum())
            exact += int(right.all(1).sum())
            if "noisy_token_accuracy" in sums:
                ids, mask = corrupt_tokens(batch["input_ids"].cpu(), batch["attention_mask"].cpu(), self.ae.noise,
                                           self.ae.noise_level, self.unk_id, self.pad_id, generator)
                noisy = self.net(ids.to(device), mask.to(device), batch["input_ids"], batch["attention_mask"])
                sums["noisy_token_accuracy"] += float((noisy.logits.argmax(-1) == target)[known].sum())
            tokens += n
            sentences += target.size(0)
        return {k: v / max(tokens, 1) for k, v in sums.items()} | {"exact_match": exact / max(sentences, 1)}


# ---- data ------------------------------------------------------------------------------------------------


class ImageEncoder:
    """What base.py saves beside the weights for an image model: only the image shape (no vocabulary)."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(shape)

    def save(self, directory: Path) -> None:
        write_json(directory / "image.json", {"shape": list(self.shape)})


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


class AutoencoderData(TaskDataModule):
    """Batches of images (`pixels` (B, C, H, W), `labels`) or of sentences (`input_ids`, `attention_mask`, with
    the encoder's start and end tokens around each sentence)."""

    def encode(self, examples: list) -> list[dict]:
        if isinstance(self.encoder, ImageEncoder):
            return [{"pixels": ex.pixels, "labels": torch.tensor(ex.label)} for ex in examples]
        return [{"input_ids": encode_text(self.encoder, p, self.max_len)} for p in self.encoder.pieces(examples)]

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if "pixels" in features[0]:
            return {k: torch.stack([f[k] for f in features]) for k in features[0]}
        ids = _pad([f["input_ids"] for f in features], self.encoder.pad_id)
        return {"input_ids": ids, "attention_mask": (ids != self.encoder.pad_id).long()}


# ---- build and restore (recipes/base.py's model-kind interface) ------------------------------------------


def build(cfg: FinetuneConfig, spec: TaskSpec) -> Built:
    ae, r = cfg.model.autoencoder, cfg.model.rnn
    describe = {"kind": "autoencoder", "variant": ae.variant, "code_dim": ae.code_dim}
    meta = {"autoencoder": dataclasses.asdict(ae)}
    if spec.kind == "image":
        if ae.noise == "dropout":
            raise BertpipeError("model.autoencoder.noise=dropout drops tokens: use gaussian or masking for images")
        shape = tuple(read_splits(cfg.task, spec)["train"][0].pixels.shape)
        net = ImageAutoencoder(ae, shape)
        describe |= {"size": f"{ae.variant}-C{ae.code_dim}", "hidden": ae.hidden, "loss": ae.loss,
                     "shape": list(shape)}
        return Built(net, ImageEncoder(shape), meta | {"shape": list(shape)}, describe)
    if spec.kind != "sentences":
        raise BertpipeError(f"model.kind=autoencoder rebuilds images or sentences, not task {spec.name}'s inputs")
    if ae.variant not in TEXT_VARIANTS:
        raise BertpipeError(f"the sequence autoencoder is {' or '.join(TEXT_VARIANTS)}, not {ae.variant}")
    if ae.variant == "denoising" and ae.noise == "gaussian":
        raise BertpipeError("model.autoencoder.noise=gaussian is for pixels: use masking or dropout for tokens")
    inputs: dict[str, list[dict]] = {}
    if r.word_vocab:
        encoder: TextEncoder = WordEncoder.fit(read_splits(cfg.task, spec)["train"], r.min_count, r.max_vocab,
                                               bounds=True)
    elif cfg.model.vocab_dir:
        encoder = WordPieceEncoder(cfg.model.vocab_dir)  # [CLS] and [SEP] are the start and end tokens
        inputs = {"tokenizer": tokenizer_files(cfg.model.vocab_dir)}
    else:
        raise BertpipeError("set model.vocab_dir (the project's WordPiece vocabulary) or model.rnn.word_vocab=true")
    net = SequenceAutoencoder(encoder.vocab_size, encoder.pad_id, r, ae.code_dim)
    describe |= {"size": f"{r.cell}-L{r.layers}-H{r.hidden}-C{ae.code_dim}", "cell": r.cell, "hidden": r.hidden,
                 "layers": r.layers, "embed_dim": r.embed_dim, "vocab_size": encoder.vocab_size,
                 "tokenizer": "word" if r.word_vocab else "wordpiece"}
    meta |= {"rnn": dataclasses.asdict(r), "vocab_size": encoder.vocab_size, "pad_id": encoder.pad_id}
    return Built(net, encoder, meta, describe, inputs)


def task_module(built: Built, spec: TaskSpec, cfg: FinetuneConfig) -> TaskModule:
    if spec.kind == "image":
        return ImageModule(built.net, spec, cfg)
    return SequenceModule(built.net, spec, cfg, built.encoder)


def data_module(splits: dict[str, list], built: Built, cfg: FinetuneConfig) -> AutoencoderData:
    return AutoencoderData(splits, built.encoder, cfg.task.max_len, cfg.trainer.batch_size, cfg.trainer.num_workers)


def restore(meta: dict, directory: Path) -> tuple[nn.Module, TextEncoder | ImageEncoder]:
    ae = AutoencoderConfig(**meta["autoencoder"])
    if "shape" in meta:
        return ImageAutoencoder(ae, tuple(meta["shape"])), ImageEncoder(tuple(meta["shape"]))
    r = RnnConfig(**meta["rnn"])
    encoder = WordEncoder.load(directory, bounds=True) if r.word_vocab else WordPieceEncoder(directory)
    return SequenceAutoencoder(meta["vocab_size"], meta["pad_id"], r, ae.code_dim), encoder


# ---- report: baselines, the probe, figures and examples --------------------------------------------------


def report(module: TaskModule, data: AutoencoderData, work: Path, device: str = "cpu") -> dict[str, float]:
    """Dev results beyond evaluate() that need the training split, and files for a person to look at."""
    module.eval().to(device)
    if isinstance(module, ImageModule):
        return _image_report(module, data, work, device)
    return _text_report(module, data, work, device)


@torch.no_grad()
def _codes(module: ImageModule, loader: DataLoader, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixels, codes and labels of a whole split (on the CPU)."""
    pixels, codes, labels = [], [], []
    for batch in loader:
        pixels.append(batch["pixels"])
        codes.append(module.net.encode(batch["pixels"].to(device))[0].cpu())
        labels.append(batch["labels"])
    return torch.cat(pixels), torch.cat(codes), torch.cat(labels)


def probe(train: torch.Tensor, train_labels: torch.Tensor, dev: torch.Tensor, dev_labels: torch.Tensor) -> float:
    """Dev accuracy of a logistic regression on standardized features: how linearly readable the labels are."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(train.flatten(1).numpy(), train_labels.numpy())
    return float(model.score(dev.flatten(1).numpy(), dev_labels.numpy()))


def _image_report(module: ImageModule, data: AutoencoderData, work: Path, device: str) -> dict[str, float]:
    train_x, train_codes, train_y = _codes(module, data.loader("train"), device)
    dev_x, dev_codes, dev_y = _codes(module, data.loader("dev"), device)
    mean_image = train_x.mean(0, keepdim=True)
    results = {"mean_image_mse": float(F.mse_loss(mean_image.expand_as(dev_x), dev_x)),
               "probe_accuracy": probe(train_codes, train_y, dev_codes, dev_y),
               "pixel_probe_accuracy": probe(train_x, train_y, dev_x, dev_y)}
    rows = {"original": dev_x[:10]}
    if module.ae.variant == "denoising":
        rows["corrupted"] = corrupt_pixels(dev_x[:10], module.ae.noise, module.ae.noise_level,
                                           torch.Generator().manual_seed(0))
    with torch.no_grad():
        rows["reconstruction"] = torch.sigmoid(module(rows.get("corrupted", rows["original"]).to(device)).logits).cpu()
        _grid(rows, work / "reconstructions.png")
        if module.net.variational:
            samples = module.net.sample(40, torch.Generator().manual_seed(0)).cpu()
            rows = {f"z {i * 10}-{i * 10 + 9}": samples[i * 10:(i + 1) * 10] for i in range(4)}
            _grid(rows, work / "samples.png", "decoded samples of the prior N(0, I)")
    return results


def _grid(rows: dict[str, torch.Tensor], path: Path, title: str | None = None) -> None:
    """A PNG of images in rows (one labelled row per entry), grey scale in [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(len(images) for images in rows.values())
    fig, axes = plt.subplots(len(rows), columns, figsize=(columns * 0.8, len(rows) * 0.9), squeeze=False)
    for r, (name, images) in enumerate(rows.items()):
        for c in range(columns):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(images):
                ax.imshow(images[c, 0].numpy(), cmap="gray_r", vmin=0, vmax=1)
        axes[r][0].set_ylabel(name, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


@torch.no_grad()
def _text_report(module: SequenceModule, data: AutoencoderData, work: Path, device: str) -> dict[str, float]:
    """The most frequent training token's rate among dev targets (the unigram baseline), and examples.txt: dev
    sentences and their greedy reconstructions."""
    counts: dict[int, int] = {}
    for f in data.features["train"]:
        for i in f["input_ids"][1:]:
            counts[i] = counts.get(i, 0) + 1
    top = max(counts, key=counts.get)
    dev_targets = [i for f in data.features["dev"] for i in f["input_ids"][1:]]
    lines = []
    batch = next(iter(data.loader("dev")))
    batch = {k: v[:10].to(device) for k, v in batch.items()}
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if module.ae.variant == "denoising":
        ids, mask = corrupt_tokens(ids.cpu(), mask.cpu(), module.ae.noise, module.ae.noise_level, module.unk_id,
                                   module.pad_id, torch.Generator().manual_seed(0))
    code = module.net.encode(ids.to(device), mask.to(device))
    greedy = module.net.greedy(code, module.start_id, batch["input_ids"].size(1) + 5).tolist()
    for row, seen, out in zip(batch["input_ids"].tolist(), ids.tolist(), greedy, strict=True):
        out = out[:out.index(module.end_id)] if module.end_id in out else out
        lines += [f"original:      {_text(data.encoder, row, module)}"]
        if module.ae.variant == "denoising":
            lines += [f"corrupted:     {_text(data.encoder, seen, module)}"]
        lines += [f"reconstructed: {decode(data.encoder, out)}", ""]
    (work / "examples.txt").write_text("\n".join(lines), encoding="utf-8")
    return {"unigram_accuracy": dev_targets.count(top) / max(len(dev_targets), 1)}


def _text(encoder: TextEncoder, ids: list[int], module: SequenceModule) -> str:
    return decode(encoder, [i for i in ids if i not in (module.pad_id, module.start_id, module.end_id)])
