"""Write tests/fixtures/v1_runs: tiny run directories in gptforge 0.1's format (version 1).

Run it with gptforge 0.1 on the path (the commit before the one loader landed):

    git worktree add /tmp/gptforge-0.1 dd55638
    PYTHONPATH=/tmp/gptforge-0.1/src python scripts/make_v1_fixture.py tests/fixtures/v1_runs

It saves a language model, a full instruction run (phi3 template), a LoRA instruction
run on top of that language model, a classifier and a LoRA classifier, each with the
logits that gptforge 0.1 computes for a fixed input (expected.npz), so a test can check
that the current loader reads every one of them to the same numbers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from gptforge.checkpoint import load_model, save_model
from gptforge.config import GPTConfig
from gptforge.finetune.classify import prepare_classifier, save_classifier
from gptforge.finetune.lora import apply_lora, load_lora_run, merge_lora, save_lora
from gptforge.model import GPTModel

IDS = torch.tensor([[1, 5, 9, 13, 2, 7]])


def randomize(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)


def main(out: Path) -> None:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=32, context_length=16, emb_dim=8, n_heads=2, n_layers=1,
                    drop_rate=0.0, qkv_bias=False, tie_weights=False)
    expected = {}
    lm = GPTModel(cfg)
    save_model(lm, out / "lm", task="lm", step=3, data={"text": None, "data": None,
                                                       "train_ratio": 0.9, "stride": None})
    expected["lm"] = load_model(out / "lm").eval()(IDS)

    save_model(lm, out / "instruct", task="instruct", step=2, base_model="gpt2-small",
               instruct={"template": "phi3", "mask_prompt": True, "max_length": 16})
    expected["instruct"] = expected["lm"]

    adapted = apply_lora(load_model(out / "lm"), rank=2, alpha=4.0)
    for name, p in adapted.named_parameters():
        if name.endswith(".B"):
            with torch.no_grad():
                p.normal_(0, 0.3)
    save_lora(adapted, out / "instruct_lora", base_model=str((out / "lm").resolve()), step=2,
              task="instruct", instruct={"template": "alpaca", "lora_rank": 2})
    expected["instruct_lora"] = merge_lora(load_lora_run(out / "instruct_lora")).eval()(IDS)

    clf = prepare_classifier(load_model(out / "lm"), 3, "last-block")
    randomize(clf.out_head)
    save_classifier(clf, out / "classifier", task="classifier", labels=["a", "b", "c"],
                    pooling="mean", max_length=12, pad_id=0, trainable="last-block",
                    source="init:gpt2-small", data="toy", step=4)
    expected["classifier"] = load_model(out / "classifier").eval()(IDS)

    lclf = prepare_classifier(load_model(out / "lm"), 2, "lora", lora_rank=2, lora_alpha=2.0)
    for name, p in lclf.named_parameters():
        if name.endswith(".B") or name.startswith("out_head"):
            with torch.no_grad():
                p.normal_(0, 0.3)
    save_classifier(lclf, out / "classifier_lora", task="classifier", labels=["ham", "spam"],
                    pooling="last-token", max_length=12, pad_id=0, trainable="lora", lora_rank=2,
                    lora_alpha=2.0, source="init:gpt2-small", data="toy", step=5)
    expected["classifier_lora"] = load_model(out / "classifier_lora").eval()(IDS)

    np.savez(out / "expected.npz", ids=IDS.numpy(),
             **{k: v.detach().numpy() for k, v in expected.items()})


if __name__ == "__main__":
    main(Path(sys.argv[1]))
