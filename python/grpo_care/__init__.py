"""grpo_care: a thin GRPO-CARE (and GRPO) trainer for Qwen2.5-VL video QA and Hugging Face causal LMs,
built on care_kernels (every log-prob, group statistic and the loss head).

    from grpo_care.config import GRPOCareConfig
    from grpo_care.trainer import train
    summary = train(GRPOCareConfig.from_yaml("configs/seed_bench_r1_care.yaml"))

or `grpo-care train --config configs/seed_bench_r1_care.yaml`. See python/grpo_care/README.md.
"""

from care_kernels.version import __version__

__all__ = ["__version__", "GRPOCareConfig", "train", "evaluate"]


def __getattr__(name):  # lazy: importing the package must not import transformers
    if name == "GRPOCareConfig":
        from grpo_care.config import GRPOCareConfig

        return GRPOCareConfig
    if name == "train":
        from grpo_care.trainer import train

        return train
    if name == "evaluate":
        from grpo_care.evaluate import evaluate

        return evaluate
    raise AttributeError(f"module 'grpo_care' has no attribute {name!r}")
