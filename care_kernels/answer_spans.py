"""Answer spans: which completion tokens carry the answer that CARE's reference likelihood scores.

One implementation for every trainer: grpo_care's (`grpo-care train`) and the TRL adapter's
(care_kernels.integrations.trl.CareGRPOTrainer) both call this module.

    answer_mask = answer_token_mask(completion_ids, completion_mask, tokenizer)                   # content
    answer_mask = answer_token_mask(completion_ids, completion_mask, tokenizer, mode="official")  # the authors'
    positions = answer_positions(ids, tokenizer, mode="content")   # one unpadded row (list of ids)

Two rules (`answer_span` in grpo_care's config and in the TRL adapter's CareConfig), each applied to every row
on its own, with any left or right padding (only tokens inside `completion_mask` count):

- `content` (default): a token is in the span when its characters overlap the content of the first
  `<answer>...</answer>` of the completion text, stripped, i.e. exactly the string the accuracy reward grades
  (`ANSWER_RE`, which grpo_care's rewards use). With Qwen's BPE `<answer>A</answer>` gives the single token
  `>A` and `<answer> C </answer>` the token ` C`. No closed `<answer>` tag, or an empty answer, gives an
  empty span. Other tags can be given (`open_tag`, `close_tag`).
- `official`: the authors' `get_thinking_answer_masks` (grpo_care.md 5.2), per row. Scanning the row's
  tokens (their vocabulary strings, the pad token dropped) backwards, the answer token `a` is the last one
  whose string contains `answer` and whose window (previous, itself, next) joined contains `<answer>`; the
  authors' scan never looks at the last two tokens, nor does this. The span is the tokens after it up to 3
  before EOS: `a < j < max(a + 1, eos - 3)`, eos = the index of the row's EOS, or the row's length when it has
  none. So `<answer> C </answer>` gives [`>`, ` C`], and anything between `</answer>` and EOS shifts the span
  (a trailing "\\n" merges into `>\\n` with Qwen's BPE and does not; a trailing " " does). No match: empty.
  Departures, neither reachable by a chat-templated Qwen prompt: the window of the completion's first token
  starts at it (the authors' includes the prompt's last token), and a row that ended with `<|endoftext|>`
  ends its span before that token (the authors' mask, which only knows `<|im_end|>`, ran to the padded width).
  The rule is written for the `<answer>` tag: other tags are refused.

An empty span gives likelihood exp(0) = 1, as the authors'. The two rules choose different correct rollouts
above the group's mean likelihood (the `>` of the tag is almost certain under the reference), which is why
`official` exists: to reproduce the authors' bonus, not only their paper.

Token-to-character offsets come from each token's bytes for byte-level BPE tokenizers (Qwen, Llama 3, GPT-2),
and from prefix decoding for others. The tokenizer is duck-typed (a Hugging Face tokenizer: `encode`,
`decode`, `convert_ids_to_tokens`, `all_special_ids`, `pad_token_id`, `eos_token_id`); nothing here imports
transformers.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import torch

OPEN_TAG = "<answer>"
CLOSE_TAG = "</answer>"
ANSWER_SPAN_MODES = ("content", "official")


@functools.lru_cache(maxsize=16)
def answer_pattern(open_tag: str = OPEN_TAG, close_tag: str = CLOSE_TAG) -> re.Pattern:
    """`open_tag \\s* (content) \\s* close_tag`, lazily, across lines: group 1 is the stripped answer."""
    if not open_tag or not close_tag:
        raise ValueError(f"answer tags must be non-empty strings, got {open_tag!r} and {close_tag!r}")
    return re.compile(re.escape(open_tag) + r"\s*(.*?)\s*" + re.escape(close_tag), re.DOTALL)


# The string the accuracy reward grades (grpo_care.rewards imports it): the content span covers exactly it.
ANSWER_RE = answer_pattern()


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the byte-level alphabet back to bytes."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenPieces:
    """Per-token byte pieces of one tokenizer, so decoded text maps back to token positions."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special = set(tokenizer.all_special_ids)
        self.byte_level = self._check_byte_level()

    def _check_byte_level(self) -> bool:
        probe = "Hello <answer> Ä 中文 </answer>\n"
        ids = self.tokenizer.encode(probe, add_special_tokens=False)
        try:
            pieces = self._byte_pieces(ids)
        except KeyError:
            return False
        return b"".join(pieces).decode("utf-8", "replace") == self.tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def _byte_pieces(self, ids: list[int]) -> list[bytes]:
        decoder = _byte_decoder()
        tokens = self.tokenizer.convert_ids_to_tokens(ids)
        added = getattr(self.tokenizer, "added_tokens_encoder", {})
        out = []
        for i, tok in zip(ids, tokens):
            if i in self.special or tok is None:  # special, or a padded vocabulary row the tokenizer lacks
                out.append(b"")
            elif tok in added:
                out.append(tok.encode("utf-8"))
            else:
                out.append(bytes(decoder[ch] for ch in tok))
        return out

    def char_offsets(self, ids: list[int]) -> tuple[str, list[int]]:
        """(text, starts): text without special tokens; token j covers text[starts[j]:starts[j+1]]."""
        if self.byte_level:
            pieces = self._byte_pieces(ids)
            text = b"".join(pieces).decode("utf-8", "surrogateescape")
            byte_starts = [0]
            for p in pieces:
                byte_starts.append(byte_starts[-1] + len(p))
            char_at_byte = _char_index_of_bytes(text)
            return text, [char_at_byte[b] for b in byte_starts]
        starts = [0]
        for j in range(1, len(ids) + 1):
            prefix = self.tokenizer.decode(
                ids[:j], skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
            starts.append(len(prefix))
        text = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return text, starts


def _char_index_of_bytes(text: str) -> list[int]:
    """For every byte offset of text's UTF-8 (surrogateescape) encoding, the index of the char holding it."""
    out = []
    for ci, ch in enumerate(text):
        out.extend([ci] * len(ch.encode("utf-8", "surrogateescape")))
    out.append(len(text))
    return out


def answer_char_span(
    text: str, open_tag: str = OPEN_TAG, close_tag: str = CLOSE_TAG
) -> tuple[int, int] | None:
    """[start, end) of the stripped content of the first `<answer>...</answer>`, None if absent or empty."""
    match = answer_pattern(open_tag, close_tag).search(text)
    if match is None or match.start(1) == match.end(1):
        return None
    return match.start(1), match.end(1)


def span_of_tokens(starts: list[int], span: tuple[int, int] | None) -> list[int]:
    """Token indices whose character range [starts[j], starts[j+1]) overlaps `span`."""
    if span is None:
        return []
    lo, hi = span
    return [j for j in range(len(starts) - 1) if starts[j] < hi and starts[j + 1] > lo]


_PIECES: dict[int, TokenPieces] = {}


def token_pieces(tokenizer) -> TokenPieces:
    key = id(tokenizer)
    if key not in _PIECES or _PIECES[key].tokenizer is not tokenizer:
        _PIECES[key] = TokenPieces(tokenizer)
    return _PIECES[key]


def official_span(tokens: list[str], ends_with_eos: bool) -> list[int]:
    """The authors' answer span over one row's token strings (grpo_care.md 5.2), as indices into `tokens`.

    `tokens`: the row's completion tokens as vocabulary strings (`convert_ids_to_tokens`) with the pad token
    dropped, as the authors drop it (Qwen's pad is `<|endoftext|>`, so a row ending with it loses that EOS
    here). `ends_with_eos`: the last of `tokens` is the row's EOS; otherwise the EOS index is len(tokens)
    (a row cut at the length limit, or one whose EOS was the dropped pad).
    """
    answer = None
    for i in range(len(tokens) - 3, -1, -1):  # the authors' scan never reaches the last two tokens
        if "answer" in tokens[i] and "<answer>" in "".join(tokens[max(i - 1, 0) : i + 2]):
            answer = i
            break
    if answer is None:
        return []
    eos = len(tokens) - 1 if ends_with_eos else len(tokens)
    return list(range(answer + 1, max(answer + 1, eos - 3)))


def _official_positions(ids: list[int], tokenizer) -> list[int]:
    """official_span over a row's masked ids, as indices into `ids`."""
    pad = tokenizer.pad_token_id
    kept = [j for j, i in enumerate(ids) if i != pad]
    ends_with_eos = bool(kept) and kept[-1] == len(ids) - 1 and ids[-1] == tokenizer.eos_token_id
    tokens = [tokenizer.convert_ids_to_tokens(ids[j]) or "" for j in kept]
    return [kept[k] for k in official_span(tokens, ends_with_eos)]


def check_answer_span(mode: str, open_tag: str = OPEN_TAG, close_tag: str = CLOSE_TAG) -> None:
    """ValueError unless `mode` is a span rule that can use these tags."""
    if mode not in ANSWER_SPAN_MODES:
        raise ValueError(f"answer span mode must be one of {ANSWER_SPAN_MODES}, got {mode!r}")
    answer_pattern(open_tag, close_tag)
    if mode == "official" and (open_tag, close_tag) != (OPEN_TAG, CLOSE_TAG):
        raise ValueError(
            f"answer span 'official' is the authors' rule for {OPEN_TAG}...{CLOSE_TAG}; with the tags "
            f"{open_tag}...{close_tag} use 'content'"
        )


def answer_positions(
    ids: Sequence[int], tokenizer, mode: str = "content", open_tag: str = OPEN_TAG, close_tag: str = CLOSE_TAG
) -> list[int]:
    """Indices into `ids` (one completion, no padding inside; EOS, if any, last) of its answer span."""
    check_answer_span(mode, open_tag, close_tag)
    ids = [int(i) for i in ids]
    if mode == "official":
        return _official_positions(ids, tokenizer)
    text, starts = token_pieces(tokenizer).char_offsets(ids)
    return span_of_tokens(starts, answer_char_span(text, open_tag, close_tag))


def answer_token_mask(
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    tokenizer,
    mode: str = "content",
    open_tag: str = OPEN_TAG,
    close_tag: str = CLOSE_TAG,
) -> torch.Tensor:
    """bool [B, L]: the tokens of each row's answer span; rows may be padded anywhere.

    completion_ids [B, L] int, completion_mask [B, L] (nonzero = a real completion token, EOS included).
    mode: `content` (the graded answer's tokens) or `official` (the authors' span); see the module doc.
    """
    if completion_ids.shape != completion_mask.shape or completion_ids.dim() != 2:
        raise ValueError(
            f"completion_ids and completion_mask must both be [B, L], got {tuple(completion_ids.shape)} "
            f"and {tuple(completion_mask.shape)}"
        )
    check_answer_span(mode, open_tag, close_tag)
    out = torch.zeros(completion_ids.shape, dtype=torch.bool)
    ids_cpu, mask_cpu = completion_ids.cpu(), completion_mask.cpu().bool()
    for row in range(ids_cpu.shape[0]):
        positions = mask_cpu[row].nonzero()[:, 0]
        picked = answer_positions(ids_cpu[row, positions].tolist(), tokenizer, mode, open_tag, close_tag)
        if picked:
            out[row, positions[picked]] = True
    return out.to(completion_ids.device)
