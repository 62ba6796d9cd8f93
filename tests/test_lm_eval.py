"""jaxft as an lm-eval model, against lm-eval's own `hf` backend on the `--to-hf` export of the
same tiny model: offline task YAMLs over JSONL files written here (multiple choice, rolling
loglikelihood, generation), then sampling, decode rounds, a sharded mesh, the CLI wrapper and
bad input."""
import dataclasses
import json
import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # every dataset here is a local JSONL file
os.environ.setdefault("HF_HUB_OFFLINE", "1")

lm_eval = pytest.importorskip("lm_eval")  # the [eval] extra

import jax  # noqa: E402
import numpy as np  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import setup_logging  # noqa: E402

from jaxft import convert, modeldir, sharding, state  # noqa: E402
from jaxft.config import get_preset  # noqa: E402
from jaxft.__main__ import main as cli  # noqa: E402
from jaxft.config import MeshConfig  # noqa: E402
from jaxft.lm_eval import JaxftLM, LMEvalError  # noqa: E402
from jaxft.tokenizer import load_tokenizer  # noqa: E402

# lm-eval binds its log handler to sys.stderr on first use: bind it now, not to one test's
# captured stream (which closes, and later log lines would fail to write).
setup_logging()

CORPUS = ["the quick brown fox jumps over the lazy dog.",
          "a cat sat on the mat and looked at the dog.",
          "what is the colour of the sky? the sky is blue.", "the dog ran to the cat and sat down."]
MAX_LENGTH, MAX_GEN = 48, 16  # small enough that long requests get truncated and windowed
LONG = " ".join(CORPUS * 2)  # longer than MAX_LENGTH tokens


def write_tokenizer(d):
    """A byte-level BPE over CORPUS, with a config naming BOS (never added) and EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<s>", "</s>"])
    tok.train_from_iterator(CORPUS * 20, trainer)
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return load_tokenizer(d)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def task_yaml(d, name, data, output_type, body):
    (d / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"output_type: {output_type}\ntest_split: test\n{body}")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(jaxft model dir, its HF export, task dir): a random tiny Llama with a real tokenizer."""
    root = tmp_path_factory.mktemp("lm_eval")
    tok = write_tokenizer(root / "tok")
    cfg = dataclasses.replace(get_preset("tiny"), vocab_size=len(tok), max_seq_len=128)
    one_device = sharding.make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    model = state.init_model(cfg, one_device, seed=3)
    modeldir.save_model(root / "jx", model, tok)
    convert.to_hf_dir(root / "jx", root / "hf")
    tasks = root / "tasks"
    tasks.mkdir()
    mc = [{"q": "the quick brown", "choices": [" fox", " dog", " cat"], "label": 0},
          {"q": "the sky is", "choices": [" blue", " the mat"], "label": 0},
          {"q": LONG + " the cat", "choices": [" sat", " ran", " is blue"], "label": 0},
          {"q": "a cat", "choices": [" sat on the mat", " jumps"], "label": 1}]
    task_yaml(tasks, "t_mc", write_jsonl(root / "mc.jsonl", mc), "multiple_choice",
              'doc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
              'target_delimiter: ""\nmetric_list:\n  - metric: acc\n')
    ppl = write_jsonl(root / "ppl.jsonl", [{"text": t} for t in CORPUS + [LONG]])
    task_yaml(tasks, "t_ppl", ppl, "loglikelihood_rolling",
              'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
              'metric_list:\n  - metric: word_perplexity\n')
    gen = [{"q": t[:12], "a": t[12:]} for t in CORPUS] + [{"q": LONG, "a": "x"}]
    task_yaml(tasks, "t_gen", write_jsonl(root / "gen.jsonl", gen), "generate_until",
              'doc_to_text: "{{q}}"\ndoc_to_target: "{{a}}"\ngeneration_kwargs:\n'
              f'  until: [".", "the"]\n  max_gen_toks: {MAX_GEN}\n  do_sample: false\n'
              "metric_list:\n  - metric: exact_match\n")
    return root / "jx", root / "hf", tasks


@pytest.fixture(scope="module")
def lm(dirs):
    return JaxftLM(path=str(dirs[0]), batch_size=4, max_length=MAX_LENGTH, max_gen_toks=MAX_GEN)


@pytest.fixture(scope="module")
def runs(dirs, lm):
    """Both backends through lm_eval.simple_evaluate on the three tasks: {name: results}."""
    tm = TaskManager(include_path=str(dirs[2]), include_defaults=False)
    hf_args = f"pretrained={dirs[1]},dtype=float32,device=cpu,batch_size=4,max_length={MAX_LENGTH}"
    out = {}
    for name, model, args in [("jaxft", lm, None), ("hf", "hf", hf_args)]:
        out[name] = lm_eval.simple_evaluate(model=model, model_args=args,
                                            tasks=["t_mc", "t_ppl", "t_gen"], task_manager=tm,
                                            log_samples=True, bootstrap_iters=0)
    return out


def gen_requests(contexts, **gen_kwargs):
    return [Instance("generate_until", {}, (c, gen_kwargs), i) for i, c in enumerate(contexts)]


def resps(run, task):
    return [s["resps"] for s in sorted(run["samples"][task], key=lambda s: s["doc_id"])]


def test_multiple_choice_matches_hf(runs, lm, dirs):
    ours = [r[0] for doc in resps(runs["jaxft"], "t_mc") for r in doc]
    ref = [r[0] for doc in resps(runs["hf"], "t_mc") for r in doc]
    assert len(ours) == len(ref) == 10
    np.testing.assert_allclose([x[0] for x in ours], [x[0] for x in ref], rtol=1e-4)
    assert [x[1] for x in ours] == [x[1] for x in ref]
    assert runs["jaxft"]["results"]["t_mc"]["acc,none"] == runs["hf"]["results"]["t_mc"]["acc,none"]
    # The long doc's three requests were left-truncated, as the hf backend does it.
    assert lm.truncated["loglikelihood"] == 3


def test_is_greedy_when_the_continuation_is_the_models_own(lm):
    ctx = "the sky is"
    greedy = lm.generate_until(gen_requests([ctx], until=[], max_gen_toks=3))[0]
    other = " zzz" if not greedy.startswith(" zzz") else " qqq"
    (lp_g, is_g), (lp_o, is_o) = lm.loglikelihood(
        [Instance("loglikelihood", {}, (ctx, c), i) for i, c in enumerate([greedy, other])])
    assert is_g and not is_o


def test_rolling_loglikelihood_matches_hf(runs, lm):
    ours = [doc[0][0] for doc in resps(runs["jaxft"], "t_ppl")]
    ref = [doc[0][0] for doc in resps(runs["hf"], "t_ppl")]
    assert len(ours) == 5 and len(lm.tok_encode(LONG)) > MAX_LENGTH  # two windows or more
    np.testing.assert_allclose(ours, ref, rtol=1e-4)
    assert all(x < 0 for x in ours)


def test_greedy_generation_matches_hf(runs, lm):
    ours = [doc[0][0] for doc in resps(runs["jaxft"], "t_gen")]
    ref = [doc[0][0] for doc in resps(runs["hf"], "t_gen")]
    assert ours == ref and len(ours) == 5
    assert lm.truncated["generate_until"] == 1  # LONG is over MAX_LENGTH - MAX_GEN tokens
    # Without stop strings the same prompts run on: some output was cut at "." or "the".
    free = lm.generate_until(gen_requests([t[:12] for t in CORPUS], until=[], max_gen_toks=MAX_GEN))
    assert all(f.startswith(o) for f, o in zip(free, ours))
    assert any(len(f) > len(o) for f, o in zip(free, ours))


def test_decode_rounds_give_the_same_greedy_text(dirs, lm):
    reqs = gen_requests([t[:10] for t in CORPUS], until=["fox"], max_gen_toks=20)
    one_round = lm.generate_until(reqs)
    short = JaxftLM(path=str(dirs[0]), batch_size=4, max_length=MAX_LENGTH)
    short.FIRST_ROUND = 3  # rounds of 3, 6, 11 tokens, each re-prefilled
    assert short.generate_until(reqs) == one_round


def test_sampling_is_seeded_and_differs_from_greedy(lm):
    def run(**kw):
        reqs = gen_requests([t[:8] for t in CORPUS], until=[], max_gen_toks=12, **kw)
        return lm.generate_until(reqs)
    greedy = run(do_sample=False)
    a, b = run(do_sample=True, temperature=1.0), run(do_sample=True, temperature=1.0)
    assert a == b and a != greedy
    assert run(do_sample=True, temperature=1.0, top_k=1) == greedy  # top-1 sampling is greedy


def test_sharded_mesh_scores_the_same(dirs, lm):
    reqs = [Instance("loglikelihood", {}, (t[:15], t[15:]), i) for i, t in enumerate(CORPUS)]
    reqs += [Instance("loglikelihood", {}, ("the sky is", c), 9) for c in (" blue", " the dog")]
    sharded = JaxftLM(path=str(dirs[0]), batch_size=4, max_length=MAX_LENGTH, mesh="2x2x2")
    assert len(sharded.model.embed_VxD[...].sharding.device_set) == 8
    np.testing.assert_allclose([x for x, _ in sharded.loglikelihood(reqs)],
                               [x for x, _ in lm.loglikelihood(reqs)], rtol=1e-5)


def test_cli_wrapper_registers_the_model(dirs, capsys):
    rc = cli(["lm-eval", "--model_args", f"path={dirs[0]},batch_size=4,max_length={MAX_LENGTH}",
              "--tasks", "t_mc", "--include_path", str(dirs[2])])
    out = capsys.readouterr().out
    assert rc == 0 and "t_mc" in out and "jaxft" in out


@pytest.mark.parametrize("args,message", [
    ({"max_length": 129}, "max_length=129: the model supports at most 128 tokens"),
    ({"temprature": 0.5}, "unknown key temprature"),
    ({"mesh": "2by2"}, "expected DATAxFSDPxTENSOR"),
    ({"batch_size": 0}, "batch_size=0: expected a positive integer"),
], ids=["max_length", "unknown-key", "mesh", "batch_size"])
def test_bad_model_args(dirs, args, message):
    with pytest.raises(LMEvalError, match=message):
        JaxftLM(path=str(dirs[0]), **args)


def test_model_dir_without_tokenizer(dirs, tmp_path):
    import shutil
    d = tmp_path / "notok"
    shutil.copytree(dirs[0], d, ignore=shutil.ignore_patterns("tokenizer"))
    with pytest.raises(LMEvalError, match="has no tokenizer"):
        JaxftLM(path=str(d))


def test_cli_errors_are_one_line_exit_2(dirs, capsys):
    rc = cli(["lm-eval", "--model_args", f"path={dirs[0]},colour=blue", "--tasks", "t_mc",
              "--include_path", str(dirs[2])])
    err = capsys.readouterr().err.strip().splitlines()
    # (lm-eval's own log lines may come before it; the exception itself does not escape)
    assert rc == 2 and err[-1].startswith("jaxft lm-eval: error: model_args: unknown key colour")


def test_unsupported_gen_kwarg_is_named(lm):
    with pytest.raises(LMEvalError, match="gen_kwargs repetition_penalty"):
        lm.generate_until(gen_requests(["the"], until=[], repetition_penalty=1.2))


def test_sentencepiece_bos_and_empty_context_match_hf(sp_tokenizer, tmp_path):
    """A tokenizer that adds BOS (SentencePiece, Llama-2 style): encodings, the prefix token of
    an empty context and rolling windows agree with the hf backend request by request."""
    from lm_eval.models.huggingface import HFLM
    cfg = dataclasses.replace(get_preset("tiny"), vocab_size=len(sp_tokenizer), max_seq_len=64)
    one_device = sharding.make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    modeldir.save_model(tmp_path / "jx", state.init_model(cfg, one_device, seed=5), sp_tokenizer)
    convert.to_hf_dir(tmp_path / "jx", tmp_path / "hf")
    ours = JaxftLM(path=str(tmp_path / "jx"), batch_size=2, max_length=32)
    ref = HFLM(pretrained=str(tmp_path / "hf"), device="cpu", dtype="float32", batch_size=2,
               max_length=32)
    texts = ["The Witcher 3 is a great game.", "family friendly: yes", ""]
    assert [ours.tok_encode(t) for t in texts] == [ref.tok_encode(t) for t in texts]
    assert ours.tok_encode(texts[0])[0] == sp_tokenizer.bos_id == ours.prefix_token_id
    assert ref.prefix_token_id == ours.prefix_token_id
    # (No text here starts with a space: there jaxft's SentencePiece tokenizer, like the
    # sentencepiece library, keeps a lone "▁" piece that transformers' converted one drops.)
    ll = [Instance("loglikelihood", {}, ("", "great game"), 0),
          Instance("loglikelihood", {}, ("The Witcher 3 is", " a great game."), 1)]
    rolling = [Instance("loglikelihood_rolling", {}, (" ".join(texts[:2] * 6),), 0)]
    np.testing.assert_allclose([x for x, _ in ours.loglikelihood(ll)],
                               [x for x, _ in ref.loglikelihood(ll)], rtol=1e-4)
    np.testing.assert_allclose(ours.loglikelihood_rolling(rolling),
                               ref.loglikelihood_rolling(rolling), rtol=1e-4)


def test_generate_keep_stop_keeps_the_stop_token(lm):
    from jaxft.generate import generate
    prompts = [lm.tok_encode(t[:10]) for t in CORPUS]
    free = generate(lm.model, prompts, 12)
    stop = free[0][3]
    kept = generate(lm.model, prompts, 12, stop_ids=[stop], keep_stop=True)
    cut = generate(lm.model, prompts, 12, stop_ids=[stop])
    for f, k, c in zip(free, kept, cut):
        end = f.index(stop) if stop in f else len(f)
        assert k == f[:end + 1] and c == f[:end]
    assert kept[0] == free[0][:4]
