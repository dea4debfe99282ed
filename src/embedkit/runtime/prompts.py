"""Prompts: the text a request's ``prompt_name`` puts before each input.

The prompt is the one the request names, else the model's ``default_prompt_name``, else
none: never inferred from the route or the lane. As in sentence-transformers, it is
prepended to the text before tokenising, so its tokens count against the token limit
and in usage. For a model whose pooling leaves the prompt out (include_prompt: false,
the manifest's ``pooling_mask_input``), each prompt also says how many leading positions
the pooling skips: the prompt's own tokens with the leading special tokens and without
a trailing one (sentence-transformers' prompt length). Those positions stay the prompt's
under any truncation: a cut from the left (``truncation_direction: left``) keeps the whole
prompt and takes the start of the text behind it (``TextTokenizer.encode_counted(keep=)``;
why, in ``serve.pipeline.jobs.prompted_ids``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from embedkit.core.errors import UnknownPrompt
from embedkit.model.artifact import Manifest
from embedkit.runtime.tokens import TextTokenizer


@dataclass(frozen=True)
class Prompt:
    name: str
    text: str
    pool_from: int  # leading positions the pooling skips; 0 when the model pools the prompt
    ids: tuple[int, ...]  # the prompt's content tokens (put before client-supplied token ids)

    def apply(self, texts: Sequence[str]) -> list[str]:
        return [self.text + t for t in texts]


class Prompts:
    """A model's prompts, resolved once per name; read-only, so thread-safe."""

    def __init__(self, manifest: Manifest, tokenizer: TextTokenizer) -> None:
        excluded = manifest.pooling_mask_input is not None
        self.default = manifest.default_prompt_name
        self.texts = dict(manifest.prompts)
        self._by_name = {
            name: Prompt(
                name,
                text,
                tokenizer.prompt_length(text) if excluded else 0,
                tuple(tokenizer.content_ids(text)),
            )
            for name, text in manifest.prompts.items()
        }

    def resolve(self, name: str | None) -> Prompt | None:
        """The request's prompt, else the default, else None; an unknown name is refused."""
        if name is None:
            name = self.default
            if name is None:
                return None
        prompt = self._by_name.get(name)
        if prompt is None:
            known = (
                ", ".join(repr(n) for n in self._by_name) or "none (this model defines no prompts)"
            )
            raise UnknownPrompt(
                f"prompt_name {name!r} is not a prompt of this model; known prompts: {known}",
                param="prompt_name",
            )
        return prompt

    def describe(self) -> dict[str, object]:
        """For /info and /v1/models."""
        return {"prompts": self.texts, "default_prompt_name": self.default}


def pool_starts(prompt: Prompt | None, n: int) -> list[int] | None:
    """Per-row leading positions the pooling skips, or None when it skips none."""
    if prompt is None or not prompt.pool_from:
        return None
    return [prompt.pool_from] * n
