"""Generation with the key/value cache against transformers: logits, greedy tokens, and the cache
against recomputing the whole sequence."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ortlora.manifest import Manifest
from ortlora.runtime import generate_cli
from ortlora.runtime.checkpoint import load_adapter
from ortlora.runtime.generate import Generator, Sampling, next_token
from tests.reference import peft_model, random_weights, rel_err, transformers_greedy

TOL = 1e-4


def decoder(artifacts):
    manifest = Manifest.load(artifacts)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return manifest, ort.InferenceSession(str(artifacts / manifest.files["decoder_model"]), options,
                                          providers=["CPUExecutionProvider"])


def test_decoder_with_cache_matches_transformers(artifacts):
    manifest, session = decoder(artifacts)
    weights = random_weights(manifest, seed=3)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 512, size=(2, 9), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row
    with torch.no_grad():
        reference = peft_model(artifacts, weights)(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                                   position_ids=torch.from_numpy(np.clip(mask.cumsum(-1) - 1, 0, None))).logits.numpy()
    past = {i.name: np.zeros((2, i.shape[1], 0, i.shape[3]), np.float32) for i in session.get_inputs() if i.name.startswith("past.")}
    names = [o.name for o in session.get_outputs()]
    # The prompt's first 6 tokens in one pass, then one token at a time through the cache.
    out = session.run(None, {"input_ids": ids[:, :6], "attention_mask": mask[:, :6], **weights, **past})
    logits = [out[0]]
    for t in range(6, 9):
        past = {n.replace("present.", "past."): v for n, v in zip(names[1:], out[1:])}
        out = session.run(None, {"input_ids": ids[:, t:t + 1], "attention_mask": mask[:, :t + 1], **weights, **past})
        logits.append(out[0])
    logits = np.concatenate(logits, axis=1)
    valid = mask.astype(bool)
    assert rel_err(logits[valid], reference[valid]) < TOL
    assert out[1].shape[2] == 9  # the cache holds every position


def test_greedy_generation_equals_transformers_token_for_token(artifacts, trained_adapter):

    generator = Generator(artifacts, trained_adapter)
    prompt = generator.prompt(messages=[{"role": "user", "content": "What is 2 plus 3?"}])
    ours = generator.generate(prompt, Sampling(max_new_tokens=24))
    expected = transformers_greedy(artifacts / "base_model", trained_adapter, prompt, 24)
    assert len(expected) >= 3
    assert ours.tokens == expected
    assert ours.text == generator.tokenizer.decode(expected)


@pytest.mark.parametrize("sampling", [Sampling(max_new_tokens=16),
                                      Sampling(max_new_tokens=16, temperature=0.8, top_k=40, top_p=0.9,
                                               repetition_penalty=1.3, seed=7)])
def test_cache_gives_what_recomputing_gives(artifacts, trained_adapter, sampling):
    generator = Generator(artifacts, trained_adapter)
    prompt = generator.prompt("The capital of")
    with_cache = generator.generate(prompt, sampling)
    without = generator.generate(prompt, sampling, use_cache=False)
    assert with_cache.tokens == without.tokens and with_cache.tokens


def test_sampling_rules():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    assert next_token(logits, [], Sampling(), rng) == 0
    assert next_token(logits, [], Sampling(temperature=1.0, top_k=1), rng) == 0
    # top-p 0.7 keeps {0, 1}: 0.5 alone is short of 0.7.
    picks = {next_token(logits, [], Sampling(temperature=1.0, top_p=0.7), rng) for _ in range(200)}
    assert picks == {0, 1}
    # Repetition penalty: a positive logit is divided, a negative one multiplied.
    assert next_token(np.array([2.0, 1.5]), [0], Sampling(repetition_penalty=2.0), rng) == 1
    assert next_token(np.array([-1.0, -1.5]), [0], Sampling(repetition_penalty=2.0), rng) == 1
    seeded = [next_token(logits, [], Sampling(temperature=1.0, seed=3), np.random.default_rng(3)) for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_stop_strings_and_the_cli(artifacts, trained_adapter, capsys):
    generator = Generator(artifacts, trained_adapter)
    prompt = generator.prompt("The capital of")
    full = generator.generate(prompt, Sampling(max_new_tokens=12))
    stop = full.text[len(full.text) // 2:][:2]
    if stop.strip():
        cut = generator.generate(prompt, Sampling(max_new_tokens=12, stop=[stop]))
        assert cut.stop_reason == "stop string" and stop not in cut.text and full.text.startswith(cut.text)

    assert generate_cli.main(["--artifacts", str(artifacts), "--adapter", str(trained_adapter), "--prompt", "The capital of",
                              "--max-new-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == full.text.strip() and "generated at" in err and "tok/s" in err
    assert generate_cli.main(["--artifacts", str(artifacts), "--messages", "{not json"]) == 2
    assert "--messages is not valid JSON" in capsys.readouterr().err
    assert generate_cli.main(["--artifacts", str(artifacts), "--prompt", "x", "--top-p", "0"]) == 2
    assert "--top-p" in capsys.readouterr().err


def test_adapter_changes_generation_and_none_is_the_base_model(artifacts, trained_adapter):
    manifest = Manifest.load(artifacts)
    assert any(np.abs(w).max() > 0 for k, w in load_adapter(trained_adapter, manifest).items() if "lora_B" in k)
    with_adapter = Generator(artifacts, trained_adapter)
    base = Generator(artifacts)
    prompt = base.prompt("The capital of")
    logits_base, _ = base.logits(prompt)
    logits_adapted, _ = with_adapter.logits(prompt)
    assert rel_err(logits_adapted, logits_base) > 1e-3


PROMPTS = ["The capital of", "Once upon a time there was a small", "Hi", "What is 2 plus 3? The answer is"]


@pytest.mark.parametrize("sampling", [Sampling(max_new_tokens=14),
                                      Sampling(max_new_tokens=14, temperature=0.9, top_k=40, seed=5)])
def test_batched_rows_equal_their_unbatched_runs(artifacts, trained_adapter, sampling):
    """Prompts of different lengths, left-padded into one batch: each row's tokens, text and stop are its own run's,
    with and without the cache; a stop string ends its row alone."""
    generator = Generator(artifacts, trained_adapter)
    prompts = [generator.prompt(p) for p in PROMPTS]
    alone = [generator.generate(p, sampling) for p in prompts]
    assert len({len(p) for p in prompts}) == len(prompts) and len({tuple(g.tokens) for g in alone}) > 1
    for use_cache in (True, False):
        batched = generator.generate_batch(prompts, sampling, use_cache=use_cache)
        assert [(g.tokens, g.text, g.stop_reason) for g in batched] == [(g.tokens, g.text, g.stop_reason) for g in alone]

    stop = alone[1].text[3:5]
    stopped = generator.generate_batch(prompts, dataclasses.replace(sampling, stop=[stop]))
    assert stopped[1].stop_reason == "stop string" and alone[1].text.startswith(stopped[1].text)
    for row, g in enumerate(stopped):
        if stop not in alone[row].text:
            assert (g.tokens, g.stop_reason) == (alone[row].tokens, alone[row].stop_reason)


def test_prompts_file_writes_a_line_per_prompt(artifacts, trained_adapter, tmp_path, capsys):
    import json

    rows = [{"prompt": "The capital of"}, {"messages": [{"role": "user", "content": "What is 2 plus 3?"}]},
            {"prompt": "Hi"}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert generate_cli.main(["--artifacts", str(artifacts), "--adapter", str(trained_adapter), "--prompts-file",
                              str(path), "--max-new-tokens", "10", "--batch-size", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    generator = Generator(artifacts, trained_adapter)
    expected = [generator.generate(generator.prompt(r.get("prompt"), r.get("messages")), Sampling(max_new_tokens=10))
                for r in rows]
    assert [line["index"] for line in lines] == [0, 1, 2]
    assert [(line["text"], line["tokens"], line["stop_reason"]) for line in lines] == \
        [(g.text, g.tokens, g.stop_reason) for g in expected]

    path.write_text('{"prompt": "ok"}\n{"promt": "typo"}\n')
    assert generate_cli.main(["--artifacts", str(artifacts), "--prompts-file", str(path)]) == 2
    assert f"{path}:2:" in capsys.readouterr().err
