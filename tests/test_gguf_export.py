"""`jaxft convert --to-gguf` proven in real llama.cpp (llama-cpp-python), transformers' GGUF
loader and a GGUF -> jaxft -> GGUF round trip, on tiny random models (byte-level BPE and
SentencePiece tokenizers) and on SmolLM2-135M-Instruct imported from its own GGUF."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import smollm2_gguf
from flax import nnx
from gguf import GGUFReader

import jaxft
from jaxft import convert
from jaxft.convert import from_gguf
from jaxft.__main__ import main as cli
from jaxft.config import get_preset
from jaxft.generate import generate

from jaxft.model import Llama
from jaxft.modeldir import save_model
from jaxft.tokenizer import HFTokenizer, load_tokenizer

llama_cpp = pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (pip install -e '.[test]')")

MARKERS = ["<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MIXED = ("<|im_start|>user\nHi  there,   wörld! 12345 + 67 = 12412 ünïcödé 日本語 🙂\ttab"
         "<|im_end|>\n<|im_start|>assistant\n")
TEXTS = ["the quick brown fox", "jumps over 123 lazy dogs, twice!", "<|im_start|>user\nhello<|im_end|>"]
SP_TEXTS = ["the quick brown fox", "jumps over 123 lazy dogs, twice!", "Tell me about Tetris."]


def add_chat_template(model_dir: Path) -> Path:
    """jaxft's tokenizer save keeps no chat template; a model dir can still carry one."""
    p = model_dir / "tokenizer" / "tokenizer_config.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), "chat_template": CHATML}))
    return model_dir


def bpe_tokenizer(d: Path) -> HFTokenizer:
    """A real byte-level BPE trained here, with ChatML markers and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # as SmolLM2, Llama-3
    corpus = ["the quick brown fox jumps over the lazy dog", "numbers 0 1 2 3 4 5 6 7 8 9 and words",
              "hello world, what is up?"] * 20
    core.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", *MARKERS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    d.mkdir(parents=True)
    core.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML}))
    return HFTokenizer.from_file(d / "tokenizer.json")


def tiny_model_dir(out: Path, tok, seed: int, **over) -> Path:
    """A tiny random jaxft model (norms and all weights non-trivial) saved with `tok`."""
    cfg = dataclasses.replace(get_preset("tiny"), vocab_size=len(tok), **over)
    model = Llama(cfg, nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    flat = jax.tree_util.tree_flatten_with_path(state.to_pure_dict())
    keys = iter(jax.random.split(jax.random.key(seed), len(flat[0])))
    new = [x + 0.2 * jax.random.normal(next(keys), x.shape, x.dtype) if "norm" in jax.tree_util.keystr(p)
           else x for p, x in flat[0]]
    state.replace_by_pure_dict(jax.tree.unflatten(flat[1], new))
    nnx.update(model, state)
    return save_model(out, model, tok)


def export(src: Path, out: Path, kind: str) -> Path:
    assert cli(["convert", "--to-gguf", str(src), "--out", str(out), "--type", kind]) == 0
    return out


def jaxft_logits(loaded, ids):
    return np.asarray(loaded.model(jnp.asarray([ids])))[0, :, : loaded.config.vocab_size]


def llama(path: Path):
    # f32 KV cache: the default f16 cache alone costs ~1e-3 on the logits.
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, logits_all=True,
                           type_k=0, type_v=0, n_threads=2, seed=0, verbose=False)


def llama_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe")
    tok = bpe_tokenizer(root / "tok")
    d = add_chat_template(tiny_model_dir(root / "model", tok, seed=1))
    return d, {k: export(d, root / f"tiny-{k}.gguf", k) for k in ("f32", "q8_0")}


@pytest.fixture(scope="module")
def llama3_rope(tmp_path_factory):
    root = tmp_path_factory.mktemp("rope")
    tok = bpe_tokenizer(root / "tok")
    sc = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
    d = tiny_model_dir(root / "model", tok, seed=2, rope_scaling=sc, rope_theta=50000.0)
    return d, export(d, root / "rope-f32.gguf", "f32")


@pytest.fixture(scope="module")
def sp(tmp_path_factory, sp_tokenizer):
    root = tmp_path_factory.mktemp("spm")
    tok = load_tokenizer(sp_tokenizer.save(root / "tok"))  # a copy: the fixture is shared
    tok.add_special_tokens(["<START_Q>", "<END_Q>"])
    d = tiny_model_dir(root / "model", tok, seed=3)
    return d, export(d, root / "sp-f32.gguf", "f32")


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    src = smollm2_gguf()
    root = tmp_path_factory.mktemp("smol")
    d = from_gguf(src, root / "jx")
    return d, {k: export(d, root / f"smol-{k}.gguf", k) for k in ("f32", "q8_0")}


def check_logits(d: Path, path: Path, texts, atol: float) -> float:
    """Asserts llama.cpp's logits match jaxft's on each text; returns the largest difference."""
    loaded, llm, worst = jaxft.load(d), llama(path), 0.0
    for text in texts:
        ids = [loaded.tokenizer.bos_id] * (loaded.tokenizer.bos_id is not None) + loaded.tokenizer.encode(text)
        want, got = jaxft_logits(loaded, ids), llama_logits(llm, ids)
        assert got.shape == want.shape, text
        worst = max(worst, float(np.abs(got - want).max()))
        np.testing.assert_allclose(got, want, atol=atol, rtol=0, err_msg=text)
    return worst


def test_tiny_bpe_logits_match_llama_cpp(bpe):
    d, files = bpe
    check_logits(d, files["f32"], TEXTS, atol=1e-3)
    # q8_0: measured worst 0.086 on logits of std ~1 (f32: 1.5e-6). llama.cpp quantizes the
    # activations to 8 bits too before a Q8_0 matmul, so this is both rounding errors.
    assert check_logits(d, files["q8_0"], TEXTS, atol=0.15) > 1e-3  # it really is quantized


def test_llama3_rope_scaling_matches_llama_cpp(llama3_rope):
    d, path = llama3_rope
    fields = GGUFReader(path).tensors
    assert any(t.name == "rope_freqs.weight" for t in fields)
    long_text = " ".join(["the quick brown fox jumps over the lazy dog"] * 4)  # past the 16 old positions
    check_logits(d, path, [long_text], atol=1e-3)


def test_sentencepiece_logits_and_tokens_match_llama_cpp(sp):
    d, path = sp
    check_logits(d, path, SP_TEXTS, atol=1e-3)
    tok, llm = jaxft.load(d).tokenizer, llama(path)
    text = "Tetris  is 1998's   best game, with über 3 ünïcödé ★ pieces\tand tabs<END_Q>"
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text)
    assert llm.tokenize(b"x", add_bos=True, special=True)[0] == tok.bos_id == llm.token_bos()


def test_sentencepiece_space_after_added_token_is_llama_cpps(sp):
    """llama.cpp's SentencePiece tokenizer puts its dummy-prefix space on every text piece after
    an added token (HF's legacy behaviour); jaxft, like HF with legacy=False, does not. Pinned
    here so a change on either side shows."""
    d, path = sp
    tok, llm = jaxft.load(d).tokenizer, llama(path)
    got = llm.tokenize(b"<START_Q>Tetris", add_bos=False, special=True)
    assert got == [tok.token_id("<START_Q>")] + tok.encode("Tetris")  # "▁T", "e", ...
    assert [tok.id_to_piece(i) for i in tok.encode("<START_Q>Tetris")][:2] == ["<START_Q>", "T"]


def test_tokenizer_ids_match_llama_cpp(bpe, smol):
    for d, path in ((bpe[0], bpe[1]["f32"]), (smol[0], smol[1]["q8_0"])):
        tok, llm = jaxft.load(d).tokenizer, llama(path)
        assert llm.tokenize(MIXED.encode(), add_bos=False, special=True) == tok.encode(MIXED), d
        assert llm.token_eos() == tok.eos_id


def test_greedy_continuation_matches_jaxft_generate(bpe, smol):
    for d, path, prompt in ((bpe[0], bpe[1]["f32"], "the quick"),
                            (smol[0], smol[1]["f32"], "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n")):
        loaded, llm = jaxft.load(d), llama(path)
        ids = loaded.tokenizer.encode(prompt)
        want = generate(loaded.model, [ids], 32, eos_ids=())[0]
        got = []
        for t in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            got.append(t)
            if len(got) == 32:
                break
        assert got == want, d


def test_smollm2_logits_match_llama_cpp(smol):
    d, files = smol
    texts = ["The capital of France is", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"]
    check_logits(d, files["f32"], texts, atol=1e-3)
    # q8_0 of the real model: measured worst 1.23 on logits of std ~3 and max ~17
    check_logits(d, files["q8_0"], texts, atol=2.5)


def test_metadata_llama_cpp_reads(bpe):
    d, files = bpe
    r = GGUFReader(files["f32"])
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    cfg = jaxft.load(d).config
    assert f["general.architecture"] == "llama" and f["llama.vocab_size"] == cfg.vocab_size
    assert (f["llama.block_count"], f["llama.attention.head_count"], f["llama.attention.head_count_kv"],
            f["llama.embedding_length"], f["llama.feed_forward_length"]) == (2, 4, 2, 64, 128)
    assert f["tokenizer.ggml.pre"] == "gpt-2" and f["tokenizer.chat_template"] == CHATML
    assert f["tokenizer.ggml.add_bos_token"] is False
    tokens = f["tokenizer.ggml.tokens"]
    assert tokens[f["tokenizer.ggml.eos_token_id"]] == "<|im_end|>"
    assert tokens[f["tokenizer.ggml.padding_token_id"]] == "<|endoftext|>"
    q8 = {t.name: t.tensor_type.name for t in GGUFReader(files["q8_0"]).tensors}
    assert q8["blk.0.attn_q.weight"] == "Q8_0" and q8["blk.0.attn_norm.weight"] == "F32"
    mf = files["f32"].with_suffix(".Modelfile").read_text()
    assert mf.startswith("FROM ./tiny-f32.gguf\nTEMPLATE") and 'PARAMETER stop "<|im_end|>"' in mf


def _fields(path: Path) -> tuple[dict, dict]:
    r = GGUFReader(path)
    meta = {k: v.contents() for k, v in r.fields.items() if k != "general.name"}
    return meta, {t.name: (t.tensor_type, tuple(t.shape), bytes(t.data)) for t in r.tensors}


def test_round_trip_gguf_jaxft_gguf_is_identical(bpe, tmp_path):
    _, files = bpe
    back = from_gguf(files["f32"], tmp_path / "jx")
    again = export(back, tmp_path / "again.gguf", "f32")
    (meta_a, ten_a), (meta_b, ten_b) = _fields(files["f32"]), _fields(again)
    assert meta_a == meta_b
    assert ten_a.keys() == ten_b.keys() and all(ten_a[k] == ten_b[k] for k in ten_a)


def test_transformers_gguf_loader_matches_jaxft(bpe, smol):
    import torch
    import transformers
    # SmolLM2: measured 2.8e-4 on logits up to ~17 over 30 layers, float32 rounding of two
    # implementations (jax vs torch); the tiny model is within 1e-4.
    for d, path, atol in ((bpe[0], bpe[1]["f32"], 1e-4), (smol[0], smol[1]["f32"], 1e-3)):
        loaded = jaxft.load(d)
        ref = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
        ids = loaded.tokenizer.encode("the quick brown fox, 42 times")
        with torch.no_grad():
            want = ref(torch.tensor([ids])).logits.numpy()[0]
        np.testing.assert_allclose(jaxft_logits(loaded, ids), want, atol=atol, rtol=0, err_msg=str(d))


def test_existing_output_is_kept_without_force(bpe, capsys):
    d, files = bpe
    before = files["f32"].stat().st_mtime_ns
    assert cli(["convert", "--to-gguf", str(d), "--out", str(files["f32"])]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert files["f32"].stat().st_mtime_ns == before


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    assert cli(["convert", "--to-gguf", str(tmp_path / "nope"), "--out", str(tmp_path / "x.gguf")]) == 2
    assert "no such jaxft model directory" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()


def test_prefix_space_bpe_is_refused(tmp_path):
    from jaxft.convert import ConvertError
    from jaxft.gguf_export import bpe_pre
    with pytest.raises(ConvertError, match="add_prefix_space"):
        bpe_pre({"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}, tmp_path / "t.json")


def test_tools_wrapper_exports_gguf(bpe, tmp_path):
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "tools" / "convert_hf.py"), "--to-gguf", str(bpe[0]),
                        "--out", str(tmp_path / "w.gguf"), "--type", "f16"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert {t.tensor_type.name for t in GGUFReader(tmp_path / "w.gguf").tensors} == {"F16", "F32"}
