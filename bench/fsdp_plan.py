"""Per-GPU memory of full fine-tuning (the `train` stage) of Llama-3-8B under FSDP, from the planner, not measured.

    python bench/fsdp_plan.py        # prints the table, writes bench/results/fsdp-plan.md

One row per GPU count: 1 GPU without FSDP (compress/train.py's single-process recipe: the bf16 model trained in
place, bf16 gradients and AdamW states, 8 bytes/param), then FSDP2 full shard over 2, 4, 8 GPUs as
configs/accelerate/fsdp.yaml runs it (mixed_precision bf16: fp32 shards of weights, gradients and AdamW m, v =
16 bytes/param / N; bf16 gathered units). Batch 1 x 2048 tokens, no activation checkpointing, on 80 GB GPUs
(h100-80gb: 81559 MiB as nvidia-smi reports). Each number is `compress plan --device h100-80gb --fsdp N` of
the same stage (planner.predict_stage), split by term; the shape is configs/models/llama-3-8b (Llama-3-8B:
hidden 4096, 32 layers, FFN 14336, 8 kv heads, vocab 128256, untied).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from compress import memory, planner  # noqa: E402
from compress.stages import train  # noqa: E402

CONFIG = "configs/models/llama-3-8b"
DEVICE = "h100-80gb"
GPUS = (1, 2, 4, 8)
TERMS = [  # column, planner terms (one process without FSDP | FSDP)
    ("weights", ["input weights", "fp32 weight shards"]),
    ("gradients", ["gradients", "fp32 gradient shards"]),
    ("AdamW m, v", ["AdamW states (m, v)", "AdamW states (m, v; fp32 shards)"]),
    ("gathered units", ["gathered units (bf16: largest + its gradient, next layer)"]),
    ("activations", ["activations"]),
    ("logits + loss", ["logits + loss"]),
]


def gib(n: int) -> str:
    return f"{n / 2**30:.1f}"


def plans(batch: int = 1, seq: int = 2048) -> list[tuple[int, planner.StagePlan, dict, dict]]:
    """(gpus, plan, training-phase terms incl. resident input, sharding-phase terms) per GPU count."""
    state = planner.initial_state(REPO / CONFIG)
    cfg = train.Config(batch_size=batch, seq_len=seq, save_every=0)
    out = []
    for n in GPUS:
        p = planner.predict_stage(train, cfg, state, device=DEVICE, fsdp=n)
        training = {"input weights": p.breakdown["input weights"],
                    **memory.training_terms(state.shape, state.act_bytes, batch, seq, True, fsdp=n)}
        sharding = {} if n == 1 else {"whole fp32 model + shards": 4 * state.shape.params
                                      + -(-4 * state.shape.params // n)}
        out.append((n, p, training, sharding))
    return out


def table() -> str:
    head = ["GPUs", *(c for c, _ in TERMS), "training", "sharding", "peak per GPU", "fits 80 GB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n, p, training, sharding in plans():
        cells = [str(n) if n > 1 else "1 (no FSDP)"]
        cells += [gib(sum(training.get(k, 0) for k in keys)) for _, keys in TERMS]
        cells += [gib(sum(training.values())), gib(sum(sharding.values())) if sharding else "-",
                  gib(p.peak_bytes), "yes" if p.fits else "NO"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    text = f"""# Full fine-tuning of Llama-3-8B per GPU under FSDP

Computed by `python bench/fsdp_plan.py` from the planner's terms (compress/memory.py: training_terms,
fsdp_terms, training_parts); nothing here is measured. Each row equals the peak of
`compress plan PIPELINE.yaml --device {DEVICE} --fsdp N` for a pipeline with
`model: {CONFIG}` and `- train: {{batch_size: 1, seq_len: 2048}}` (no `data:`: training text adds ~20 MiB).

{table()}

GiB = 2^30 bytes. Batch 1 x 2048 tokens, no activation checkpointing. 1 GPU: no FSDP, compress/train.py's
recipe for a bf16 model (bf16 weights trained in place, bf16 gradients and AdamW m, v: 8 bytes/param).
2-8 GPUs: configs/accelerate/fsdp.yaml (FSDP2 full shard, mixed_precision bf16): accelerate upcasts the trained
parameters to fp32, so each GPU holds 1/N of fp32 weights, fp32 gradients and fp32 m, v (16 bytes/param / N),
plus bf16 gathered units (the 0.53B-parameter LM head, kept gathered from the end of forward, and its unsharded
gradient, plus the next 0.22B-parameter decoder layer); activations and logits are per GPU, as without FSDP.
"training" is that phase's sum, "sharding" is what each GPU holds while accelerate prepares the model (the whole
model upcast to fp32, 4 bytes/param, then its shards). Peak per GPU = the larger phase + the CUDA context
(512 MiB). The main process also saves, reloads and evaluates the whole trained model after the stage (not in
this table; `compress plan` shows it as the eval peak when the pipeline has an `eval:` block).

Reading: one 80 GB GPU fits only because compress trains a bf16 model in bf16 (8 bytes/param, no fp32 master).
FSDP with mixed_precision bf16 keeps fp32 master weights and fp32 AdamW states (16 bytes/param: 119.7 GiB for
8.03B parameters, before sharding), so 2 GPUs hold as much sharded state per GPU as 1 GPU without FSDP, plus the
gathered units, and do not fit; 4 GPUs fit with 30 GiB to spare, 8 with 45. Activations and logits (17.4 GiB)
do not shrink with N: past 8 GPUs they and the sharding phase (the whole fp32 copy accelerate makes on every
GPU before sharding, 29.9 GiB, plus the shards) bound the peak. Loading the stage input on the CPU under FSDP
(one unit at a time on the GPU while it is sharded) would remove that phase; compress does not do that yet.
On 2 GPUs, `mixed_precision: 'no'` in the accelerate config should keep the bf16 recipe, sharded (8 bytes/param / N);
the planner does not model that variant and it is untested on GPUs.
"""
    print(text)
    (REPO / "bench" / "results" / "fsdp-plan.md").write_text(text)


if __name__ == "__main__":
    main()
