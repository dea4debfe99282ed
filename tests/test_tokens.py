"""TextTokenizer: configured from the manifest, batch-encoded, strict on bad input."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from embedkit.core.errors import ArtifactError, InputTooLong, InvalidInput
from embedkit.model.artifact import TokenizerSpec
from embedkit.runtime.tokens import (
    TextTokenizer,
    segment_split,
    segment_types,
    validate_texts,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tok(fp32_artifact) -> TextTokenizer:
    return TextTokenizer.from_artifact(fp32_artifact)


@pytest.fixture(scope="module")
def cased_tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny cased word-level tokenizer with [CLS]/[SEP], saved with padding/truncation 3."""
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "Hello": 4, "hello": 5, "a": 6, "b": 7}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tk.enable_truncation(3)
    tk.enable_padding(length=3)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tk.save(str(path))
    return path


def _spec(**kw: object) -> TokenizerSpec:
    base: dict[str, object] = {"max_length": 5, "pad_token": "[PAD]", "pad_id": 0}
    return TokenizerSpec.model_validate({**base, **kw})


def test_manifest_overrides_tokenizer_json(tok: TextTokenizer) -> None:
    # tokenizer.json of all-MiniLM-L6-v2 says truncate/pad to 128; the manifest says 256.
    long_text = "word " * 400
    ids = tok.encode([long_text, "hi"])
    assert len(ids[0]) == 256 == tok.max_length
    assert ids[1] == [101, 7632, 102]  # unpadded, special tokens included
    assert tok.vocab_size == 30522


def test_matches_the_reference_tokenizer(tok: TextTokenizer, reference, data_dir: Path) -> None:
    from embedkit.model import evaldata

    texts = evaldata.sts_sentences("test")[:300] + evaldata.long_texts(260, 3)
    expected = reference.tokenizer(texts, truncation=True, max_length=256)["input_ids"]
    assert tok.encode(texts) == expected


def test_truncation_off_names_index_and_count(tok: TextTokenizer) -> None:
    with pytest.raises(InputTooLong) as err:
        tok.encode(["short", "word " * 300], truncate=False)
    assert "input[1]" in err.value.message and "302 tokens" in err.value.message
    assert err.value.status == 413
    assert tok.encode(["short"], truncate=False) == tok.encode(["short"])
    assert tok.count_tokens(["word " * 300]) == [302]


def test_lowercasing_and_truncation_side_follow_the_spec(cased_tokenizer_json: Path) -> None:
    cased = TextTokenizer(cased_tokenizer_json, _spec())
    lower = TextTokenizer(cased_tokenizer_json, _spec(do_lower_case=True))
    assert cased.encode(["Hello"]) == [[2, 4, 3]]
    assert lower.encode(["Hello"]) == [[2, 5, 3]]
    # max_length 5 from the spec (tokenizer.json says 3); right vs left truncation.
    assert cased.encode(["a a b b b b"]) == [[2, 6, 6, 7, 3]]
    left = TextTokenizer(cased_tokenizer_json, _spec(truncation_side="left"))
    assert left.encode(["a a a b b"]) == [[2, 6, 7, 7, 3]]


def test_check_ids_frames_and_truncates(cased_tokenizer_json: Path) -> None:
    tk = TextTokenizer(cased_tokenizer_json, _spec())
    assert tk.check_ids([[4], [6, 7]]) == [[2, 4, 3], [2, 6, 7, 3]]
    assert tk.check_ids([[6, 6, 7, 7]]) == [[2, 6, 6, 7, 3]]
    with pytest.raises(InputTooLong, match=r"input\[1\] has 6 tokens"):
        tk.check_ids([[6], [6, 6, 7, 7]], truncate=False)


def test_requests_pick_the_side_and_learn_what_was_cut(cased_tokenizer_json: Path) -> None:
    for spec_side in ("right", "left"):
        tk = TextTokenizer(cased_tokenizer_json, _spec(truncation_side=spec_side))
        texts = ["a a a b b", "a b", "b b b b a"]
        assert tk.encode_counted(texts, direction="right") == (
            [[2, 6, 6, 6, 3], [2, 6, 7, 3], [2, 7, 7, 7, 3]],
            2,
        )
        assert tk.encode_counted(texts, direction="left") == (
            [[2, 6, 7, 7, 3], [2, 6, 7, 3], [2, 7, 7, 6, 3]],
            2,
        )
        assert tk.encode_counted(texts)[0] == tk.encode_counted(texts, direction=spec_side)[0]
        assert tk.encode_counted(["a b"], truncate=False) == ([[2, 6, 7, 3]], 0)
        assert tk.check_ids_counted([[6, 6, 7, 7], [4]], direction="left") == (
            [[2, 6, 7, 7, 3], [2, 4, 3]],
            1,
        )
        assert tk.check_ids_counted([[6, 6, 7, 7]], direction="right")[0] == [[2, 6, 6, 7, 3]]


def test_a_cut_from_the_left_keeps_the_prompt(cased_tokenizer_json: Path) -> None:
    """A prompt ("Hello", id 4) before each text: cutting from the left takes the text's
    start, never the prompt (which an include_prompt=false pooling skips by length)."""
    tk = TextTokenizer(cased_tokenizer_json, _spec())
    # Token-id input: the prompt's ids come as ``prefix``.
    assert tk.check_ids_counted([[6, 6, 7, 7], [6]], prefix=[4], direction="left") == (
        [[2, 4, 7, 7, 3], [2, 4, 6, 3]],
        1,
    )
    assert tk.check_ids_counted([[6, 6, 7, 7]], prefix=[4], direction="right")[0] == [
        [2, 4, 6, 6, 3]
    ]
    # A prompt with no room left for the text: only its start fits, as from the right.
    assert tk.check_ids_counted([[6]], prefix=[4, 4, 4, 4], direction="left")[0] == [
        [2, 4, 4, 4, 3]
    ]
    # Text input: the prompt is in the text; ``keep`` says how many tokens it takes.
    texts = ["Hello a a b b", "Hello a"]
    assert tk.encode_counted(texts, direction="left", keep=1) == (
        [[2, 4, 7, 7, 3], [2, 4, 6, 3]],
        1,
    )
    assert tk.encode_counted(texts, direction="right", keep=1) == tk.encode_counted(texts)
    assert tk.encode_counted(texts[:1], direction="left", keep=9)[0] == [[2, 4, 6, 6, 3]]
    with pytest.raises(InputTooLong):
        tk.encode_counted(texts, direction="left", keep=1, truncate=False)


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        ([], "non-empty list"),
        ("1 2 3", "non-empty list"),
        ([[]], r"input\[0\] must be a non-empty"),
        ([[1], 5], r"input\[1\] must be a non-empty"),
        ([[1, 2.5]], r"input\[0\]\[1\] is a float"),
        ([[True]], r"input\[0\]\[0\] is a bool"),
        ([[1, 99]], r"input\[0\]\[1\] = 99 is outside"),
        ([[-1]], "outside the vocabulary"),
    ],
)
def test_check_ids_rejects(cased_tokenizer_json: Path, ids: object, match: str) -> None:
    tk = TextTokenizer(cased_tokenizer_json, _spec())
    with pytest.raises(InvalidInput, match=match):
        tk.check_ids(ids)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("texts", "match"),
    [
        (None, "list of strings, got NoneType"),
        ("just a string", "list of strings, got str"),
        ({"a": 1}, "list of strings, got dict"),
        ([], "empty list"),
        (["ok", None], r"input\[1\] is null"),
        (["ok", "fine", 3], r"input\[2\] is a int"),
        ([b"bytes"], r"input\[0\] is a bytes"),
    ],
)
def test_validate_texts_rejects(texts: object, match: str) -> None:
    with pytest.raises(InvalidInput, match=match) as err:
        validate_texts(texts)
    assert err.value.status == 400 and err.value.param == "input"


def test_validate_texts_accepts() -> None:
    assert validate_texts(("a", "")) == ["a", ""]


def test_encode_content_spans_point_into_the_original_text(cased_tokenizer_json: Path) -> None:
    lower = TextTokenizer(cased_tokenizer_json, _spec(do_lower_case=True))
    assert lower.frame == ([2], [3])
    # "İ" lowercases to two characters: spans must still index the text as sent.
    text = "İ Hello a"
    [(ids, spans)] = lower.encode_content([text])
    assert ids[-2:] == [5, 6] and [lower.frame[0] + ids + lower.frame[1]] == lower.encode([text])
    assert [text[s:e] for s, e in spans[-2:]] == ["Hello", "a"]
    assert lower.encode_content([""]) == [([], [])]


@pytest.mark.parametrize(
    "types",
    [[0, 0, 0, 1, 1], [0, 0, 0, 0], [0, 1], [0] * 9],  # BERT pairs; XLM-R's are all 0
)
def test_a_pair_travels_as_ids_and_one_split(types: list[int]) -> None:
    """The serving path sends a pair's token type ids as where its document starts."""
    assert segment_types(len(types), segment_split(types)) == types


def test_type_ids_of_another_form_are_refused() -> None:
    with pytest.raises(ArtifactError, match="one segment of 0 then one of 1"):
        segment_split([0, 1, 0, 1])
