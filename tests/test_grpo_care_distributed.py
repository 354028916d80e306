"""grpo_care under torchrun: 2 CPU processes (gloo), DDP and FSDP2, GRPO-CARE on tiny models.

One `torch.distributed.run` launch (127.0.0.1, a free port) runs this file as the worker. Per run: 2 optimizer
steps (2 micro-batches each, a checkpoint at each step); then a fresh trainer (another initial model where
the model is passed in) resumes from checkpoint-1 and runs step 2 again. The tests check that both ranks end with
identical full parameters, that they read disjoint halves of the data, that DDP and FSDP2 (LM head gathered
for the fused loss, sharded EMA reference) reach the same weights, that rank 0 alone wrote the logs and
checkpoints (loadable with from_pretrained), and that a resumed run ends bit for bit where a straight one did,
from sharded (torch.distributed.checkpoint) and from gathered checkpoints; and that a model read from files
under FSDP2 is read by rank 0 alone (meta skeletons elsewhere) and trains exactly as the same model passed in.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

MODES = ("ddp", "fsdp", "fsdp_files")
# text model (untied LM head): DDP and FSDP2 with a resume each; tiny Qwen2.5-VL under FSDP2, where in some
# micro-batches one rank has a video and the other only an image (samples 3 and 7 of the synthetic set).
# fsdp: the model object is passed in, checkpoints sharded (torch.distributed.checkpoint);
# fsdp_files: the same model read from a directory (meta skeletons, rank 0 alone reads the weights), checkpoints
# gathered on rank 0 (fsdp_sharded_checkpoints=False); fsdp_vl reads its (tied) model from a directory too.
RUNS = ("ddp", "fsdp", "fsdp_vl", "fsdp_files")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _full_state(model) -> dict:
    """Every parameter in full on every rank (FSDP2: one all-gather per DTensor)."""
    from grpo_care.distributed import full_tensor

    return {k: full_tensor(v).detach().cpu() for k, v in model.state_dict().items()}


def _checksum(state: dict) -> list[float]:
    return [float(state[k].double().sum()) + float(state[k].double().abs().sum()) for k in sorted(state)]


def _untied_qwen2(tok, seed: int = 0):
    """tiny_qwen2 with its own LM head (as Qwen2.5-VL-7B has): the head FSDP must gather for the loss."""
    from grpo_care.tiny import tiny_qwen2
    from transformers import Qwen2ForCausalLM

    config = tiny_qwen2(tok).config
    config.tie_word_embeddings = False
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).eval()


def _worker(data_file: str, out: str) -> None:
    import torch.distributed as dist
    from grpo_care import distributed
    from grpo_care.config import GRPOCareConfig
    from grpo_care.synthetic import write_tiny_model
    from grpo_care.tiny import byte_tokenizer
    from grpo_care.trainer import Trainer

    torch.set_num_threads(1)
    tok = byte_tokenizer()
    model_dir, vl_dir = Path(out) / "untied_qwen2", Path(out) / "tiny_qwen2_5_vl"
    if int(os.environ["RANK"]) == 0:  # read in later runs, after the first run's collectives
        _untied_qwen2(tok).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        write_tiny_model(vl_dir)
    reads = _count_weight_reads()
    results = {}
    for run_name in RUNS:
        mode, vision, files = run_name.split("_")[0], run_name.endswith("_vl"), run_name.startswith("fsdp_")
        reads.clear()

        def config(run, run_name=run_name, mode=mode, files=files, vision=vision, **overrides):
            values = dict(
                train_file=data_file,
                output_dir=str(Path(out) / run_name / run),
                device="cpu",
                distributed=mode,
                num_generations=2,
                per_device_train_batch_size=1,
                gradient_accumulation_steps=2,
                max_steps=2,
                max_completion_length=6,
                learning_rate=1e-3,
                ref_ema_update_every=1,
                reward_funcs=["test_grpo_care_distributed.length_parity_reward", "format"],
                report_to=["none"],
                log_completions_steps=1,
                save_steps=1,
                disable_tqdm=True,
                dist_timeout=120,
                video_max_frames=4,
                video_min_pixels=3136,
                video_max_pixels=3136,
                image_max_pixels=3136,
            )
            if files:
                values.update(model_name_or_path=str(vl_dir if vision else model_dir))
            if run_name == "fsdp_files":
                values.update(fsdp_sharded_checkpoints=False)
            values.update(overrides)
            return GRPOCareConfig(**values)

        def trainer(run, seed=0, files=files, **overrides):
            if files:  # the trainer loads the model itself: on the meta device, weights from rank 0
                return Trainer(config(run, **overrides))
            return Trainer(config(run, **overrides), model=_untied_qwen2(tok, seed=seed), tokenizer=tok)

        straight = trainer("straight")
        summary = straight.train()
        state = _full_state(straight.model)
        # resume from checkpoint-1 (a copy) in a fresh trainer (a model passed in starts elsewhere: seed 7)
        if straight.dist.is_main:
            shutil.copytree(
                Path(out) / run_name / "straight" / "checkpoint-1", Path(out) / run_name / "resumed" / "checkpoint-1"
            )
        dist.barrier()
        torch.manual_seed(1234)
        resumed = trainer("resumed", seed=7, resume_from_checkpoint="latest")
        resumed.train()
        resumed_state = _full_state(resumed.model)
        resumed_equal = all(torch.equal(state[k], resumed_state[k]) for k in state)

        per_rank = distributed.gather_objects(
            {
                "checksum": _checksum(state),
                "sample_ids": [s.sample_id for s in straight.stream.samples],
                "losses": summary["losses"],
                "grad_norm": summary["metrics"]["grad_norm"],
                "weight_reads": list(reads),
            },
            straight.dist,
        )
        if straight.dist.is_main:
            torch.save(state, Path(out) / f"{run_name}_final.pt")
            results[run_name] = {"ranks": per_rank, "resumed_equal": resumed_equal}
    if dist.get_rank() == 0:
        (Path(out) / "results.json").write_text(json.dumps(results))
    distributed.cleanup()


def _count_weight_reads() -> list:
    """Records every from_pretrained of a model on this rank (the list is returned and appended to)."""
    from transformers import PreTrainedModel

    reads, original = [], PreTrainedModel.from_pretrained.__func__

    def counting(cls, path, *args, **kwargs):
        reads.append(Path(str(path)).name)
        return original(cls, path, *args, **kwargs)

    PreTrainedModel.from_pretrained = classmethod(counting)
    return reads


def length_parity_reward(completions, **_):
    """A deterministic stand-in accuracy with variation inside a group (random tiny models get gradients)."""
    return [float(len(c) % 2) for c in completions]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pytest.importorskip("av", reason="the synthetic clips are written with PyAV (pip install av)")
    from grpo_care.synthetic import write_seed_bench_r1

    root = tmp_path_factory.mktemp("dist")
    paths = write_seed_bench_r1(root / "data", n_train=8, n_val=0)
    out = root / "out"
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join([str(repo), str(repo / "python"), env.get("PYTHONPATH", "")]),
    )
    for _attempt in range(2):  # the free port may be taken between the probe and the launch: try another
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=1",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}",
            __file__,
            paths["training"],
            str(out),
        ]
        proc = subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True, timeout=240)
        if proc.returncode == 0 or "address already in use" not in proc.stderr.lower():
            break
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("mode", RUNS)
def test_ranks_stay_in_sync_on_disjoint_data(run, mode):
    out, results = run
    r0, r1 = results[mode]["ranks"]
    assert r0["checksum"] == r1["checksum"]  # identical full parameters after 2 optimizer steps
    assert r0["grad_norm"] > 0 and r0["losses"] == r1["losses"]  # metrics are reduced over the ranks
    assert r0["sample_ids"] and not set(r0["sample_ids"]) & set(r1["sample_ids"])  # each rank its half


@pytest.mark.parametrize("mode", MODES)
def test_rank_zero_writes_one_loadable_checkpoint_and_resume_matches(run, mode):
    from grpo_care.checkpoint import load_trainer_state
    from safetensors.torch import load_file

    out, results = run
    run_dir = out / mode / "straight"
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-1",
        "checkpoint-2",
    ]
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
    ]
    state = load_trainer_state(run_dir / "checkpoint-2")
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    assert state["distributed"] == mode.split("_")[0]
    sharded = run_dir / "checkpoint-2" / "sharded"
    if mode == "fsdp":  # each rank wrote its shards of the AdamW state and EMA shadow; nothing in trainer_state
        assert (sharded / ".metadata").is_file() and len(list(sharded.glob("*.distcp"))) == 2
        assert state["sharded_state"] == "sharded" and state["optimizer"] is None
        assert state["ema"] == {"shadow": None, "num_updates": 2}
    else:  # gathered on rank 0
        assert not sharded.exists() and state["optimizer"]["state"] and len(state["ema"]["shadow"]) > 0
    saved = load_file(str(run_dir / "checkpoint-2" / "model.safetensors"))
    final = torch.load(out / f"{mode}_final.pt")
    assert saved.keys() == final.keys()
    assert all(torch.equal(saved[k], final[k]) for k in saved)  # the HF weights are the full, synced model
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(run_dir / "checkpoint-2"))
    assert torch.equal(loaded.lm_head.weight, final["lm_head.weight"])
    assert results[mode]["resumed_equal"]


def test_fsdp_from_files_reads_the_weights_on_rank_zero_only_and_trains_alike(run):
    out, results = run
    r0, r1 = results["fsdp_files"]["ranks"]
    # the straight trainer reads the model, the resumed one only the checkpoint it resumes: all on rank 0
    assert r0["weight_reads"] == ["untied_qwen2", "checkpoint-1"]
    assert r1["weight_reads"] == []  # rank 1 built meta skeletons and received its shards by broadcast
    vl0, vl1 = results["fsdp_vl"]["ranks"]  # tied head, vision tower; resumed from a sharded checkpoint
    assert vl0["weight_reads"] == ["tiny_qwen2_5_vl", "checkpoint-1"] and vl1["weight_reads"] == []
    assert results["fsdp_vl"]["resumed_equal"]
    from_files, passed_in = torch.load(out / "fsdp_files_final.pt"), torch.load(out / "fsdp_final.pt")
    assert from_files.keys() == passed_in.keys()
    for key in from_files:
        assert torch.equal(from_files[key], passed_in[key]), key


def test_ddp_and_fsdp2_reach_the_same_weights(run):
    out, _ = run
    from grpo_care.tiny import byte_tokenizer

    ddp, fsdp = torch.load(out / "ddp_final.pt"), torch.load(out / "fsdp_final.pt")
    assert ddp.keys() == fsdp.keys()
    start = _untied_qwen2(byte_tokenizer()).state_dict()
    assert not torch.equal(ddp["lm_head.weight"], start["lm_head.weight"])  # the steps moved the LM head
    assert not torch.equal(ddp["lm_head.weight"], ddp["model.embed_tokens.weight"])
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=1e-4, atol=1e-5, msg=key)


def test_one_process_needs_no_setup(monkeypatch):
    from grpo_care.config import GRPOCareConfig
    from grpo_care.distributed import forward, reduce_metrics, setup, shard_samples

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    env = setup(GRPOCareConfig(device="cpu"))  # auto, no torchrun: a single process, no process group
    assert (env.mode, env.world_size, env.is_main, env.enabled) == ("none", 1, True, False)
    assert shard_samples([1, 2, 3], env) == [1, 2, 3] and reduce_metrics({"a": 1.0}, env) == {"a": 1.0}
    assert forward(torch.nn.Linear(1, 1), lambda: 7) == 7
    with pytest.warns(UserWarning, match="not launched by torchrun"):
        assert setup(GRPOCareConfig(device="cpu", distributed="fsdp")).mode == "none"
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="distributed=none"):
        setup(GRPOCareConfig(device="cpu", distributed="none"))
    with pytest.raises(ValueError, match="distributed must be"):
        GRPOCareConfig(distributed="zero3")
    with pytest.raises(ValueError, match="dist_timeout must be > 0"):
        GRPOCareConfig(dist_timeout=0)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
    # Everything is written and the process group destroyed. Leave without interpreter finalization: there, a
    # gloo worker thread still holding a finished collective's tensors can abort the process ("terminate called
    # without an active exception"; pytorch/pytorch#179291), rarely (1 run in ~20 here), after the test's work.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
