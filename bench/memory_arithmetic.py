"""Memory arithmetic for real Llama sizes, computed by the planner's terms (compress/memory.py), not measured.

    python bench/memory_arithmetic.py        # prints the table, writes bench/results/memory-arithmetic.md

Weights in fp32 / bf16 / LLM.int8 / GPTQ 4-bit g128, full fine-tuning with the usual mixed-precision recipe
(bf16 weights and grads, fp32 master weights and AdamW states, activations at batch x seq without
checkpointing) and LoRA-style training (frozen bf16 base, rank-16 adapters on every decoder linear trained with
the same recipe, the same activations). The shapes are the config.json files under configs/models/.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from compress import memory  # noqa: E402

SIZES = {"1B": "llama-3.2-1b", "7B": "llama-2-7b", "70B": "llama-3-70b"}
COLUMNS = ["model", "params", "fp32", "bf16", "int8", "4-bit", "full fine-tuning", "LoRA (frozen base)"]


def lora_params(shape: memory.ModelShape, rank: int = 16) -> int:
    """LoRA adapters of rank r on every decoder linear: r * (in + out) each."""
    return shape.layers * sum(rank * (i + o) for _, i, o in shape.linears)


def rows(batch: int = 1, seq: int = 2048) -> list[dict]:
    out = []
    for label, folder in SIZES.items():
        shape = memory.describe(json.loads((REPO / "configs" / "models" / folder / "config.json").read_text()))
        bf16 = memory.ModelState(shape, "bfloat16")
        full = memory.training_terms(shape, 2, batch, seq, autocast=False, master_weights=True)
        out.append({
            "model": label, "config": f"configs/models/{folder}", "params": shape.params,
            "fp32": memory.ModelState(shape, "float32").weights_bytes(),
            "bf16": bf16.weights_bytes(),
            "int8": memory.ModelState(shape, "bfloat16", format="bnb-int8").weights_bytes(),
            "4-bit": memory.ModelState(shape, "bfloat16", format="gptq", bits=4, group_size=128).weights_bytes(),
            "full fine-tuning": bf16.weights_bytes() + sum(full.values()),
            "LoRA (frozen base)": bf16.weights_bytes() + lora_params(shape) * (2 + 2 + 4 + 8)
            + full["activations"] + full["logits + loss"],
        })
    return out


def table(batch: int = 1, seq: int = 2048) -> str:
    gb = lambda n: f"{n / 1e9:.1f} GB"  # noqa: E731
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows(batch, seq):
        lines.append("| " + " | ".join([r["model"], f"{r['params'] / 1e9:.2f}B"] + [gb(r[c]) for c in COLUMNS[2:]])
                     + " |")
    lines += ["", f"Weights only for fp32..4-bit (int8: LLM.int8 linears, 16-bit rest; 4-bit: GPTQ group 128 with "
              f"fp16 scales). Training: batch {batch} x {seq} tokens, bf16 weights and grads, fp32 master weights and "
              f"AdamW states, activations without checkpointing; LoRA: rank 16 on every linear, frozen bf16 base. "
              f"GB = 10^9 bytes. Shapes: configs/models/{{{','.join(SIZES.values())}}}."]
    return "\n".join(lines)


if __name__ == "__main__":
    text = table()
    print(text)
    out = REPO / "bench" / "results" / "memory-arithmetic.md"
    out.write_text("# Memory arithmetic for real model sizes\n\nComputed by `python bench/memory_arithmetic.py` "
                   "from the planner's terms (compress/memory.py); nothing here is measured.\n\n" + text + "\n")
