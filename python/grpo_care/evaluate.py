"""Evaluation: SEED-Bench-R1 accuracy (grpo_care.md 9.3), Table 4's general video benchmarks (accuracy and
VSI-Bench's MRA, scored by problem type) and the consistency rate (9.4), per level and domain, resumable.

    result = evaluate(model, processor, "annotations/validation_L1.jsonl", config)
    result["accuracy"], result["per_level"], result["per_domain"], result["records"][0]

    report = evaluate_files(model, processor, files, config, output_dir="eval/", judge=make_judge("offline"))
    # eval/report.json: accuracy per level (L1, L2, L3) and per domain of each level, consistency rates
    # eval/samples.jsonl: one line per sample; a rerun skips the samples already in it (resume)
    report = evaluate_files(..., env=distributed.setup(config))    # under torchrun: data-parallel

Protocol: the eval question template (the authors' eval_bench.py wording), validation options in their A-D
order, temperature `eval_temperature` (0.1) and top_p `eval_top_p` (0.001), at most `eval_max_new_tokens`
(1024) new tokens and `eval_video_max_frames` frames (16 for SEED-Bench-R1; 32 for the general benchmarks).
Frames come through the training data path: decord (PyAV fallback), the same pixel budgets and processor;
with `eval_real_video_timing` (default, as the authors' vLLM evaluation) each video keeps its real temporal
spacing in M-RoPE (rollout.encode_prompts). The prediction is the stripped content of the first
`<answer>...</answer>`, or the whole output when that is missing or empty, scored by the sample's
`problem_type` (scoring.py: exact letter, the numerical rounding rule, VSI-Bench's mean relative accuracy,
ROUGE, 1 - WER). `accuracy` is the mean score of the non-regression samples and `mra` that of the regression
ones, as the authors report them (`mean_score`: all samples). The authors ran vLLM; this runs HF `generate` on
batches of `eval_batch_size` prompts. Samples whose media cannot be read are skipped, counted, and retried on
a rerun.

Annotation files: SEED-Bench-R1's validation JSONL, or Video-R1's evaluation JSON (`eval_vsibench.json`,
`eval_videommmu.json`, `eval_mmvu.json`, `eval_mvbench.json`, `eval_tempcompass.json`, `eval_videomme.json`:
a list of {problem_id, problem, options, problem_type, data_type, path, solution}; `path` is relative to the
file's parent's parent, e.g. `./Evaluation/MVBench/...` beside `Evaluation/eval_mvbench.json`).

Each record keeps the completion, its reasoning (`think`), the parsed answer, the gold answer, the problem type,
the score and correctness (score 1), whether the format reward would be 1 and, with a judge, its consistency
verdict (judge.py).
"""

from __future__ import annotations

import json
import re
import warnings
from collections import defaultdict
from pathlib import Path

import torch

from grpo_care.data import Sample, build_messages, load_samples, strip_instructions
from grpo_care.judge import JudgeRequest, consistency_summary, describe, judge_all
from grpo_care.modeling import autocast, is_multimodal
from grpo_care.prompts import load_visuals
from grpo_care.rewards import FORMAT_RE, extract_answer
from grpo_care.rollout import (
    encode_prompts,
    generate_rollouts,
    sampling_config,
    tokenizer_of,
    unsampleable_ids,
)
from grpo_care.scoring import REGRESSION, prediction, record_score, score_answer, summarize_scores
from grpo_care.user_errors import UsageError
from grpo_care.video import VideoReadError, VisualBudget

THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_LEVEL_RE = re.compile(r"(?:^|[_\-\s])(L\d+)$", re.IGNORECASE)
REPORT_NAME, SAMPLES_NAME = "report.json", "samples.jsonl"


def level_label(level: str) -> str:
    """ "validation_L3" -> "L3" (the paper's column names); other level names unchanged."""
    match = _LEVEL_RE.search(level or "")
    return match.group(1).upper() if match else level


def record_key(sample: Sample) -> str:
    """Identity of a sample in samples.jsonl: annotation file name and line (`validation_L1.jsonl:12`)."""
    return Path(sample.where).name


def _question(sample: Sample) -> str:
    """The question with its listed options, without the instructions of the template (either prompt style)."""
    return strip_instructions(sample.text)


def _accuracy_table(records: list[dict], key: str) -> dict:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if r.get(key):
            groups[r[key]].append(r)
    table = {}
    for name, rows in sorted(groups.items()):
        scores = summarize_scores(rows)
        table[name] = {"accuracy": scores["accuracy"], "num_samples": len(rows)}
        if scores["mra"] is not None:
            table[name]["mra"] = scores["mra"]
        table[name]["mean_score"] = scores["mean_score"]
        table[name]["per_problem_type"] = _per_problem_type(rows)
    return table


# ------------------------------------------------------------------------------------------------------------
# per-sample JSONL


def read_sample_records(path: str | Path) -> dict[str, dict]:
    """{key: record} from a samples.jsonl; a later line for a key wins; a torn last line is ignored."""
    path = Path(path)
    out: dict[str, dict] = {}
    if not path.is_file():
        return out
    lines = path.read_text(encoding="utf-8").splitlines()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if lineno == len(lines):  # an interrupted write: that sample is simply run again
                warnings.warn(f"{path}:{lineno}: ignoring a truncated last line", stacklevel=2)
                continue
            raise ValueError(f"{path}:{lineno}: malformed line in the per-sample file") from None
        if isinstance(record, dict) and "key" in record:
            out[record["key"]] = record
    return out


def protocol(config) -> dict:
    """The settings a per-sample file was produced with; resuming under different ones is refused."""
    return {
        "model": config.model_name_or_path,
        "temperature": config.eval_temperature,
        "top_p": config.eval_top_p,
        "max_new_tokens": config.eval_max_new_tokens,
        "video_max_frames": config.eval_video_max_frames,
        "real_video_timing": config.eval_real_video_timing,
        "seed": config.seed,
        "prompt_style": config.prompt_style,
    }


# what a per-sample file written before a protocol field existed was produced with
_PROTOCOL_BEFORE = {"real_video_timing": False, "prompt_style": "paper"}


def _drop_torn_tail(path: Path) -> None:
    """Cut an interrupted last write (no final newline), so that appended records start on their own line."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        warnings.warn(f"{path}: dropping a truncated last line (that sample runs again)", stacklevel=3)
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _meta_conflict(path: Path, meta: dict) -> str | None:
    """Why a per-sample file cannot be resumed under `meta` (written under other settings), or None."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    with path.open(encoding="utf-8") as f:
        first = f.readline()
    try:
        found = json.loads(first).get("meta")
    except (json.JSONDecodeError, AttributeError):
        found = None
    if found is None:
        return None
    found = {**_PROTOCOL_BEFORE, **found}
    if found == meta:
        return None
    diff = {k: (found.get(k), v) for k, v in meta.items() if found.get(k) != v}
    return (f"{path} was written under other evaluation settings {diff} (file, now): pass --overwrite "
            "(resume=False) or another --output_dir")


def resume_conflict(output_dir: str | Path, config) -> str | None:
    """Why `evaluate_files(..., output_dir, resume=True)` would refuse output_dir's per-sample files (another
    model or other settings), or None; nothing is read but their first lines, nothing written."""
    samples_file = Path(output_dir) / SAMPLES_NAME
    for path in [samples_file, *sorted(samples_file.parent.glob(f"{samples_file.stem}.rank*{samples_file.suffix}"))]:
        problem = _meta_conflict(path, protocol(config))
        if problem:
            return problem
    return None


def _check_or_write_meta(path: Path, meta: dict) -> None:
    """samples.jsonl starts with {"meta": protocol}; resuming a file written under another protocol fails (a
    UsageError: the user picks --overwrite or another --output_dir)."""
    if path.is_file():
        _drop_torn_tail(path)
    if path.is_file() and path.stat().st_size > 0:
        problem = _meta_conflict(path, meta)
        if problem:
            raise UsageError(problem)
        return
    path.write_text(json.dumps({"meta": meta}) + "\n", encoding="utf-8")


def _append_records(path: Path | None, records: list[dict]) -> None:
    if path is None or not records:
        return
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()


def rank_file(samples_file: Path, rank: int) -> Path:
    """Where rank r appends its records: samples.jsonl for rank 0, samples.rank<r>.jsonl for the others."""
    if rank == 0:
        return samples_file
    return samples_file.with_name(f"{samples_file.stem}.rank{rank}{samples_file.suffix}")


def merge_rank_files(samples_file: Path, meta: dict) -> int:
    """Append every samples.rank<r>.jsonl (other ranks' records, e.g. of an interrupted data-parallel run) to
    samples.jsonl and delete it; returns the number of records moved."""
    _check_or_write_meta(samples_file, meta)
    moved = 0
    for path in sorted(samples_file.parent.glob(f"{samples_file.stem}.rank*{samples_file.suffix}")):
        _check_or_write_meta(path, meta)
        records = list(read_sample_records(path).values())
        _append_records(samples_file, records)
        moved += len(records)
        path.unlink()
    return moved


# ------------------------------------------------------------------------------------------------------------
# one annotation file


@torch.no_grad()
def evaluate(
    model,
    processor_or_tokenizer,
    data_file: str,
    config,
    *,
    data_root: str | None = None,
    max_samples: int = 0,
    judge=None,
    samples_file: str | Path | None = None,
    resume: bool = True,
    shard: tuple[int, int] = (0, 1),
    done: dict[str, dict] | None = None,
) -> dict:
    """Accuracy (with a `judge`, also consistency) of `model` on one annotation file; see the module doc.

    Returns {"accuracy", "num_samples", "num_skipped", "per_level", "per_domain", "records", "consistency",
    "num_resumed"}; each record has key, data_file, sample_id, level, domain, completion, think, answer,
    gold, correct, format_ok and consistency (a verdict dict, or None without a judge).
    `samples_file`: every finished sample is appended there as it completes; with `resume`, samples already in
    it are not generated again (and, when a judge is given, only their missing verdicts are computed).
    `shard=(rank, world_size)`: this process runs every world_size-th unfinished sample and appends to its
    own `samples.rank<r>.jsonl` (rank 0: `samples_file` itself); the result then covers rank 0's resumed
    samples plus this rank's new ones (evaluate_files merges the ranks). `done`: the records of samples_file
    as every rank read them before any wrote (so that all ranks split the same unfinished samples); read here
    when None.
    """
    rank, world_size = shard
    tokenizer = tokenizer_of(processor_or_tokenizer)
    multimodal = is_multimodal(model)
    device = next(model.parameters()).device
    samples = load_samples(
        data_file,
        data_root or config.data_root or None,
        fmt=config.dataset_format,
        seed=config.seed,
        template="eval",
        prompt_style=config.prompt_style,
        limit=max_samples,
    )
    path = Path(samples_file) if samples_file else None
    own = rank_file(path, rank) if path is not None else None  # where this process appends
    if own is not None:
        own.parent.mkdir(parents=True, exist_ok=True)
    if own is not None and not resume and own.exists():
        own.unlink()
    if own is not None:
        _check_or_write_meta(own, protocol(config))
    if done is None:
        done = read_sample_records(path) if path is not None else {}
    by_key = {record_key(s): s for s in samples}
    finished = {k: r for k, r in done.items() if k in by_key}
    resumed = len(finished) if rank == 0 else 0
    produced: dict[str, dict] = {}  # what this process wrote in this call
    workers = getattr(config, "eval_judge_workers", 1)

    if judge is not None:  # resumed samples judged by no judge yet (or unjudged before) get a verdict now
        stale = [
            k for k in by_key
            if k in finished and not (finished[k].get("consistency") or {}).get("status") == "judged"
        ][rank::world_size]  # fmt: skip
        verdicts = judge_all(judge, [_request(by_key[k], finished[k]["completion"]) for k in stale], workers)
        for k, verdict in zip(stale, verdicts):
            finished[k] = produced[k] = {**finished[k], "consistency": verdict.to_dict()}
        _append_records(own, [finished[k] for k in stale])

    budget = VisualBudget.from_config(config, max_frames=config.eval_video_max_frames)
    generation_config = sampling_config(
        config, tokenizer, eval_mode=True, suppress_tokens=unsampleable_ids(model, tokenizer)
    )
    pending = [s for s in samples if record_key(s) not in finished][rank::world_size]
    skipped = 0
    # seeded here, without disturbing the caller's RNG (a demo may evaluate between training steps)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        for start in range(0, len(pending), config.eval_batch_size):
            items = []
            for sample in pending[start : start + config.eval_batch_size]:
                try:
                    items.append(load_visuals(sample, budget, multimodal))
                except VideoReadError as e:
                    skipped += 1
                    warnings.warn(
                        f"evaluation skips sample {sample.sample_id!r} ({sample.where}): {e}", stacklevel=2
                    )
            if not items:
                continue
            prompts = encode_prompts(
                [build_messages(it.sample, multimodal) for it in items],
                [im for it in items for im in it.images],
                [v for it in items for v in it.videos],
                processor_or_tokenizer,
                multimodal=multimodal,
                video_fps=[f for it in items for f in it.video_fps] if config.eval_real_video_timing else None,
            )
            prompts = {k: v.to(device) if torch.is_tensor(v) else v for k, v in prompts.items()}
            with autocast(device, config.bf16):
                rollout = generate_rollouts(model, prompts, generation_config, 1)
            texts = tokenizer.batch_decode(
                rollout.completion_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
            batch = [_record(item.sample, text, data_file) for item, text in zip(items, texts)]
            if judge is not None:
                verdicts = judge_all(
                    judge, [_request(it.sample, text) for it, text in zip(items, texts)], workers
                )
                for record, verdict in zip(batch, verdicts):
                    record["consistency"] = verdict.to_dict()
            _append_records(own, batch)
            finished.update((r["key"], r) for r in batch)
            produced.update((r["key"], r) for r in batch)

    mine = finished if rank == 0 else produced
    return _file_result([mine[k] for k in by_key if k in mine], skipped, resumed, judged=judge is not None)


def _file_result(records: list[dict], skipped: int, resumed: int, judged: bool) -> dict:
    n = len(records)
    scores = summarize_scores(records)
    return {
        "accuracy": scores["accuracy"] if scores["accuracy"] is not None else float("nan"),
        "mra": scores["mra"],
        "mean_score": scores["mean_score"],
        "num_samples": n,
        "num_skipped": skipped,
        "per_level": _accuracy_table(records, "level"),
        "per_domain": _accuracy_table(records, "domain"),
        "consistency": consistency_summary([r.get("consistency") for r in records]) if judged else None,
        "num_resumed": resumed,
        "records": records,
    }


def _merge_ranks(results: list[dict], judged: bool) -> dict:
    """One file's results from every rank -> the result of the whole file (a re-judged record, written by a
    later rank, replaces the resumed one rank 0 read)."""
    by_key: dict[str, dict] = {}
    for result in results:
        by_key.update((r["key"], r) for r in result["records"])
    records = sorted(by_key.values(), key=lambda r: _line_order(r["key"]))
    return _file_result(
        records,
        sum(r["num_skipped"] for r in results),
        sum(r["num_resumed"] for r in results),
        judged,
    )


def _line_order(key: str) -> tuple:
    """`validation_L1.jsonl:12` / `file.json:record 3` -> sortable (file, line number)."""
    name, _, where = key.rpartition(":")
    digits = re.search(r"(\d+)$", where)
    return (name, int(digits.group(1)) if digits else -1, where)


def _record(sample: Sample, text: str, data_file: str) -> dict:
    gold, answer = extract_answer(sample.solution), prediction(text)
    score = score_answer(answer, gold, sample.problem_type)
    think = THINK_RE.search(text)
    return {
        "key": record_key(sample),
        "data_file": str(data_file),
        "sample_id": sample.sample_id,
        "level": sample.level,
        "domain": sample.domain,
        "completion": text,
        "think": think.group(1).strip() if think else "",
        "answer": answer,
        "gold": gold,
        "problem_type": sample.problem_type,
        "score": score,
        "correct": score == 1.0,
        "format_ok": bool(FORMAT_RE.fullmatch(text)),
        "consistency": None,
    }


def _request(sample: Sample, completion: str) -> JudgeRequest:
    return JudgeRequest(question=_question(sample), options=list(sample.options), completion=completion)


# ------------------------------------------------------------------------------------------------------------
# several files: the report


def evaluate_files(
    model,
    processor_or_tokenizer,
    data_files: list[str],
    config,
    *,
    output_dir: str | Path | None = None,
    judge=None,
    data_root: str | None = None,
    max_samples: int = 0,
    resume: bool = True,
    env=None,
) -> dict:
    """`evaluate` on each file, then the report; with `output_dir`, writes report.json and samples.jsonl.

    The report has, per level (L1, L2, L3, named from the record's `task_level`/`level` or the file name),
    accuracy and sample counts, the same per domain within the level (`domain`/`scenario`: the L3 rows of
    Table 2), and the consistency rate when a judge is given; plus `files` (each file's numbers).

    `env` (a distributed.DistEnv under torchrun): data-parallel evaluation. Every rank holds the whole model
    and generates every world_size-th unfinished sample of each file, appending to its own
    samples.rank<r>.jsonl; rank 0 then merges the records into samples.jsonl and alone writes report.json.
    Every rank returns the same report. Rank files left by an interrupted run are merged when the next starts
    (so `output_dir` must be on a file system every rank sees).
    """
    from grpo_care import distributed

    rank, world_size = (env.rank, env.world_size) if env is not None and env.enabled else (0, 1)
    data_files = list(dict.fromkeys(str(p) for p in data_files))  # each file once
    names = [Path(p).name for p in data_files]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ValueError(
            f"annotation files with the same name {clashes} in {data_files}: samples.jsonl keys records by file "
            "name and line; rename one, or evaluate them into different output directories"
        )
    out = Path(output_dir) if output_dir else None
    samples_file = out / SAMPLES_NAME if out else None
    if samples_file is not None and rank == 0:  # start from one samples.jsonl: merged (resume) or none
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            for path in [samples_file, *out.glob(f"{samples_file.stem}.rank*{samples_file.suffix}")]:
                path.unlink(missing_ok=True)
        merge_rank_files(samples_file, protocol(config))
    done = None
    if world_size > 1 and samples_file is not None:  # rank 0's view, so every rank splits the same samples
        done = distributed.broadcast_object(read_sample_records(samples_file) if rank == 0 else None, env)
        resume = True
    results = {}
    for path in data_files:
        results[str(path)] = evaluate(
            model,
            processor_or_tokenizer,
            path,
            config,
            data_root=data_root,
            max_samples=max_samples,
            judge=judge,
            samples_file=samples_file,
            resume=resume,
            shard=(rank, world_size),
            done=done,
        )
        resume = True  # later files append to the file this run started
    if world_size > 1:
        every_rank = distributed.gather_objects(results, env)  # also: every rank has finished writing
        results = {path: _merge_ranks([r[path] for r in every_rank], judge is not None) for path in results}
        if rank == 0 and samples_file is not None:
            merge_rank_files(samples_file, protocol(config))
    report = build_report(results, config, judge)
    if out is not None:
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            tmp = out / (REPORT_NAME + ".tmp")
            tmp.write_text(json.dumps(report, indent=2))
            tmp.replace(out / REPORT_NAME)
        report["report_file"], report["samples_file"] = str(out / REPORT_NAME), str(samples_file)
    if world_size > 1:
        distributed.barrier(env)  # the files are complete when any rank returns
    report["results"] = results
    return report


def _group_summary(records: list[dict], judged: bool) -> dict:
    n = len(records)
    summary = {
        **summarize_scores(records),  # accuracy (non-regression), mra (regression), mean_score (all)
        "num_samples": n,
        "num_correct": sum(1 for r in records if r["correct"]),
        "format_rate": sum(1 for r in records if r["format_ok"]) / n if n else None,
        "per_problem_type": _per_problem_type(records),
    }
    if judged:
        summary["consistency"] = consistency_summary([r.get("consistency") for r in records])
    return summary


def _per_problem_type(records: list[dict]) -> dict:
    """{problem_type: {"mean_score", "num_samples", "metric"}}: accuracy or VSI-Bench's MRA, kept apart."""
    kinds: dict[str, list[float]] = defaultdict(list)
    for r in records:
        kinds[r.get("problem_type", "multiple choice")].append(record_score(r))
    return {
        kind: {"mean_score": sum(v) / len(v), "num_samples": len(v), "metric": _metric(kind)}
        for kind, v in sorted(kinds.items())
    }


def _metric(problem_type: str) -> str:
    return "mra" if problem_type == REGRESSION else "accuracy"


def build_report(results: dict, config, judge=None) -> dict:
    """The JSON report (no per-sample records) from `evaluate` results keyed by file."""
    records = [r for result in results.values() for r in result["records"]]
    judged = judge is not None
    levels: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        levels[level_label(r["level"])].append(r)
    per_level = {}
    for level, rows in sorted(levels.items()):
        domains: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            if r.get("domain"):
                domains[r["domain"]].append(r)
        per_level[level] = {
            **_group_summary(rows, judged),
            "per_domain": {d: _group_summary(v, judged) for d, v in sorted(domains.items())},
        }
    return {
        "protocol": {**protocol(config), "batch_size": config.eval_batch_size},
        "judge": describe(judge),
        "num_samples": len(records),
        "num_skipped": sum(r["num_skipped"] for r in results.values()),
        "per_level": per_level,
        "consistency": consistency_summary([r.get("consistency") for r in records]) if judged else None,
        "files": {
            path: {k: v for k, v in result.items() if k != "records"} for path, result in results.items()
        },
    }
