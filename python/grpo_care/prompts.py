"""The training prompt stream: samples in a seeded order, their frames loaded, bad media skipped and counted.

    stream = PromptStream(samples, batch_size=1, seed=42, budget=VisualBudget(), multimodal=True)
    batch = stream.next_batch()          # [PromptItem(sample, images, videos)]
    stream.state_dict()                  # {"epoch", "cursor", "skipped", "bad", "fingerprint"}: a checkpoint's

Each epoch visits the samples in `torch.randperm(n, generator=seed + epoch)` order, so a position (epoch,
cursor) is enough to continue exactly after a restart. A sample whose video or image is missing or cannot be
decoded is skipped with a warning (once) and counted in `skipped` each time it comes up (logged as
`data/skipped_samples`). A position is restored only onto the same samples (their ids, texts and solutions,
in order: the `fingerprint`), wherever the files now are.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field

import torch

from grpo_care.data import Sample
from grpo_care.video import VideoReadError, VisualBudget, read_image, read_video_clip


@dataclass
class PromptItem:
    sample: Sample
    images: list = field(default_factory=list)
    videos: list = field(default_factory=list)
    video_fps: list = field(default_factory=list)  # the rate each video's frames were sampled at


def load_visuals(sample: Sample, budget: VisualBudget, multimodal: bool) -> PromptItem:
    """Frames and image of a sample (none for a text-only model); raises VideoReadError on bad media."""
    item = PromptItem(sample)
    if not multimodal:
        return item
    if sample.video:
        clip = read_video_clip(sample.video, budget)
        item.videos.append(clip.frames)
        item.video_fps.append(clip.sampled_fps)
    if sample.image:
        item.images.append(read_image(sample.image, budget))
    return item


class PromptStream:
    def __init__(
        self,
        samples: list[Sample],
        batch_size: int,
        seed: int,
        budget: VisualBudget,
        multimodal: bool,
        all_samples: list[Sample] | None = None,
    ):
        """`all_samples`: the whole data set when `samples` is one rank's share of it; the fingerprint covers the
        whole set, so every rank reaches the same verdict on resume."""
        if not samples:
            raise ValueError("the training data is empty")
        self.samples, self.batch_size, self.seed = samples, batch_size, seed
        self.budget, self.multimodal = budget, multimodal
        self.epoch, self.cursor, self.skipped = 0, 0, 0
        self.bad: set[int] = set()
        whole = samples if all_samples is None else all_samples
        self.fingerprint, self.num_samples = fingerprint(whole), len(whole)
        self._order = self._permutation(0)
        self._warned_text_only = False

    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.samples), generator=generator).tolist()

    def epoch_progress(self) -> float:
        return self.epoch + self.cursor / len(self.samples)

    def next_batch(self) -> list[PromptItem]:
        out: list[PromptItem] = []
        while len(out) < self.batch_size:
            if self.cursor >= len(self.samples):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            index = self._order[self.cursor]
            sample = self.samples[index]
            self.cursor += 1
            drops_media = not self.multimodal and (sample.video or sample.image)
            if drops_media and not self._warned_text_only:
                warnings.warn("the model is text-only: the media of the samples are dropped", stacklevel=2)
                self._warned_text_only = True
            if index in self.bad:  # known bad media: skipped (and counted) again, without re-reading
                self.skipped += 1
                continue
            try:
                out.append(load_visuals(sample, self.budget, self.multimodal))
            except VideoReadError as e:
                self.skipped += 1
                self.bad.add(index)
                warnings.warn(f"skipping sample {sample.sample_id!r} ({sample.where}): {e}", stacklevel=2)
                if len(self.bad) == len(self.samples):
                    raise RuntimeError("no sample of the training data has readable media") from e
        return out

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "skipped": self.skipped,
            "bad": sorted(self.bad),
            "fingerprint": self.fingerprint,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("fingerprint")
        if saved is not None and saved != self.fingerprint:
            raise ValueError(
                f"the training data differs from the checkpoint's ({state.get('num_samples')} samples then, "
                f"{self.num_samples} now, or other ids, texts or order): resume with the checkpoint's train_file, "
                "max_train_samples, seed and prompt_style"
            )
        self.epoch, self.cursor, self.skipped = (
            int(state["epoch"]),
            int(state["cursor"]),
            int(state["skipped"]),
        )
        self.bad = {int(i) for i in state.get("bad", [])}  # known bad media stay skipped without a re-read
        self._order = self._permutation(self.epoch)


def fingerprint(samples: list[Sample]) -> str:
    """sha256 over each sample's id, text and solution, in order: what makes a saved position meaningful."""
    digest = hashlib.sha256()
    for sample in samples:
        for part in (sample.sample_id, sample.text, sample.solution):
            digest.update(part.encode())
            digest.update(b"\0")
    return digest.hexdigest()
