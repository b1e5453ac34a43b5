"""Chat formatting and loss masks against the tokenizer's own `apply_chat_template`."""
from __future__ import annotations

import pytest

from data.chat import (
    IGNORE_INDEX,
    ConversationTooLongError,
    build_prompt,
    build_sample,
    collapse_image_spans,
    image_span,
)
from data.tokenizer import build_tokenizer

IMAGE_AS_TEXT = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def tok_vocab(tmp_path_factory):
    return build_tokenizer("tiny", 4096, cache_dir=tmp_path_factory.mktemp("tokenizer-cache"))


def to_messages(conversations):
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    return [{"role": roles[t["from"]], "content": t["value"].replace("<image>", IMAGE_AS_TEXT)} for t in conversations]


def reference_ids(tokenizer, messages, **kwargs):
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def supervised_runs(sample):
    """Contiguous runs of supervised label values."""
    runs, current = [], []
    for label in sample["labels"].tolist():
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs + ([current] if current else [])


MULTI_TURN = [
    {"from": "human", "value": "What is shown?"},
    {"from": "gpt", "value": "A red square."},
    {"from": "human", "value": "  And its colour, in one word?\n"},
    {"from": "gpt", "value": "Red"},
    {"from": "human", "value": "How many sides?"},
    {"from": "gpt", "value": "\n4 sides (四)."},
]


@pytest.mark.parametrize("system", [None, "You answer in one word."])
def test_text_only_matches_apply_chat_template(tok_vocab, system):
    tokenizer, vocab = tok_vocab
    sample = build_sample(tokenizer, vocab, MULTI_TURN, [], system=system)
    messages = to_messages(MULTI_TURN)
    if system is not None:
        messages = [{"role": "system", "content": system}] + messages
    assert sample["input_ids"].tolist() == reference_ids(tokenizer, messages)
    assert sample["n_image_tokens"] == 0 and sample["n_images"] == 0
    assert sample["input_ids"].dtype == sample["labels"].dtype and sample["labels"].shape == sample["input_ids"].shape


def test_conversation_system_turn_wins_over_argument(tok_vocab):
    tokenizer, vocab = tok_vocab
    conv = [{"from": "system", "value": "Own prompt."}] + MULTI_TURN[:2]
    sample = build_sample(tokenizer, vocab, conv, [], system="Ignored.")
    assert sample["input_ids"].tolist() == reference_ids(tokenizer, to_messages(conv))
    assert "Own prompt." in tokenizer.decode(sample["input_ids"])


def test_labels_cover_exactly_assistant_content_and_im_end_newline(tok_vocab):
    tokenizer, vocab = tok_vocab
    sample = build_sample(tokenizer, vocab, MULTI_TURN, [])
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    assert all(l == IGNORE_INDEX or l == i for i, l in zip(ids, labels))
    runs = supervised_runs(sample)
    answers = [t["value"] for t in MULTI_TURN if t["from"] == "gpt"]
    assert [tokenizer.decode(run) for run in runs[:2]] == [a + "<|im_end|>\n" for a in answers[:2]]
    assert runs[0] == tokenizer("A red square.<|im_end|>\n")["input_ids"]
    # The last answer starts with "\n", which BPE merges with the header's "\n" into one token
    # ("\n\n"); that token holds content, so it is supervised, and the header's own tokens are not.
    assert runs[2][0] == tokenizer("\n\n")["input_ids"][0]
    assert tokenizer.decode(runs[2]) == "\n\n4 sides (四).<|im_end|>\n"
    assert sum(len(r) for r in runs) == sum(l != IGNORE_INDEX for l in labels)
    # Nothing before the first assistant answer is supervised.
    first = labels.index(runs[0][0])
    assert ids[first - 3:first] == [151644, 77091, 198]


def test_images_expand_to_grids_and_text_matches_template(tok_vocab):
    tokenizer, vocab = tok_vocab
    conv = [
        {"from": "human", "value": "<image>\nCompare with <image> please."},
        {"from": "gpt", "value": "They differ."},
        {"from": "human", "value": "And this one?<image>"},
        {"from": "gpt", "value": "Same."},
    ]
    grids = [(2, 3), (1, 1), (3, 2)]
    sample = build_sample(tokenizer, vocab, conv, grids)
    ids = sample["input_ids"].tolist()
    assert collapse_image_spans(ids, vocab) == reference_ids(tokenizer, to_messages(conv))
    assert sample["n_image_tokens"] == 6 + 1 + 6 == ids.count(vocab.image_pad_id)
    assert sample["n_images"] == 3
    assert ids.count(vocab.row_end_id) == 2 + 1 + 3
    start = ids.index(vocab.vision_start_id)
    assert ids[start:start + vocab.image_length(2, 3)] == image_span(vocab, 2, 3)
    labels = sample["labels"].tolist()
    assert all(labels[i] == IGNORE_INDEX for i, t in enumerate(ids) if t >= vocab.code_base or t == vocab.image_pad_id)


def test_image_span_layout(tok_vocab):
    _, vocab = tok_vocab
    p, r = vocab.image_pad_id, vocab.row_end_id
    assert image_span(vocab, 2, 3) == [vocab.vision_start_id, p, p, p, r, p, p, p, r, vocab.vision_end_id]
    assert len(image_span(vocab, 5, 7)) == vocab.image_length(5, 7)


def test_images_without_placeholder_go_before_the_first_question(tok_vocab):
    tokenizer, vocab = tok_vocab
    implicit = [{"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "Blue"}]
    explicit = [{"from": "human", "value": "<image>\n<image>\nWhat colour?"}, {"from": "gpt", "value": "Blue"}]
    a = build_sample(tokenizer, vocab, implicit, [(2, 2), (1, 3)])
    b = build_sample(tokenizer, vocab, explicit, [(2, 2), (1, 3)])
    assert a["input_ids"].tolist() == b["input_ids"].tolist()
    assert a["labels"].tolist() == b["labels"].tolist()


def test_build_prompt_matches_generation_template(tok_vocab):
    tokenizer, vocab = tok_vocab
    messages = [{"role": "user", "content": "<image>\nWhat is the total?"}]
    prompt = build_prompt(tokenizer, vocab, messages, [(2, 2)])
    ids = prompt["input_ids"].tolist()
    assert ids[-3:] == [151644, 77091, 198]
    assert prompt["n_image_tokens"] == 4
    expected = reference_ids(tokenizer, to_messages([{"from": "human", "value": messages[0]["content"]}]),
                             add_generation_prompt=True)
    assert collapse_image_spans(ids, vocab) == expected
    # A prompt is the training sample up to the answer.
    sample = build_sample(tokenizer, vocab, messages + [{"role": "assistant", "content": "42"}], [(2, 2)])
    assert sample["input_ids"].tolist()[: len(ids)] == ids
    with pytest.raises(ValueError, match="must end with a human/user turn"):
        build_prompt(tokenizer, vocab, messages + [{"role": "assistant", "content": "42"}], [(2, 2)])


def test_max_len_drops_whole_trailing_rounds(tok_vocab):
    tokenizer, vocab = tok_vocab
    conv = [
        {"from": "human", "value": "<image>\nFirst?"},
        {"from": "gpt", "value": "One."},
        {"from": "human", "value": "<image>\nSecond?"},
        {"from": "gpt", "value": "Two."},
    ]
    grids = [(2, 2), (4, 4)]
    full = build_sample(tokenizer, vocab, conv, grids)
    first_round = build_sample(tokenizer, vocab, conv[:2], grids[:1])
    cut = build_sample(tokenizer, vocab, conv, grids, max_len=len(full["input_ids"]) - 1)
    assert cut["input_ids"].tolist() == first_round["input_ids"].tolist()
    assert (cut["n_images"], cut["n_image_tokens"]) == (1, 4)
    same = build_sample(tokenizer, vocab, conv, grids, max_len=len(full["input_ids"]))
    assert same["input_ids"].tolist() == full["input_ids"].tolist()
    with pytest.raises(ConversationTooLongError, match="more than max_len=10"):
        build_sample(tokenizer, vocab, conv, grids, max_len=10)


def test_openai_style_turns_are_accepted(tok_vocab):
    tokenizer, vocab = tok_vocab
    llava = build_sample(tokenizer, vocab, MULTI_TURN[:2], [])
    openai = build_sample(tokenizer, vocab, to_messages(MULTI_TURN[:2]), [])
    assert llava["input_ids"].tolist() == openai["input_ids"].tolist()


@pytest.mark.parametrize(
    "conv, grids, message",
    [
        ([{"from": "human", "value": "<image> x"}, {"from": "gpt", "value": "y"}], [], "1 '<image>' placeholder\\(s\\) but 0"),
        ([{"from": "human", "value": "<image> x"}, {"from": "gpt", "value": "y"}], [(1, 1), (1, 1)], "but 2 image grid"),
        ([{"from": "bot", "value": "x"}], [], "turn 0: role 'bot' is not one of human, user, gpt"),
        ([{"from": "human", "value": "x"}, {"from": "gpt", "value": "<image>"}], [(1, 1)], "turn 1: '<image>' in an assistant"),
        ([{"from": "human", "value": "x"}, {"from": "system", "value": "s"}], [], "turn 1: a system turn may only come first"),
        ([{"from": "human", "value": "x"}], [], "no gpt/assistant turn"),
        ([{"from": "human", "value": "x <|image_pad|>"}, {"from": "gpt", "value": "y"}], [], "turn 0: text contains image token"),
        ([{"from": "human", "value": 3}, {"from": "gpt", "value": "y"}], [], "turn 0: 'value' must be a string"),
        ([{"from": "gpt", "value": "y"}], [(1, 1)], "no human turn to hold them"),
        ([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "y"}], [(0, 3)], "at least 1 x 1"),
    ],
)
def test_bad_conversations_raise_one_line_errors(tok_vocab, conv, grids, message):
    tokenizer, vocab = tok_vocab
    with pytest.raises(ValueError, match=message) as info:
        build_sample(tokenizer, vocab, conv, grids)
    assert "\n" not in str(info.value)
