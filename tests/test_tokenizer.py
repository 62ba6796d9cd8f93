"""Tokenizers: ids, added special tokens, save/load, and agreement with HF transformers."""
import csv
import json

import pytest
from sentencepiece import sentencepiece_model_pb2 as sp_pb
from tokenizers import Tokenizer as HFCore
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from jaxft.modeldir import OutputExistsError
from jaxft.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer, train_sentencepiece

MARKERS = ["<START_Q>", "<END_Q>", "<START_A>", "<END_A>"]
SAMPLES = ["x<START_Q>y", "<START_Q>Is Dirt: Showdown fun?<END_Q><START_A>yes<END_A>",
           "Plain text, digits 2012 and  two spaces.", "naïve café — 10+ ✓", "ab<END_A><START_Q>cd"]


@pytest.fixture(scope="module")
def texts(data_root):
    with open(data_root / "viggo" / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:1000]
    return [r["ref"] for r in rows] + [r["mr"] for r in rows]


@pytest.fixture(scope="module")
def hf_dir(texts, tmp_path_factory):
    """A small byte-level BPE tokenizer.json (SmolLM2 style) with a config naming its specials."""
    core = HFCore(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    core.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    d = tmp_path_factory.mktemp("hf")
    core.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    return d


@pytest.fixture(scope="module")
def sp_dir(texts, tmp_path_factory):
    d = tmp_path_factory.mktemp("sp")
    train_sentencepiece(texts, vocab_size=400, out_dir=d)
    return d


@pytest.fixture(params=["sp", "hf"])
def tok(request, sp_dir, hf_dir):
    """A fresh tokenizer per test (tests add tokens to it)."""
    return load_tokenizer(sp_dir if request.param == "sp" else hf_dir)


def test_trained_sentencepiece_ids_and_determinism(texts, sp_dir, tmp_path):
    tok = load_tokenizer(sp_dir)
    assert isinstance(tok, SentencePieceTokenizer) and len(tok) == 400
    assert [tok.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    train_sentencepiece(texts, vocab_size=400, out_dir=tmp_path)
    assert (tmp_path / "tokenizer.model").read_bytes() == (sp_dir / "tokenizer.model").read_bytes()


def test_session_fixture_works(sp_tokenizer):
    assert len(sp_tokenizer) >= 400 and sp_tokenizer.eos_id == 2
    assert sp_tokenizer.decode(sp_tokenizer.encode("Dirt: Showdown, 2012")) == "Dirt: Showdown, 2012"


def test_special_tokens_get_one_new_id_each_and_never_split(tok):
    n = len(tok)
    assert len(tok.encode("<START_Q>")) > 1  # split into pieces before it is added
    ids = tok.add_special_tokens(MARKERS)
    assert ids == list(range(n, n + 4)) and len(tok) == n + 4
    assert tok.add_special_tokens(["<END_A>", "<START_Q>"]) == [ids[3], ids[0]] and len(tok) == n + 4
    q, a = ids[0], ids[3]
    assert tok.encode("<START_Q>") == [q]
    glued = tok.encode("x<START_Q>y")
    assert glued.count(q) == 1 and tok.decode(glued[:glued.index(q)]) == "x"
    assert tok.decode(glued[glued.index(q) + 1:]) == "y"
    both = tok.encode("ab<END_A><START_Q>cd")
    assert [i for i in both if i >= n] == [a, q]
    assert [tok.id_to_piece(i) for i in ids] == MARKERS
    assert [tok.token_id(t) for t in MARKERS] == ids and tok.token_id("<NOT_THERE>") is None
    for s in SAMPLES:
        assert tok.decode(tok.encode(s)) == s
    assert tok.decode(tok.encode("x<START_Q>y<END_A>"), skip_special=True) == "xy"


def test_decode_shows_bos_eos_unless_skipped(sp_dir):
    tok = load_tokenizer(sp_dir)
    ids = [tok.bos_id] + tok.encode("hello there") + [tok.eos_id]
    assert tok.decode(ids) == "<s>hello there</s>"
    assert tok.decode(ids, skip_special=True) == "hello there"


def test_save_load_round_trip(tok, tmp_path):
    ids = tok.add_special_tokens(MARKERS)
    tok.save(tmp_path / "t")
    back = load_tokenizer(tmp_path / "t")
    assert type(back) is type(tok) and len(back) == len(tok)
    assert (back.bos_id, back.eos_id, back.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert [back.token_id(t) for t in MARKERS] == ids
    for s in SAMPLES:
        assert back.encode(s) == tok.encode(s)
    assert [back.id_to_piece(i) for i in range(len(tok))] == [tok.id_to_piece(i) for i in range(len(tok))]


def test_save_refuses_to_overwrite(tok, tmp_path):
    tok.save(tmp_path)
    with pytest.raises(OutputExistsError, match="--force"):
        tok.save(tmp_path)
    tok.add_special_tokens(["<NEW>"])
    tok.save(tmp_path, force=True)
    assert load_tokenizer(tmp_path).token_id("<NEW>") == len(tok) - 1


def test_hf_autotokenizer_reads_saved_dir_with_same_ids(tok, texts, tmp_path):
    from transformers import AutoTokenizer
    ids = tok.add_special_tokens(MARKERS)
    tok.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.convert_tokens_to_ids(MARKERS) == ids
    assert (hf.eos_token_id, hf.pad_token_id) == (tok.eos_id, tok.pad_id)
    assert hf.bos_token_id == tok.bos_id or tok.bos_id is None
    for s in SAMPLES + texts[:50]:
        assert hf.encode(s, add_special_tokens=False) == tok.encode(s), s


def test_hf_special_ids_from_post_processor_config_or_guess(hf_dir):
    core = HFCore.from_file(str(hf_dir / "tokenizer.json"))
    plain = HFTokenizer(core)  # no config: no BOS, eos guessed from the usual names
    assert plain.bos_id is None and plain.eos_id == plain.pad_id == core.token_to_id("<|endoftext|>")
    configured = HFTokenizer(core, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                    "bos_token": "<|im_start|>", "add_bos_token": True})
    assert (configured.bos_id, configured.eos_id, configured.pad_id) == (1, 2, 0)
    core.post_processor = processors.TemplateProcessing(single="<|im_start|> $A",
                                                        special_tokens=[("<|im_start|>", 1)])
    with_bos = HFTokenizer(core)
    assert with_bos.bos_id == 1 and with_bos.encode("hi") == plain.encode("hi")  # encode adds no BOS


def test_hf_without_any_eos_is_an_error(texts):
    core = HFCore(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel()
    core.train_from_iterator(texts[:50], trainers.BpeTrainer(vocab_size=300, show_progress=False))
    with pytest.raises(ValueError, match="end-of-sequence.*eos_token"):
        HFTokenizer(core, source="x/tokenizer.json")


def test_sentencepiece_without_pad_pads_with_unk(sp_dir):
    proto = sp_pb.ModelProto.FromString((sp_dir / "tokenizer.model").read_bytes())
    proto.trainer_spec.pad_id = -1
    proto.pieces[3].type = sp_pb.ModelProto.SentencePiece.USER_DEFINED
    tok = SentencePieceTokenizer(proto.SerializeToString())
    assert tok.pad_id == 0 == tok.token_id("<unk>")


def test_bad_paths_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*tokenizer.model.*tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(ValueError, match="vocab.txt"):
        load_tokenizer(tmp_path / "vocab.txt")
