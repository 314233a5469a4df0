"""Save a DeepSpeed checkpoint of every ZeRO stage (0-3) in fp32 and bf16 and load it back weights-only.

Run as a script by tests/test_reliability.py (DeepSpeed needs its own process group): for each setting it trains
a step of a tiny BERT, saves through CheckpointManager, loads it into a fresh engine and consolidates the
fp32 weights, all through pipeline/checkpoint.py's weights-only path; prints one JSON line per setting with the
file names and whether the restored and consolidated weights equal the saved ones.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from pipeline.checkpoint import CheckpointManager
from pipeline.distributed import init_distributed
from pipeline.hf_interop import consolidated_state
from pipeline.model import BertForPreTraining, from_preset


def engine_for(stage: int, precision: str, seed: int):
    import deepspeed

    torch.manual_seed(seed)
    model = BertForPreTraining(from_preset("tiny", 512))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2,
              "zero_optimization": {"stage": stage}, "bf16": {"enabled": precision == "bf16"},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
              "steps_per_print": 1 << 30}
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=model.param_groups(0.01), config=config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    return engine


def batch() -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 512, (2, 16), generator=g)
    return {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": torch.ones_like(ids),
            "mlm_positions": torch.tensor([[1, 2], [3, 4]]), "mlm_labels": ids[:, 1:3],
            "next_sentence_label": torch.tensor([0, 1])}


def main(root: Path) -> None:
    dist = init_distributed()
    for stage in range(4):
        for precision in ("fp32", "bf16"):
            run = root / f"z{stage}-{precision}"
            engine = engine_for(stage, precision, seed=1)
            out = engine(**batch())
            engine.backward(out.loss)
            engine.step()
            manager = CheckpointManager(run, 1, dist.rank, dist.world_size)
            tag = manager.save(engine, 1, {"loader": {"position": 2}}, {"zero_stage": stage,
                                                                                  "precision": precision})
            before = {k: v.float().clone() for k, v in engine.module.state_dict().items()} if stage < 3 else None
            fresh = engine_for(stage, precision, seed=2)  # other weights, until the checkpoint is loaded
            state = manager.load(fresh, tag, manager.check(tag, dist.world_size, stage))
            consolidated = consolidated_state(manager.root, tag)
            record = {"stage": stage, "precision": precision, "step": state["step"], "tensors": len(consolidated),
                      "files": sorted(p.name for p in (manager.root / tag).iterdir())}
            if before is not None:  # ZeRO-3 partitions the module's parameters: nothing whole to compare
                after = fresh.module.state_dict()
                record["restored_equal"] = all(torch.equal(after[k].float(), v) for k, v in before.items())
                tolerance = 0 if precision == "fp32" else 1e-2  # bf16 weights against their fp32 masters
                record["consolidated_close"] = all(
                    torch.allclose(consolidated[k], v, atol=tolerance, rtol=0) for k, v in before.items())
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(Path(sys.argv[1]))
