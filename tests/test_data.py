"""Tokenisation, masking, shifting, packing and padding of the three data formats."""

from __future__ import annotations

import numpy as np
import pytest

from ortlora.runtime.data import IGNORE_INDEX, Example, collate, encode_example, pack
from ortlora.runtime.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(artifacts):
    return Tokenizer(artifacts)


def trained_text(tokenizer, example: Example) -> str:
    return tokenizer.decode(example.labels[example.labels != IGNORE_INDEX], skip_special_tokens=False)


def test_labels_are_the_next_tokens(tokenizer):
    example, truncated = encode_example({"text": "The cat sits by the lake."}, tokenizer, 64)
    ids = tokenizer.encode("The cat sits by the lake.") + [tokenizer.eos_id]
    assert not truncated
    assert example.input_ids.tolist() == ids[:-1] and example.labels.tolist() == ids[1:]


def test_prompt_is_masked(tokenizer):
    example, _ = encode_example({"prompt": "What is 2 plus 3? Answer:", "completion": " 5."}, tokenizer, 64)
    assert trained_text(tokenizer, example) == " 5.<|im_end|>"


def test_only_assistant_turns_are_trained(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the opposite of hot?"},
                {"role": "assistant", "content": "Cold."}, {"role": "user", "content": "And of up?"},
                {"role": "assistant", "content": "Down."}]
    example, _ = encode_example({"messages": messages}, tokenizer, 256)
    assert trained_text(tokenizer, example) == "Cold.<|im_end|>\nDown.<|im_end|>\n"
    full = tokenizer.decode(np.append(example.input_ids, example.labels[-1]), skip_special_tokens=False)
    assert full == tokenizer.apply_chat_template(messages)


def test_truncation(tokenizer):
    example, truncated = encode_example({"text": "The red fox runs by the river at night. " * 10}, tokenizer, 16)
    assert truncated and len(example.input_ids) == 16 and len(example.labels) == 16


def test_pack_keeps_every_token_and_label(tokenizer):
    rows = [{"text": f"The {c} owl sings."} for c in ("red", "blue", "green", "gold", "white")]
    examples = [encode_example(r, tokenizer, 64)[0] for r in rows]
    packed = pack(examples, 20)
    assert all(len(p.input_ids) <= 20 for p in packed) and len(packed) < len(examples)
    assert np.concatenate([p.labels for p in packed]).tolist() == np.concatenate([e.labels for e in examples]).tolist()


def test_collate_pads_right_without_training_on_padding(tokenizer):
    a, _ = encode_example({"text": "The cat."}, tokenizer, 64)
    b, _ = encode_example({"text": "The grey wolf waits by the hill."}, tokenizer, 64)
    batch = collate([a, b], tokenizer.pad_id)
    n = len(a.input_ids)
    assert batch["input_ids"].shape == (2, len(b.input_ids))
    assert (batch["attention_mask"][0, n:] == 0).all() and (batch["labels"][0, n:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][0, n:] == tokenizer.pad_id).all() and batch["attention_mask"][1].all()
