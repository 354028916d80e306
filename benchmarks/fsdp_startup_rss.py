"""Peak host memory of each rank while the trainer starts under FSDP2 (gloo, CPU), for a model read from files.

    torchrun --nproc_per_node 4 benchmarks/fsdp_startup_rss.py [WORK_DIR]

Rank 0 writes (in a child process) a 157M-parameter Qwen2 (fp32, 601 MB of weights, untied head) and a small
synthetic training file into WORK_DIR (default /tmp/ck_fsdp_startup), then every rank builds
`grpo_care.trainer.Trainer` for GRPO-CARE with `distributed: fsdp` and prints one JSON line: its peak RSS
(VmHWM) before and after the trainer's construction (model, EMA reference, sharding, optimizer), in MiB.
Not part of `pytest benchmarks/`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch


def peak_rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return float("nan")


def write_inputs(work: Path) -> None:
    from grpo_care.synthetic import write_seed_bench_r1
    from grpo_care.tiny import byte_tokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = byte_tokenizer()
    config = Qwen2Config(
        vocab_size=32768, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=4, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    write_seed_bench_r1(work / "data", n_train=4, n_val=0)
    (work / "ready").touch()


def main() -> None:
    import time

    from grpo_care.config import GRPOCareConfig
    from grpo_care.trainer import Trainer

    torch.set_num_threads(1)
    work = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/ck_fsdp_startup")
    rank = int(os.environ["RANK"])
    if rank == 0 and not (work / "ready").exists():  # in a child process: its memory is not this one's peak
        subprocess.run([sys.executable, __file__, "--prepare", str(work)], check=True)
    while not (work / "ready").exists():  # no process group before the trainer makes one
        time.sleep(0.5)
    before = peak_rss_mib()
    config = GRPOCareConfig(
        model_name_or_path=str(work / "model"), train_file=str(work / "data/annotations/training.jsonl"),
        output_dir=str(work / f"out-{os.getpid()}"), device="cpu", distributed="fsdp", num_generations=2,
        per_device_train_batch_size=1, max_steps=1, report_to=["none"], disable_tqdm=True, use_care=True,
    )  # fmt: skip
    trainer = Trainer(config)
    print(json.dumps({"rank": rank, "world_size": trainer.dist.world_size, "peak_rss_before_mib": round(before),
                      "peak_rss_after_init_mib": round(peak_rss_mib())}), flush=True)
    from grpo_care.distributed import cleanup

    cleanup()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--prepare"]:
        write_inputs(Path(sys.argv[2]))
    else:
        main()
