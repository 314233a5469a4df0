"""The `bertpipe` command: a table of subcommands, each a thin parser in front of one stage's entry function.

Subcommands are imported only when run, so `bertpipe --help` stays fast and a stage's heavy dependencies
load only for that stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import sys
import typing
from collections.abc import Callable

from pipeline.config import load_config
from pipeline.errors import BertpipeError
from pipeline.log import setup_logging

log = logging.getLogger("bertpipe")

# name -> (one-line help, "module:function" taking the remaining argv and returning an exit code)
COMMANDS: dict[str, tuple[str, str]] = {
    "vocab": ("build a WordPiece vocabulary from a corpus", "pipeline.cli:vocab_command"),
    "shard": ("sentence-split, tokenize and write NSP/MLM-ready Parquet shards", "pipeline.cli:shard_command"),
    "pretrain": ("pretrain BERT (MLM + NSP) under DeepSpeed", "pipeline.cli:pretrain_command"),
    "plot": ("draw a run's loss, throughput and probe curves to PNG", "pipeline.cli:plot_command"),
    "probe": ("fine-tune a pretraining run's probe export on its probe tasks (a time-to-accuracy point)",
              "pipeline.probe:probe_command"),
    "finetune": ("fine-tune on SST-2, GLUE's CoLA/MRPC/STS-B/RTE/WNLI, Rotten Tomatoes, CoNLL-2003 NER, UD POS or "
                 "SQuAD (Lightning)", "recipes.base:finetune_command"),
    "glue": ("fine-tune one encoder on every GLUE task over several seeds: one GLUE-style table",
             "recipes.glue:glue_command"),
    "predict": ("label texts or sentence pairs, or answer questions about a passage, with a finished finetune run",
                "recipes.predict:predict_command"),
    "serve": ("serve a finished finetune run over HTTP, with dynamic batching and a page to try it",
              "recipes.serve.server:serve_command"),
    "generate": ("write sentences with a label-conditioned RNN language model run", "recipes.rnn:generate_command"),
    "translate": ("translate sentences with a finished seq2seq run (beam search or greedy)",
                  "recipes.seq2seq:translate_command"),
    "leaderboard": ("gather every results.json under a folder into one table and chart",
                    "pipeline.cli:leaderboard_command"),
    "model-info": ("print the size and parameter count of the BERT presets", "pipeline.model_cli:model_info_command"),
    "export": ("write a checkpoint in HF transformers format", "pipeline.model_cli:export_command"),
}


def _describe(cls: type, prefix: str = "") -> list[tuple[str, str]]:
    """(key, "type = default") for every leaf of a config dataclass."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            rows.extend(_describe(hint, prefix + f.name + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            default = "a list, see the YAML recipes" if isinstance(value, list) else repr(value)
        else:
            default = "required"
        type_name = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
        rows.append((prefix + f.name, f"{type_name} = {default}"))
    return rows


def config_parser(name: str, description: str, config_cls: type) -> argparse.ArgumentParser:
    """A subcommand parser with --config, key=value overrides and --quiet, its keys listed in --help."""
    keys = "\n".join(f"  {k:<28} {v}" for k, v in _describe(config_cls))
    parser = argparse.ArgumentParser(
        prog=f"bertpipe {name}", description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"config keys (set in the YAML file or as key=value overrides):\n{keys}",
    )
    parser.add_argument("--config", metavar="YAML", help=f"a YAML recipe, e.g. recipes/{name}/<name>.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override a config key (dots for nesting)")
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors; no progress bars")
    return parser


def vocab_command(argv: list[str]) -> int:
    from pipeline.vocab import VocabConfig, build_vocab

    parser = config_parser("vocab", "Build a WordPiece vocabulary (HF tokenizers) from a corpus.", VocabConfig)
    parser.add_argument("--force", action="store_true", help="rebuild even if inputs and settings are unchanged")
    args = parser.parse_intermixed_args(argv)
    setup_logging(args.quiet)
    cfg = load_config(VocabConfig, args.config, args.overrides)
    out = build_vocab(cfg, force=args.force)
    print(out)
    return 0


def shard_command(argv: list[str]) -> int:
    from pipeline.shard import ShardConfig, build_shards

    parser = config_parser("shard", "Write NSP/MLM-ready Parquet shards from a corpus and a vocabulary.", ShardConfig)
    parser.add_argument("--workers", type=int, help="processes on this node (sets the config key workers)")
    parser.add_argument("--task-index", type=int, help="this array task's index (default: SLURM_ARRAY_TASK_ID)")
    parser.add_argument("--num-tasks", type=int, help="number of array tasks (default: SLURM_ARRAY_TASK_COUNT)")
    merge = parser.add_mutually_exclusive_group()
    merge.add_argument("--merge", dest="merge", action="store_true", default=None,
                       help="merge every task's parts into shards (default: only with a single task)")
    merge.add_argument("--no-merge", dest="merge", action="store_false", help="write this task's parts only")
    parser.add_argument("--force", action="store_true", help="rebuild even if inputs and settings are unchanged")
    args = parser.parse_intermixed_args(argv)
    setup_logging(args.quiet)
    overrides = args.overrides + ([f"workers={args.workers}"] if args.workers is not None else [])
    cfg = load_config(ShardConfig, args.config, overrides)
    print(build_shards(cfg, args.task_index, args.num_tasks, merge=args.merge, force=args.force))
    return 0


def pretrain_command(argv: list[str]) -> int:
    from pipeline.pretrain import EXIT_PREEMPTED, PretrainConfig, pretrain

    parser = config_parser("pretrain", "Pretrain BERT with MLM and NSP under DeepSpeed (ZeRO, bf16/fp16). "
                           "Launch with torchrun, deepspeed, srun or as one process; rerun to resume. "
                           f"Exit code {EXIT_PREEMPTED} means stopped by SIGTERM/SIGUSR1 after a checkpoint.",
                           PretrainConfig)
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    args = parser.parse_intermixed_args(argv)
    setup_logging(args.quiet or int(os.environ.get("RANK", "0")) > 0)
    return pretrain(load_config(PretrainConfig, args.config, args.overrides))


def plot_command(argv: list[str]) -> int:
    from pipeline.plot import plot_run

    parser = argparse.ArgumentParser(prog="bertpipe plot", description="Draw loss and throughput curves of a "
                                     "pretraining run (its metrics.jsonl), and its probe curve (probe accuracy "
                                     "against compute) when it ran probes, to RUN_DIR/plots/*.png.")
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    setup_logging()
    for path in plot_run(args.run_dir):
        print(path)
    return 0


def leaderboard_command(argv: list[str]) -> int:
    from pipeline.leaderboard import write_leaderboard

    parser = argparse.ArgumentParser(prog="bertpipe leaderboard", description="Gather every results.json under "
                                     "RUNS_DIR into leaderboard.md, leaderboard.csv and leaderboard.png.")
    parser.add_argument("runs_dir")
    parser.add_argument("--out", help="where to write them (default: RUNS_DIR)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.quiet)
    paths = write_leaderboard(args.runs_dir, args.out)
    if not args.quiet:
        print(paths[0].read_text(), end="")
    return 0


def _resolve(target: str) -> Callable[[list[str]], int]:
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)


def _usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {text}" for name, (text, _) in COMMANDS.items())
    return (
        "usage: bertpipe COMMAND [--config YAML] [key=value ...] [--quiet]\n\n"
        "A staged BERT pretraining pipeline: vocab -> shard -> pretrain -> finetune.\n\n"
        f"commands:\n{rows}\n\nRun `bertpipe COMMAND --help` for a command's options and config keys."
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"bertpipe: error: unknown command {name!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    try:
        return _resolve(COMMANDS[name][1])(rest)
    except BertpipeError as err:
        every_rank = getattr(err, "every_rank", False)  # raised alike on every rank: rank 0 alone says it
        if not every_rank or int(os.environ.get("RANK", "0")) == 0:
            print(f"bertpipe {name}: error: {err}", file=sys.stderr)
        if every_rank:
            from pipeline.distributed import exit_together

            exit_together(err.exit_code)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"bertpipe {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
