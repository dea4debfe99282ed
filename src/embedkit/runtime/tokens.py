"""Tokenisation for the serving path: Rust ``tokenizers`` configured from the manifest.

``tokenizer.json`` files carry whatever padding/truncation their author saved
(all-MiniLM-L6-v2's says 128 tokens, its model says 256). The manifest is the
contract, so both are reset here and truncation is set from
:class:`~embedkit.model.artifact.TokenizerSpec`. Ids come back unpadded: the engine
pads each sub-batch only to its own longest text.

Used by the engine and by the HTTP front service (which loads no ONNX session),
so this module imports neither onnxruntime nor torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from tokenizers import Tokenizer

from embedkit.core.errors import ArtifactError, InputTooLong, InvalidInput
from embedkit.model.artifact import TokenizerSpec

Direction = Literal["right", "left"]

if TYPE_CHECKING:
    from embedkit.model.artifact import Artifact


def validate_texts(texts: object) -> list[str]:
    """A non-empty list of strings, or :class:`InvalidInput` naming the first bad item.

    Empty strings are accepted (sentence-transformers embeds them as just the
    special tokens). A bare string is refused rather than split into characters.
    """
    if isinstance(texts, str) or not isinstance(texts, list | tuple):
        raise InvalidInput(
            f"input must be a list of strings, got {type(texts).__name__}", param="input"
        )
    if not texts:
        raise InvalidInput("input must not be an empty list", param="input")
    for i, text in enumerate(texts):
        if text is None:
            raise InvalidInput(f"input[{i}] is null; every item must be a string", param="input")
        if not isinstance(text, str):
            raise InvalidInput(
                f"input[{i}] is a {type(text).__name__}; every item must be a string",
                param="input",
            )
    return list(texts)


class TextTokenizer:
    """Texts → token ids with special tokens, truncated per the manifest, never padded.

    Thread-safe: the underlying tokenizers (untruncated, and truncating from each side)
    are configured once here and only read afterwards (toggling truncation per call
    would race between threads).
    """

    def __init__(self, tokenizer_json: Path, spec: TokenizerSpec) -> None:
        try:
            full, right, left = (Tokenizer.from_file(str(tokenizer_json)) for _ in range(3))
        except Exception as exc:  # the Rust loader raises bare Exceptions
            raise ArtifactError(f"cannot load tokenizer {tokenizer_json}: {exc}") from exc
        for tok in (full, right, left):
            tok.no_padding()
            tok.no_truncation()
        # The post-processor adds the special tokens after truncation, so either side
        # keeps the [CLS] … [SEP] frame; the manifest's side is the default.
        right.enable_truncation(spec.max_length, strategy="longest_first", direction="right")
        left.enable_truncation(spec.max_length, strategy="longest_first", direction="left")
        self._full = full
        self._by_side: dict[str, Tokenizer] = {"right": right, "left": left}
        self.spec = spec
        self.max_length = spec.max_length
        self.pad_id = spec.pad_id
        self.vocab_size = int(full.get_vocab_size(with_added_tokens=True))
        # [CLS]/[PAD] in BERT, <s>/<pad>/</s> in XLM-R and MPNet: never content.
        self.special_ids = frozenset(
            i for i, token in full.get_added_tokens_decoder().items() if token.special
        )
        self._prefix, self._suffix = self._special_frame(full)

    @classmethod
    def from_artifact(cls, artifact: Artifact) -> TextTokenizer:
        return cls(artifact.tokenizer_path, artifact.manifest.tokenizer)

    @staticmethod
    def _special_frame(tok: Tokenizer) -> tuple[list[int], list[int]]:
        """The special ids the post-processor puts before and after content ([CLS] … [SEP])."""
        enc = tok.encode("a")
        content = [i for i, special in enumerate(enc.special_tokens_mask) if not special]
        if not content:  # pragma: no cover - a tokenizer that cannot encode "a"
            return [], []
        return list(enc.ids[: content[0]]), list(enc.ids[content[-1] + 1 :])

    def _lower(self, texts: Sequence[str]) -> Sequence[str]:
        # sentence-transformers lowercases in Python before tokenising; so do we.
        return [t.lower() for t in texts] if self.spec.do_lower_case else texts

    def encode(self, texts: Sequence[str], *, truncate: bool = True) -> list[list[int]]:
        """Token ids (special tokens included, unpadded) of ``texts`` in one batch call.

        With ``truncate=False`` a text longer than ``max_length`` raises
        :class:`InputTooLong` naming its index and token count.
        """
        return self.encode_counted(texts, truncate=truncate)[0]

    def encode_counted(
        self,
        texts: Sequence[str],
        *,
        truncate: bool = True,
        direction: Direction | None = None,
        keep: int = 0,
    ) -> tuple[list[list[int]], int]:
        """:meth:`encode` from the ``direction`` side (default: the manifest's), plus how
        many texts truncation cut.

        ``keep``: leading content tokens a cut from the left never removes — a prompt's
        (``len(Prompt.ids)``), put before each text. A cut from the right takes the text's
        end and leaves them anyway.
        """
        texts = self._lower(texts)
        side = direction or self.spec.truncation_side
        if truncate and keep and side == "left":
            return self._encode_keeping(texts, keep)
        tok = self._by_side[side] if truncate else self._full
        encodings = tok.encode_batch(list(texts), add_special_tokens=True)
        ids = [e.ids for e in encodings]
        if not truncate:
            for i, row in enumerate(ids):
                if len(row) > self.max_length:
                    raise InputTooLong(
                        f"input[{i}] has {len(row)} tokens, more than the model's limit of "
                        f"{self.max_length} (truncation is off)",
                        param="input",
                    )
        # A cut encoding keeps what it dropped in `overflowing` (stride 0: no overlap).
        return ids, sum(1 for e in encodings if e.overflowing)

    def _encode_keeping(self, texts: Sequence[str], keep: int) -> tuple[list[list[int]], int]:
        """Cut from the left, but after the special prefix and ``keep`` content tokens:
        a prompt stays whole and its text loses its start. The Rust truncation would cut
        the prompt first (sentence-transformers with ``truncation_side="left"`` does, and
        then its include_prompt=false pooling skips the text's first tokens instead)."""
        head = len(self._prefix) + keep
        cut = 0
        out: list[list[int]] = []
        for enc in self._full.encode_batch(list(texts), add_special_tokens=True):
            row = list(enc.ids)
            if len(row) > self.max_length:
                # A prompt that leaves the text no room: only the prompt's start fits, as
                # with a cut from the right.
                h = min(head, self.max_length - len(self._suffix))
                row = row[:h] + row[len(row) - (self.max_length - h) :]
                cut += 1
            out.append(row)
        return out, cut

    def prompt_length(self, prompt: str) -> int:
        """Leading positions a prompt takes when prepended (what an include_prompt=false
        pooling skips): its tokens with the special prefix, truncated as a text would be,
        less a trailing special token — sentence-transformers' own count."""
        enc = self._by_side[self.spec.truncation_side].encode(self._lower([prompt])[0])
        n = len(enc.ids)
        return n - 1 if n and enc.special_tokens_mask[-1] else n

    def content_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens (a prompt before token-id input)."""
        return list(self._full.encode(self._lower([text])[0], add_special_tokens=False).ids)

    @property
    def frame(self) -> tuple[list[int], list[int]]:
        """The special ids :meth:`encode` puts before and after every text's content."""
        return list(self._prefix), list(self._suffix)

    def encode_content(self, texts: Sequence[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Per text: its content token ids (no special tokens, never truncated) and each
        token's ``(start, end)`` character span in the text as given (not lowercased).

        ``frame`` + content is what :meth:`encode` returns for a text within the limit.
        """
        lowered = self._lower(texts)
        encodings = self._full.encode_batch(list(lowered), add_special_tokens=False)
        return [
            (list(e.ids), _original_spans(text, low, e.offsets))
            for text, low, e in zip(texts, lowered, encodings, strict=True)
        ]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Untruncated token counts (special tokens included), e.g. for usage accounting."""
        return [len(e.ids) for e in self._full.encode_batch(list(self._lower(texts)))]

    def check_ids(
        self, ids: Sequence[Sequence[int]], *, truncate: bool = True, prefix: Sequence[int] = ()
    ) -> list[list[int]]:
        """Validate client-supplied token ids and frame them like :meth:`encode` does.

        Clients send content tokens (OpenAI's token-array input), so the model's
        special tokens are added here. Each list must be non-empty and hold ints
        in ``[0, vocab_size)``. Too long: truncated on the manifest's side, or
        :class:`InputTooLong` with ``truncate=False``. ``prefix`` (a prompt's content
        tokens) goes before each list's own, inside the special tokens.
        """
        return self.check_ids_counted(ids, truncate=truncate, prefix=prefix)[0]

    def check_ids_counted(
        self,
        ids: Sequence[Sequence[int]],
        *,
        truncate: bool = True,
        direction: Direction | None = None,
        prefix: Sequence[int] = (),
    ) -> tuple[list[list[int]], int]:
        """:meth:`check_ids` cutting from the ``direction`` side (default: the manifest's),
        plus how many lists were cut."""
        side = direction or self.spec.truncation_side
        cut = 0
        if isinstance(ids, str | bytes) or not isinstance(ids, list | tuple) or not ids:
            raise InvalidInput(
                "token input must be a non-empty list of token-id lists", param="input"
            )
        room = self.max_length - len(self._prefix) - len(self._suffix)
        out: list[list[int]] = []
        for i, row in enumerate(ids):
            if not isinstance(row, list | tuple) or not row:
                raise InvalidInput(
                    f"input[{i}] must be a non-empty list of token ids", param="input"
                )
            for j, tid in enumerate(row):
                if isinstance(tid, bool) or not isinstance(tid, int):
                    raise InvalidInput(
                        f"input[{i}][{j}] is a {type(tid).__name__}, not a token id", param="input"
                    )
                if not 0 <= tid < self.vocab_size:
                    raise InvalidInput(
                        f"input[{i}][{j}] = {tid} is outside the vocabulary [0, {self.vocab_size})",
                        param="input",
                    )
            content = [*prefix, *row]
            if len(content) > room:
                if not truncate:
                    raise InputTooLong(
                        f"input[{i}] has {len(content) + len(self._prefix) + len(self._suffix)} "
                        f"tokens, more than the model's limit of {self.max_length} "
                        "(truncation is off)",
                        param="input",
                    )
                if side == "left":  # the prompt's tokens stay; the row loses its start
                    kept = min(len(prefix), room)
                    content = [*content[:kept], *content[len(content) - (room - kept) :]]
                else:
                    content = content[:room]
                cut += 1
            out.append([*self._prefix, *content, *self._suffix])
        return out, cut


class PairTokenizer(TextTokenizer):
    """(query, document) pairs → one row of ids each, as a CrossEncoder tokenises them:
    ``[CLS] query [SEP] document [SEP]`` (``<s> q </s></s> d </s>`` for XLM-R) with the
    token type ids telling the two apart.

    Over the limit only the document is cut (the Rust tokenizer's ``only_second``, what
    ``CrossEncoder.predict`` does with ``processing_kwargs={"text": {"truncation":
    "only_second"}}``): a query is kept whole, and one that leaves its document no room is
    :class:`InputTooLong`, never silently cut. Thread-safe as :class:`TextTokenizer`.
    """

    def __init__(self, tokenizer_json: Path, spec: TokenizerSpec) -> None:
        super().__init__(tokenizer_json, spec)
        try:
            right, left = (Tokenizer.from_file(str(tokenizer_json)) for _ in range(2))
        except Exception as exc:  # the Rust loader raises bare Exceptions
            raise ArtifactError(f"cannot load tokenizer {tokenizer_json}: {exc}") from exc
        for tok, side in ((right, "right"), (left, "left")):
            tok.no_padding()
            tok.enable_truncation(spec.max_length, strategy="only_second", direction=side)
        self._pairs_by_side: dict[str, Tokenizer] = {"right": right, "left": left}

    @classmethod
    def from_artifact(cls, artifact: Artifact) -> PairTokenizer:
        return cls(artifact.tokenizer_path, artifact.manifest.tokenizer)

    def encode_pairs(
        self,
        pairs: Sequence[tuple[str, str]],
        *,
        truncate: bool = True,
        direction: Direction | None = None,
    ) -> tuple[list[list[int]], list[list[int]], int]:
        """Ids and token type ids of each pair (special tokens included, unpadded), and how
        many documents truncation cut (from the ``direction`` side; default: the
        manifest's). ``truncate=False``: a pair over the limit is :class:`InputTooLong`."""
        queries = list(self._lower([q for q, _ in pairs]))
        documents = list(self._lower([d for _, d in pairs]))
        batch = list(zip(queries, documents, strict=True))
        side = direction or self.spec.truncation_side
        tok = self._pairs_by_side[side] if truncate else self._full
        try:
            encodings = tok.encode_batch(batch, add_special_tokens=True)
        except Exception as exc:  # only_second found a query that leaves no room: which one
            raise self._query_too_long(batch) from exc
        if not truncate:
            for i, e in enumerate(encodings):
                if len(e.ids) > self.max_length:
                    raise InputTooLong(
                        f"pair {i} has {len(e.ids)} tokens, more than the model's limit of "
                        f"{self.max_length} (truncation is off)",
                        param="documents",
                    )
        ids = [list(e.ids) for e in encodings]
        types = [list(e.type_ids) for e in encodings]
        return ids, types, sum(1 for e in encodings if e.overflowing)

    def _query_too_long(self, batch: Sequence[tuple[str, str]]) -> InputTooLong:
        for i, (query, _) in enumerate(batch):
            # The pair's tokens without its document: the query and every special token.
            frame = len(self._full.encode(query, "", add_special_tokens=True).ids)
            if frame >= self.max_length:
                return InputTooLong(
                    f"pair {i}: the query takes {frame} of the model's {self.max_length} tokens "
                    "with its special tokens, leaving the document no room (a query is never cut)",
                    param="query",
                )
        return InputTooLong(  # pragma: no cover - the Rust error had another cause
            f"a pair cannot be truncated to the model's limit of {self.max_length} tokens",
            param="query",
        )


def segment_split(types: Sequence[int]) -> int:
    """Where a pair's second segment starts in its token type ids: ``k`` of ``[0] * k +
    [1] * (n - k)`` (``n`` when all are 0, as XLM-R tokenises pairs). The serving path
    hands a pair to the engine as ids plus this one number (:func:`segment_types`
    restores the row), so a pair is a row like a text; any other form is refused here
    rather than run with the wrong type ids."""
    k = next((i for i, t in enumerate(types) if t != 0), len(types))
    if any(t != 1 for t in types[k:]):
        raise ArtifactError(
            f"token type ids {list(types)[:8]}… are not one segment of 0 then one of 1; "
            "this tokenizer's pairs cannot be served"
        )
    return k


def segment_types(length: int, split: int) -> list[int]:
    """The token type ids :func:`segment_split` summarised: ``split`` zeros, then ones."""
    return [0] * split + [1] * (length - split)


def pad_type_ids(rows: Sequence[Sequence[int]], width: int) -> np.ndarray:
    """Token type ids right-padded with 0 to ``width`` (what :func:`pad_batch` pads to)."""
    out = np.zeros((len(rows), width), dtype=np.int64)
    for k, row in enumerate(rows):
        out[k, : len(row)] = row
    return out


def _original_spans(
    text: str, lowered: str, offsets: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Offsets into ``lowered`` mapped back to ``text``: ``str.lower`` may lengthen a
    character ("İ" becomes two), which shifts every offset after it."""
    if len(lowered) == len(text):
        return [(int(s), int(e)) for s, e in offsets]
    origin = [i for i, ch in enumerate(text) for _ in ch.lower()]  # lowered index → text index
    origin.append(len(text))
    return [(origin[s], origin[e - 1] + 1 if e > s else origin[s]) for s, e in offsets]


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the longest row (ORT's attention fusion assumes right padding)."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for k, row in enumerate(rows):
        ids[k, : len(row)] = row
        mask[k, : len(row)] = 1
    return ids, mask
