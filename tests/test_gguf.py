"""GGUF for llama.cpp, checked with llama.cpp itself (llama-cpp-python 0.3.36, built from source in .venv-llama):
the base model plus ``--to gguf``'s adapter, and ``--to gguf-merged``, give the merged Hugging Face model's logits
(transformers, float32) and its greedy tokens; llama.cpp tokenizes as the model's tokenizer does. Each for Qwen2 and
for Qwen3 (llama.cpp's qwen3: the tiny tied Qwen3 with heads 32 wide, an untied one with every projection adapted, and
a one-layer Qwen3 with Qwen3's own tokenizer)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest

from ortlora.build.tiny import QWEN3_TOKENIZER_DIR, QWEN25_TOKENIZER_DIR, create_random_model
from ortlora.errors import OrtloraError
from ortlora.handoff import cli as export_cli
from ortlora.handoff import gguf_export
from ortlora.manifest import Manifest
from tests.conftest import _build
from tests.environments import needs, run_in
from tests.handoff_helpers import IDS, export, greedy, merged_logits, random_adapter

# |llama.cpp - transformers| logits allowed (largest, root mean square), by weight type; logits are up to 6, std 1.6.
# Measured on the tiny model, over the trained adapter and a random one on every projection (largest, rms):
#   f32 weights, f32 key/value cache        3.3e-5, 3.0e-6
#   f16 weights, llama.cpp's f16 cache      7.0e-2, 6.8e-3   (the CPU kernels also round activations to f16)
#   bf16                                    3.5e-1, 3.8e-2
#   q8_0                                    3.3e-1, 6.1e-2
# The tiny Qwen3s (tied and untied, heads 32 wide), base + adapter and merged: f32 5.5e-6, 1.2e-6; f16 1.0e-2,
# 2.2e-3; bf16 6.0e-2, 1.3e-2; q8_0 1.6e-1, 4.0e-2 (logits up to 6.7, std 1.7).
TOL = {"f32": (1e-4, 1e-5), "f16": (0.15, 0.015), "bf16": (0.75, 0.08), "q8_0": (0.75, 0.12)}
PROMPT, NEW_TOKENS = IDS[:5], 10
TEXTS = ["Once upon a time, there was a tiny model.", "What is 12 + 30? It's 42!\n\n  Indented\tand tabbed.",
         "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", "héllo wörld — ünïcode ✓ 漢字",
         '<tool_call>{"name": "f"}</tool_call> 2024-11-26']

LLAMA = """
    import json, numpy as np, llama_cpp
    jobs = json.loads({jobs!r})
    results = []
    for job in jobs:
        kv = {{"type_k": 0, "type_v": 0}} if job["f32_cache"] else {{}}   # GGML_TYPE_F32; llama.cpp's default is f16
        llm = llama_cpp.Llama(model_path=job["model"], lora_path=job["lora"], n_ctx=64, n_batch=64, n_threads=2,
                              logits_all=True, verbose=False, seed=0, **kv)
        llm.eval(job["ids"])
        np.save(job["out"], np.array(llm.scores[: len(job["ids"])]))
        llm.reset()
        llm.eval(job["prompt"])
        tokens = []
        for _ in range(job["new"]):  # greedy: the argmax of the last position's logits
            tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([tokens[-1]])
        tokenized = [llm.tokenize(t.encode(), add_bos=True, special=True) for t in job["texts"]]
        results.append({{"greedy": tokens, "tokenized": tokenized, "metadata": llm.metadata}})
        llm.close()  # freed in order (model, context, adapter): left to interpreter exit, it can crash there
    print(json.dumps(results))
"""


def assert_close(got: np.ndarray, expected: np.ndarray, kind: str) -> None:
    diff = np.abs(got - expected)
    largest, rms = TOL[kind]
    assert diff.max() <= largest and np.sqrt((diff**2).mean()) <= rms, (kind, diff.max(), np.sqrt((diff**2).mean()))


def llama(tmp_path: Path, runs: list[tuple[Path, Path | None, bool]], texts: list[str] = TEXTS) -> list[dict]:
    """llama.cpp's logits of IDS, greedy tokens after PROMPT and tokenization of ``texts``, per (model, lora, f32
    cache)."""
    jobs = [{"model": str(model), "lora": str(lora) if lora else None, "f32_cache": f32, "ids": IDS, "prompt": PROMPT,
             "new": NEW_TOKENS, "texts": texts, "out": str(tmp_path / f"llama-{i}.npy")}
            for i, (model, lora, f32) in enumerate(runs)]
    results = run_in("llama", LLAMA.format(jobs=json.dumps(jobs)))
    for job, result in zip(jobs, results):
        result["logits"] = np.load(job["out"])
    return results


@pytest.fixture(scope="module")
def pattern_artifacts(tmp_path_factory, tiny_model) -> Path:
    """rsLoRA with a rank and an alpha of their own for some modules: llama.cpp's single alpha cannot say it."""
    return _build(tmp_path_factory, tiny_model, "gguf-patterns", rslora=True, rank_pattern={"v_proj": 4},
                  alpha_pattern={"o_proj": 4, "down_proj": 40},
                  targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))


@needs("llama")
@pytest.mark.parametrize("variant", ["trained", "patterns"])
def test_llama_cpp_base_plus_adapter_equals_the_merged_model(variant, artifacts, trained_adapter, pattern_artifacts,
                                                             tmp_path):
    if variant == "trained":
        arts, adapter = artifacts, trained_adapter
    else:
        arts = pattern_artifacts
        adapter = random_adapter(arts, tmp_path / "peft", seed=2)
    f32 = export(arts, adapter, "gguf", tmp_path / "gguf32", "--with-base", "--gguf-type", "f32")
    f16 = export(arts, adapter, "gguf", tmp_path / "gguf16", "--with-base", "--gguf-type", "f16")
    merged = export(arts, adapter, "merged", tmp_path / "merged")
    expected, tokens = merged_logits(merged), greedy(merged, PROMPT, NEW_TOKENS)
    adapted32, adapted16, base = llama(tmp_path, [(f32 / "base.gguf", f32 / "adapter.gguf", True),
                                                  (f16 / "base.gguf", f16 / "adapter.gguf", False),
                                                  (f32 / "base.gguf", None, True)])
    assert_close(adapted32["logits"], expected, "f32")
    assert_close(adapted16["logits"], expected, "f16")
    assert adapted32["greedy"] == tokens and adapted16["greedy"] == tokens
    assert np.abs(base["logits"] - expected).max() > 0.1  # the adapter is what makes them equal
    reader = gguf.GGUFReader(f32 / "adapter.gguf")
    ranks = {t.name: int(t.shape[0]) for t in reader.tensors if t.name.endswith(".lora_b")}  # ne = [r, out]
    if variant == "patterns":  # llama.cpp reads each module's rank from its lora_b
        assert ranks["blk.0.attn_v.weight.lora_b"] == 4 and ranks["blk.0.attn_q.weight.lora_b"] == 8


def test_with_base_writes_an_f16_base_unless_f32_is_asked_for(artifacts, trained_adapter, tmp_path):
    """--with-base's help: base.gguf is f16, or f32 with --gguf-type f32 (the adapter alone defaults to f32)."""
    def matrix_types(out: Path, name: str) -> set[str]:
        return {t.tensor_type.name for t in gguf.GGUFReader(out / name).tensors if len(t.shape) == 2}

    default = export(artifacts, trained_adapter, "gguf", tmp_path / "default", "--with-base")
    f32 = export(artifacts, trained_adapter, "gguf", tmp_path / "f32", "--with-base", "--gguf-type", "f32")
    assert matrix_types(default, "base.gguf") == {"F16"} and matrix_types(default, "adapter.gguf") == {"F32"}
    assert matrix_types(f32, "base.gguf") == {"F32"} and matrix_types(f32, "adapter.gguf") == {"F32"}


@needs("llama")
def test_dora_is_refused_as_an_adapter_and_folded_into_the_merged_gguf(tiny_model, tmp_path_factory, tmp_path, capsys):
    arts = _build(tmp_path_factory, tiny_model, "gguf-dora", dora=True, targets=("q_proj", "v_proj", "down_proj"))
    adapter = random_adapter(arts, tmp_path / "peft", seed=3)
    out = tmp_path / "out"
    assert export_cli.main(["--artifacts", str(arts), "--adapter", str(adapter), "--to", "gguf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cannot hold a DoRA adapter" in err and len(err.strip().splitlines()) == 1 and not out.exists()
    merged = export(arts, adapter, "merged", tmp_path / "merged")
    model = export(arts, adapter, "gguf-merged", tmp_path / "gguf", "--gguf-type", "f32") / "model.gguf"
    (result,) = llama(tmp_path, [(model, None, True)])
    assert_close(result["logits"], merged_logits(merged), "f32")


@needs("llama")
def test_llama_cpp_runs_the_merged_gguf_as_the_merged_model(artifacts, trained_adapter, tmp_path):
    merged = export(artifacts, trained_adapter, "merged", tmp_path / "merged")
    expected, tokens = merged_logits(merged), greedy(merged, PROMPT, NEW_TOKENS)
    kinds = ["f32", "f16", "bf16", "q8_0"]
    files = [export(artifacts, trained_adapter, "gguf-merged", tmp_path / k, "--gguf-type", k) / "model.gguf"
             for k in kinds]
    results = llama(tmp_path, [(f, None, k == "f32") for f, k in zip(files, kinds)])
    for kind, result in zip(kinds, results):
        assert_close(result["logits"], expected, kind)
        if kind in ("f32", "f16"):  # 8-bit weights may turn a near tie (the tiny model is random) another way
            assert result["greedy"] == tokens, kind

    # The tokenizer: llama.cpp splits text, special tokens included, as the tokenizers library runs the model's
    # tokenizer.json (what ortlora trains with), and adds no BOS (Qwen2's tokenizer adds none); the chat template and
    # the end-of-turn token travel with the model. (Not transformers 5's AutoTokenizer: for a qwen2 model it puts
    # Qwen2's own split in place of the tiny tokenizer's GPT-2 one, so "12" becomes "1", "2" there.)
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(merged / "tokenizer.json"))
    for text, got in zip(TEXTS, results[1]["tokenized"]):
        assert got == reference.encode(text).ids, text
    metadata = results[1]["metadata"]
    assert metadata["tokenizer.chat_template"] == (artifacts / "chat_template.jinja").read_text()
    assert metadata["tokenizer.ggml.pre"] == "gpt-2" and int(metadata["tokenizer.ggml.eos_token_id"]) == 2


def test_the_adapter_gguf_is_laid_out_as_convert_lora_to_gguf_writes_it(artifacts, trained_adapter, tmp_path):
    out = export(artifacts, trained_adapter, "gguf", tmp_path / "gguf", "--gguf-type", "f16")
    reader = gguf.GGUFReader(out / "adapter.gguf")
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "qwen2" and fields["adapter.lora.alpha"] == 16.0
    tensors = {t.name: (t.tensor_type.name, [int(n) for n in t.shape]) for t in reader.tensors}
    # ne order (GGUF reverses numpy's): lora_a [in, r], lora_b [r, out]; q_proj 64 -> 64, v_proj 64 -> 32
    assert tensors == {f"blk.{i}.{name}.weight.lora_{ab}": ("F16", shape) for i in range(2)
                       for name, out_dim in (("attn_q", 64), ("attn_v", 32))
                       for ab, shape in (("a", [64, 8]), ("b", [8, out_dim]))}


def test_what_gguf_cannot_hold_is_refused_in_one_line(artifacts, trained_adapter, tmp_path, capsys):
    manifest = Manifest.load(artifacts)
    assert "DoRA" in gguf_export.refusal(replace(manifest, lora={**manifest.lora, "dora": True}))
    with pytest.raises(OrtloraError, match="gguf-merged"):
        gguf_export.write_adapter(replace(manifest, lora={**manifest.lora, "dora": True}), {}, tmp_path / "x.gguf", "f32")
    out = tmp_path / "out"
    for args, message in ((["--to", "gguf", "--gguf-type", "q8_0"], "not one of f32, f16 for --to gguf"),
                          (["--to", "gguf-merged", "--gguf-type", "q4_0"], "not one of f32, f16, bf16, q8_0"),
                          (["--to", "gguf-merged", "--with-base"], "--with-base goes with --to gguf")):
        assert export_cli.main(["--artifacts", str(artifacts), "--adapter", str(trained_adapter), "--out", str(out),
                                *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
        assert not out.exists() and not list(tmp_path.glob(".out*"))


@needs("llama")
@pytest.mark.skipif(not QWEN25_TOKENIZER_DIR.is_dir(), reason=f"needs {QWEN25_TOKENIZER_DIR}")
def test_a_model_with_qwen25s_tokenizer_runs_in_llama_cpp_as_in_transformers(tmp_path):
    """Qwen2.5's own tokenizer (151,665 tokens in 151,936 rows, Qwen2's split, added tokens special and not) on a
    one-layer random model of 0.5B's vocabulary: llama.cpp tokenizes and predicts as transformers does."""
    from transformers import AutoTokenizer

    model = create_random_model(tmp_path / "model", "qwen2.5-0.5b", layers=1, tokenizer="real", hidden_size=64,
                                intermediate_size=176, num_attention_heads=4, num_key_value_heads=2)
    path = tmp_path / "model.gguf"
    gguf_export.write_model(model, model, path, "f16", "qwen2.5-random")
    (result,) = llama(tmp_path, [(path, None, False)])
    assert_close(result["logits"], merged_logits(model), "f16")
    assert result["greedy"] == greedy(model, PROMPT, NEW_TOKENS)
    reference = AutoTokenizer.from_pretrained(model)
    for text, got in zip(TEXTS, result["tokenized"]):
        assert got == reference.encode(text), text
    metadata = result["metadata"]
    assert metadata["tokenizer.ggml.pre"] == "qwen2" and int(metadata["tokenizer.ggml.eos_token_id"]) == 151645
    assert metadata["tokenizer.chat_template"] == reference.chat_template


@pytest.fixture(scope="module")
def qwen3_untied(tmp_path_factory) -> tuple[Path, Path]:
    """(artifacts, adapter) of the tiny Qwen3 with an LM head of its own (as Qwen3-8B has) and every projection
    adapted, so that k_proj, o_proj and the MLP's adapters travel under llama.cpp's qwen3 names too."""
    model = create_random_model(tmp_path_factory.mktemp("model") / "qwen3-untied", "tiny", seed=6, model_type="qwen3",
                                head_dim=32, tie_word_embeddings=False)
    arts = _build(tmp_path_factory, model, "gguf-qwen3-untied", rank=4, alpha=8.0,
                  targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    return arts, random_adapter(arts, tmp_path_factory.mktemp("peft") / "qwen3-untied", seed=4)


@needs("llama")
@pytest.mark.parametrize("variant", ["tied", "untied"])
def test_llama_cpp_runs_qwen3_as_transformers(variant, request, tmp_path):
    """The base plus --to gguf's adapter, and --to gguf-merged, in each weight type: the merged model's logits and
    greedy tokens. The q_norm / k_norm weights are 1 + N(0, 0.1) (create_random_model perturbs every norm), so a norm
    written wrong shows in the logits: with q_norm's weights as ones the largest f32 difference is 0.68 to 0.70, with
    q_norm and k_norm swapped 0.50 to 0.63, against a tolerance of 1e-4 (llama.cpp refuses a file without them)."""
    if variant == "tied":
        _, arts, adapter = request.getfixturevalue("qwen3_handoff")
        kinds = ["f32", "f16", "bf16", "q8_0"]
    else:
        arts, adapter = request.getfixturevalue("qwen3_untied")
        kinds = ["f32", "f16"]
    f32 = export(arts, adapter, "gguf", tmp_path / "gguf32", "--with-base", "--gguf-type", "f32")
    f16 = export(arts, adapter, "gguf", tmp_path / "gguf16", "--with-base", "--gguf-type", "f16")
    files = [export(arts, adapter, "gguf-merged", tmp_path / k, "--gguf-type", k) / "model.gguf" for k in kinds]
    merged = export(arts, adapter, "merged", tmp_path / "merged")
    expected, tokens = merged_logits(merged), greedy(merged, PROMPT, NEW_TOKENS)
    adapted32, adapted16, base, *results = llama(tmp_path, [(f32 / "base.gguf", f32 / "adapter.gguf", True),
                                                            (f16 / "base.gguf", f16 / "adapter.gguf", False),
                                                            (f32 / "base.gguf", None, True),
                                                            *[(f, None, k == "f32") for f, k in zip(files, kinds)]])
    assert_close(adapted32["logits"], expected, "f32")
    assert_close(adapted16["logits"], expected, "f16")
    assert adapted32["greedy"] == tokens and adapted16["greedy"] == tokens
    assert np.abs(base["logits"] - expected).max() > 0.1  # the adapter is what makes them equal
    for kind, result in zip(kinds, results):
        assert_close(result["logits"], expected, kind)
        if kind in ("f32", "f16"):  # 8-bit weights may turn a near tie (the tiny model is random) another way
            assert result["greedy"] == tokens, kind
    assert results[0]["metadata"]["general.architecture"] == "qwen3"
    assert int(results[0]["metadata"]["qwen3.attention.key_length"]) == 32  # not 64 / 4


def test_qwen3_ggufs_are_laid_out_as_convert_hf_to_gguf_writes_them(qwen3_handoff, qwen3_untied, tmp_path):
    """llama.cpp's qwen3 names: the head norms as blk.N.attn_q_norm / attn_k_norm (float32, [head_dim]), no
    biases, output.weight only where the LM head is untied; the adapter says qwen3 as the base does."""
    _, arts, adapter = qwen3_handoff
    out = export(arts, adapter, "gguf", tmp_path / "tied", "--with-base")
    reader = gguf.GGUFReader(out / "adapter.gguf")
    assert reader.fields["general.architecture"].contents() == "qwen3"
    assert {t.name for t in reader.tensors} == {f"blk.{i}.{name}.weight.lora_{ab}" for i in range(2)
                                                for name in ("attn_q", "attn_v") for ab in "ab"}
    for name, untied in ((out / "base.gguf", False),
                         (export(*qwen3_untied, "gguf-merged", tmp_path / "untied") / "model.gguf", True)):
        reader = gguf.GGUFReader(name)
        fields = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
        assert fields["general.architecture"] == "qwen3"
        assert fields["qwen3.attention.key_length"] == fields["qwen3.attention.value_length"] == 32
        assert (fields["qwen3.attention.head_count"], fields["qwen3.attention.head_count_kv"]) == (4, 2)
        tensors = {t.name: (t.tensor_type.name, [int(n) for n in t.shape]) for t in reader.tensors}
        for i in range(2):
            assert tensors[f"blk.{i}.attn_q_norm.weight"] == tensors[f"blk.{i}.attn_k_norm.weight"] == ("F32", [32])
            # ne order: [in, out]; 4 query heads and 2 key / value heads of 32 from a hidden size of 64
            assert [tensors[f"blk.{i}.attn_{p}.weight"][1] for p in "qkv"] == [[64, 128], [64, 64], [64, 64]]
            assert tensors[f"blk.{i}.attn_output.weight"][1] == [128, 64]
        assert not [t for t in tensors if t.endswith(".bias")] and ("output.weight" in tensors) == untied
        assert len(tensors) == 2 * 11 + 2 + untied  # per layer 4 norms, 4 attention and 3 MLP matrices


def test_a_qwen3_with_attention_biases_is_refused_as_a_gguf_model(tmp_path):
    """Qwen3's attention_bias gives o_proj a bias too, which llama.cpp's qwen3 does not read (it refuses the file:
    "wrong number of tensors")."""
    model = create_random_model(tmp_path / "model", "tiny", seed=5, model_type="qwen3", head_dim=32,
                                attention_bias=True)
    with pytest.raises(OrtloraError, match="o_proj bias, which llama.cpp's qwen3 does not read"):
        gguf_export.write_model(model, model, tmp_path / "model.gguf", "f16", "biased")
    assert not (tmp_path / "model.gguf").exists()


@needs("llama")
@pytest.mark.skipif(not QWEN3_TOKENIZER_DIR.is_dir(), reason=f"needs {QWEN3_TOKENIZER_DIR}")
def test_a_model_with_qwen3s_tokenizer_runs_in_llama_cpp_as_in_transformers(tmp_path):
    """Qwen3's own tokenizer (151,669 tokens in 151,936 rows; <think> and </think> added, not special) on a one-layer
    random Qwen3 of 0.6B's vocabulary and heads 32 wide: llama.cpp tokenizes as ortlora does (the tokenizers library
    on tokenizer.json) and predicts as transformers does; the chat template is Qwen3's."""
    from ortlora.runtime.tokenizer import Tokenizer

    model = create_random_model(tmp_path / "model", "qwen3-0.6b", layers=1, tokenizer="real", hidden_size=64,
                                intermediate_size=176, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    path = tmp_path / "model.gguf"
    gguf_export.write_model(model, model, path, "f16", "qwen3-random")
    texts = [*TEXTS, "<|im_start|>assistant\n<think>\nLet me add 12 and 30.\n</think>\n\n42<|im_end|>\n"]
    (result,) = llama(tmp_path, [(path, None, False)], texts)
    assert_close(result["logits"], merged_logits(model), "f16")
    assert result["greedy"] == greedy(model, PROMPT, NEW_TOKENS)
    reference = Tokenizer(model)
    for text, got in zip(texts, result["tokenized"], strict=True):
        assert got == reference.encode(text), text
    assert 151667 in result["tokenized"][-1]  # <think>, one token
    metadata = result["metadata"]
    assert metadata["tokenizer.ggml.pre"] == "qwen2" and int(metadata["tokenizer.ggml.eos_token_id"]) == 151645
    assert metadata["tokenizer.chat_template"] == reference.chat_template and "<think>" in reference.chat_template
