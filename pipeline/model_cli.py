"""The `model-info` and `export` subcommands: model sizes, and checkpoints written in HF format."""

from __future__ import annotations

import argparse

from pipeline.errors import BertpipeError
from pipeline.log import setup_logging
from pipeline.model import PRESETS, BertConfig, count_parameters, from_preset


def _hf_count(config: BertConfig) -> int:
    """transformers' own count for the same architecture, built on the meta device (no memory, ~0.1 s)."""
    import torch
    import transformers

    from pipeline.hf_interop import hf_config

    with torch.device("meta"):
        return transformers.BertForPreTraining(transformers.BertConfig(**hf_config(config))).num_parameters()


def _table(rows: list[tuple[str, BertConfig]], compare_hf: bool) -> tuple[str, bool]:
    """The size table, and whether every count equals transformers' (True when not compared)."""
    header = ["preset", "layers", "hidden", "heads", "intermediate", "parameters"]
    if compare_hf:
        header += ["transformers", "equal"]
    lines, same = [header], True
    for name, c in rows:
        ours = count_parameters(c)
        line = [name, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size, f"{ours:,}"]
        if compare_hf:
            theirs = _hf_count(c)
            same &= theirs == ours
            line += [f"{theirs:,}", "yes" if theirs == ours else "NO"]
        lines.append([str(x) for x in line])
    widths = [max(map(len, column)) for column in zip(*lines, strict=True)]
    text = "\n".join(
        "  ".join([line[0].ljust(widths[0])] + [x.rjust(w) for x, w in zip(line[1:], widths[1:], strict=True)])
        for line in lines
    )
    return text, same


def model_info_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="bertpipe model-info",
        description="Print the size of each BERT preset (or of one, or of a checkpoint): layers, hidden size, "
                    "heads and parameter count (tied decoder counted once, as transformers counts).",
    )
    parser.add_argument("--preset", choices=list(PRESETS), help="only this preset (default: all)")
    vocab = parser.add_mutually_exclusive_group()
    vocab.add_argument("--vocab-size", type=int, default=30522, metavar="N", help="vocabulary entries (default 30522)")
    vocab.add_argument("--vocab", metavar="DIR", help="take the vocabulary size from a vocab directory")
    parser.add_argument("--checkpoint", metavar="PATH",
                        help="a bertpipe checkpoint or HF BERT directory: its size, and what loading it initializes")
    parser.add_argument("--compare-hf", action="store_true",
                        help="also build transformers.BertForPreTraining (on the meta device) and print its count")
    args = parser.parse_args(argv)
    setup_logging(quiet=True)

    if args.checkpoint:
        from pipeline.hf_interop import load_hf

        model, report = load_hf(args.checkpoint)
        rows = [("checkpoint", model.config)]
        print(report)
    else:
        vocab_size = args.vocab_size
        if args.vocab:
            from tokenization import load_tokenizer, special_ids

            try:
                vocab_size = special_ids(load_tokenizer(args.vocab)).vocab_size
            except (FileNotFoundError, ValueError) as err:
                raise BertpipeError(str(err)) from None
        names = [args.preset] if args.preset else list(PRESETS)
        rows = [(name, from_preset(name, vocab_size)) for name in names]
    print(f"vocabulary: {rows[0][1].vocab_size:,} entries")
    text, same = _table(rows, args.compare_hf)
    print(text)
    return 0 if same else 1


def export_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="bertpipe export",
        description="Write a checkpoint in HF format (config.json, model.safetensors, tokenizer files), "
                    "loadable with transformers.BertForPreTraining.from_pretrained.",
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="a model.safetensors file, a directory holding one with model_config.json or "
                             "config.json, or a pretraining run directory (its latest checkpoint)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the HF directory to write (an earlier bertpipe export "
                        "there is replaced; anything else is refused)")
    parser.add_argument("--vocab", metavar="DIR", help="copy this vocab directory's tokenizer files alongside")
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors")
    args = parser.parse_args(argv)
    setup_logging(args.quiet)

    from pipeline.hf_interop import export_hf

    print(export_hf(args.checkpoint, args.out_dir, args.vocab))
    return 0
