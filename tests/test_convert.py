"""HF <-> jaxft conversion against real transformers checkpoints written in-test."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import smollm2_gguf
import torch
import transformers
from safetensors.numpy import load_file, save_file

from jaxft import convert, modeldir
from jaxft.__main__ import main as cli

HF_KW = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
             rms_norm_eps=1e-5)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def hf_model(seed=0, dtype=torch.float32, **kw):
    """A random LlamaForCausalLM whose every weight (norms included) is non-trivial."""
    torch.manual_seed(seed)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**HF_KW, **kw}))
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name
                    else torch.randn_like(p) / p.shape[-1] ** 0.5)
    return m.to(dtype).eval()


def save_tokenizer(d: Path):
    """A real byte-level BPE trained on a few sentences, saved as tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["the quick brown fox", "jumps over the lazy dog"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"]))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def hf_logits(d, ids):
    m = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(torch.tensor(ids)).logits.numpy()


def hf_tensors(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def params_of(d):
    cfg = modeldir.read_config(d)
    return cfg, convert.read_params_host(Path(d), cfg)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "untied"
    hf_model().save_pretrained(d)
    save_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def ckpt(hf_dir, tmp_path_factory):
    return convert.from_hf(hf_dir, tmp_path_factory.mktemp("jx") / "ckpt")


IDS = np.random.default_rng(0).integers(0, 100, (2, 40))


@pytest.mark.parametrize("dtype,kw", [(torch.float32, {}),
                                      (torch.bfloat16, {"tie_word_embeddings": True,
                                                        "rope_parameters": LLAMA3})],
                         ids=["fp32-untied", "bf16-tied-llama3"])
def test_round_trip_is_byte_identical_and_loads_in_transformers(tmp_path, dtype, kw):
    src = tmp_path / "src"
    hf_model(dtype=dtype, **kw).save_pretrained(src)
    convert.from_hf(src, tmp_path / "ckpt")
    cfg = modeldir.read_config(tmp_path / "ckpt")
    assert cfg.param_dtype == str(dtype).removeprefix("torch.")
    assert cfg.tie_embeddings == bool(kw) and (cfg.rope_scaling is not None) == bool(kw)
    convert.to_hf_dir(tmp_path / "ckpt", tmp_path / "back")
    a, b = hf_tensors(src), hf_tensors(tmp_path / "back")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k
    np.testing.assert_array_equal(hf_logits(tmp_path / "back", IDS), hf_logits(src, IDS))


def test_padded_vocab_rows_are_zero_and_real_rows_match(hf_dir, ckpt):
    cfg, p = params_of(ckpt)
    emb = hf_tensors(hf_dir)["model.embed_tokens.weight"]
    assert p["embed_VxD"].shape[0] == 128 > cfg.vocab_size == 100
    np.testing.assert_array_equal(np.asarray(p["embed_VxD"])[:100], emb)
    assert not np.asarray(p["embed_VxD"])[100:].any()
    q0 = hf_tensors(hf_dir)["model.layers.1.self_attn.q_proj.weight"]  # (H*E, D)
    np.testing.assert_array_equal(np.asarray(p["blocks"]["attn"]["wq_DxHxE"])[1],
                                  q0.T.reshape(32, 4, 8))


def test_sharded_input_and_output(hf_dir, ckpt, tmp_path):
    src = tmp_path / "sharded"
    hf_model().save_pretrained(src, max_shard_size="20KB")
    assert (src / "model.safetensors.index.json").is_file()
    assert len(list(src.glob("*.safetensors"))) > 1
    shutil.copy(hf_dir / "tokenizer.json", src)
    _, a = params_of(convert.from_hf(src, tmp_path / "ckpt"))
    _, b = params_of(ckpt)
    for x, y in zip(*(sorted(_flat(t).items()) for t in (a, b))):
        np.testing.assert_array_equal(np.asarray(x[1]), np.asarray(y[1]), err_msg=x[0])

    out = convert.to_hf_dir(ckpt, tmp_path / "out", max_shard_size="30KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(out.glob("*.safetensors"))
    assert len(files) > 1 and set(index["weight_map"].values()) == {f.name for f in files}
    assert set(index["weight_map"]) == set(hf_tensors(hf_dir))
    for f in files:  # a shard passes the limit only when it holds one tensor bigger than it
        assert f.stat().st_size <= 30_000 + 2_000 or len(load_file(str(f))) == 1
    np.testing.assert_array_equal(hf_logits(out, IDS), hf_logits(hf_dir, IDS))


def _flat(tree, prefix=""):
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for n, t in tree.items() for k, v in _flat(t, f"{prefix}/{n}").items()}


def test_legacy_bin_input(hf_dir, ckpt, tmp_path):
    src = tmp_path / "bin"
    src.mkdir()
    shutil.copy(hf_dir / "config.json", src)
    sd = {k: torch.from_numpy(v.copy()) for k, v in hf_tensors(hf_dir).items()}
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # old buffers: ignored
    torch.save(sd, src / "pytorch_model.bin")
    _, a = params_of(convert.from_hf(src, tmp_path / "ckpt"))
    _, b = params_of(ckpt)
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_rope_config_styles_agree():
    base = {"model_type": "llama", **HF_KW}
    v5 = convert.config_from_hf({**base, "rope_parameters": LLAMA3})
    scaling = {k: v for k, v in LLAMA3.items() if k != "rope_theta"}
    v4 = convert.config_from_hf({**base, "rope_theta": 50000.0, "rope_scaling": scaling})
    v4_type = {**scaling, "type": scaling["rope_type"]}
    del v4_type["rope_type"]
    v4b = convert.config_from_hf({**base, "rope_theta": 50000.0, "rope_scaling": v4_type})
    assert v5 == v4 == v4b and v5.rope_theta == 50000.0 and v5.rope_scaling["factor"] == 8.0
    plain5 = convert.config_from_hf({**base, "rope_parameters": {"rope_type": "default",
                                                                 "rope_theta": 1e6}})
    plain4 = convert.config_from_hf({**base, "rope_theta": 1e6})
    assert plain5 == plain4 and plain5.rope_theta == 1e6 and plain5.rope_scaling is None
    with pytest.raises(convert.ConvertError, match="yarn"):
        convert.config_from_hf({**base, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(convert.ConvertError, match="intermediate_size"):
        convert.config_from_hf({k: v for k, v in base.items() if k != "intermediate_size"})
    # and what we write back is what transformers reads
    hf = transformers.LlamaConfig.from_dict(convert.config_to_hf(v5))
    assert hf.rope_parameters["rope_type"] == "llama3" and hf.rope_parameters["factor"] == 8.0
    assert hf.rope_parameters["rope_theta"] == 50000.0 and hf.num_key_value_heads == 2


def _broken(hf_dir: Path, d: Path, edit) -> Path:
    d.mkdir()
    shutil.copy(hf_dir / "config.json", d)
    t = hf_tensors(hf_dir)
    edit(t)
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


BAD = {
    "missing": (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
                "model.layers.1.mlp.up_proj.weight is missing"),
    "extra": (lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)}),
              "tensor model.layers.0.self_attn.q_norm.weight is unexpected"),
    "shape": (lambda t: t.update({"model.layers.0.mlp.down_proj.weight":
                                  t["model.layers.0.mlp.down_proj.weight"].T.copy()}),
              "model.layers.0.mlp.down_proj.weight has shape [64, 32], expected [32, 64]"),
}


@pytest.mark.parametrize("case", [*BAD, "no-dir"])
def test_bad_input_names_the_tensor_and_writes_nothing(hf_dir, tmp_path, capsys, case):
    src = tmp_path / "nowhere" if case == "no-dir" else _broken(hf_dir, tmp_path / "src", BAD[case][0])
    out = tmp_path / "out" / "ckpt"
    assert cli(["convert", "--from-hf", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert (f"{src}: no such HF model directory" if case == "no-dir" else BAD[case][1]) in err
    assert not out.exists() and not any((tmp_path / "out").glob("*"))


@pytest.mark.parametrize("direction", ["from-hf", "to-hf"])
def test_existing_output_needs_force(hf_dir, ckpt, tmp_path, capsys, direction):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    src = hf_dir if direction == "from-hf" else ckpt
    argv = [f"--{direction}", str(src), "--out", str(out)]
    assert cli(["convert", *argv]) == 2
    assert "--force" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert cli(["convert", *argv, "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def _tree_bytes(d: Path) -> dict:
    return {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}


@pytest.mark.parametrize("direction", ["from-hf", "to-hf"])
def test_output_that_is_or_contains_the_input_is_refused(hf_dir, ckpt, tmp_path, capsys, direction):
    """--out D for input D (or a parent of it) would delete the source: refused even with
    --force, and the source stays byte-identical."""
    src = shutil.copytree(hf_dir if direction == "from-hf" else ckpt, tmp_path / "src" / "model")
    before = _tree_bytes(src)
    for out in (src, src.parent):
        assert cli(["convert", f"--{direction}", str(src), "--out", str(out), "--force"]) == 2
        assert "is or contains the input" in capsys.readouterr().err
    assert _tree_bytes(src) == before


def test_tokenizer_files_travel_both_ways(hf_dir, ckpt, tmp_path):
    from tokenizers import Tokenizer
    back = convert.to_hf_dir(ckpt, tmp_path / "back")
    text = "the lazy fox jumps"
    assert (Tokenizer.from_file(str(back / "tokenizer.json")).encode(text).ids
            == Tokenizer.from_file(str(hf_dir / "tokenizer.json")).encode(text).ids)
    assert json.loads((back / "tokenizer_config.json").read_text())["eos_token"] == "</s>"
    eos = Tokenizer.from_file(str(hf_dir / "tokenizer.json")).token_to_id("</s>")
    assert json.loads((back / "config.json").read_text())["eos_token_id"] == eos


def test_jaxft_load_gives_model_tokenizer_config(hf_dir, ckpt):
    pytest.importorskip("jaxft.tokenizer", reason="jaxft/tokenizer.py has not landed yet")
    import jaxft
    loaded = jaxft.load(ckpt)
    assert loaded.config == modeldir.read_config(ckpt) and loaded.tokenizer is not None
    logits = np.asarray(loaded.model(IDS))
    assert logits.shape == (2, 40, 100)
    np.testing.assert_allclose(logits, hf_logits(hf_dir, IDS), atol=1e-4, rtol=0)


def test_parse_size():
    assert convert.parse_size("5GB") == 5 * 10**9
    assert convert.parse_size("1.5MiB") == int(1.5 * 2**20) and convert.parse_size("300") == 300
    with pytest.raises(convert.ConvertError, match="max-shard-size"):
        convert.parse_size("lots")


def test_tools_wrapper_runs_the_same_converter(hf_dir, ckpt, tmp_path):
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "tools" / "convert_hf.py"), "--from-hf",
                        str(hf_dir), "--out", str(tmp_path / "c")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert modeldir.read_config(tmp_path / "c") == modeldir.read_config(ckpt)


def test_gguf_import_matches_transformers_gguf_loader(tmp_path):
    gguf_file = smollm2_gguf()
    import jax
    import jaxft
    out = tmp_path / "smol"
    assert cli(["convert", "--from-gguf", str(gguf_file), "--out", str(out)]) == 0
    loaded = jaxft.load(out)
    assert (loaded.config.n_heads, loaded.config.n_kv_heads, loaded.config.tie_embeddings) == (9, 3, True)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    texts = ["The capital of France is", "def fib(n):\n    return 12345 + 67",
             "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"]
    for text in texts:
        ids = loaded.tokenizer.encode(text)
        assert ids == ref_tok.encode(text, add_special_tokens=False), text
        with torch.no_grad():
            want = ref_model(torch.tensor([ids])).logits.numpy()
        got = np.asarray(loaded.model(jax.numpy.asarray([ids])))
        np.testing.assert_allclose(got, want, atol=1e-3, rtol=0, err_msg=text)
    assert loaded.tokenizer.eos_id == ref_tok.eos_token_id


def test_gguf_missing_file_is_a_clear_error(tmp_path, capsys):
    assert cli(["convert", "--from-gguf", str(tmp_path / "no.gguf"), "--out", str(tmp_path / "o")]) == 2
    assert "no such GGUF file" in capsys.readouterr().err and not (tmp_path / "o").exists()


class _Hostile:
    """Unpickling this runs code: a weights-only loader must refuse it."""
    def __reduce__(self):
        return (print, ("pwned",))


def _bad_hf_dir(hf_dir, tmp_path, kind):
    d = tmp_path / kind
    shutil.copytree(hf_dir, d)
    if kind == "truncated-safetensors":
        f = d / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif kind == "not-safetensors":
        (d / "model.safetensors").write_text("this is not a tensor file")
    elif kind == "hostile-bin":
        (d / "model.safetensors").unlink()
        torch.save({"model.embed_tokens.weight": _Hostile()}, d / "pytorch_model.bin")
    return d


@pytest.mark.parametrize("kind,what", [("truncated-safetensors", "safetensors"),
                                       ("not-safetensors", "safetensors"),
                                       ("hostile-bin", "a PyTorch weights-only checkpoint")])
def test_unreadable_weights_are_one_line_naming_the_file(hf_dir, tmp_path, capsys, kind, what):
    src = _bad_hf_dir(hf_dir, tmp_path, kind)
    assert cli(["convert", "--from-hf", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{src}/" in err and f"cannot read it as {what}" in err and "Traceback" not in err
    assert "pwned" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["not-gguf", "truncated-gguf"])
def test_unreadable_gguf_is_one_line_naming_the_file(tmp_path, capsys, kind):
    f = tmp_path / "model.gguf"
    if kind == "not-gguf":
        f.write_text("GGUF? no, just text\n" * 10)
    else:
        with open(smollm2_gguf(), "rb") as src:
            f.write_bytes(src.read(4_000_000))  # the header and the start of the tensors
    assert cli(["convert", "--from-gguf", str(f), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{f}: cannot read it as" in err and not (tmp_path / "out").exists()


def test_hf_dir_without_tokenizer_warns(hf_dir, tmp_path, caplog):
    src = tmp_path / "bare"
    src.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(hf_dir / f, src / f)
    with caplog.at_level("WARNING", logger="jaxft"):
        out = convert.from_hf(src, tmp_path / "out")
    assert not (out / "tokenizer").exists()
    assert any("has no tokenizer files" in r.getMessage() and "the output has no tokenizer" in r.getMessage()
               for r in caplog.records)
