"""Multiple choice: loaders (MMLU from the registry, CMMLU/C-Eval CSVs) and letter scoring vs transformers."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch

from qianwen.errors import QianwenError
from qianwen.eval import multiple_choice as MC
from qianwen.eval.data import MCItem, MCTask, load_ceval, load_cmmlu, load_mmlu

WORDS = "alpha beta gamma delta river stone cloud paper engine market proton theory garden".split()
ZH = "水 火 山 石 云 天 地 人 心 书 电 学".split()


def _text(rng: random.Random, zh: bool = False, n: int = 6) -> str:
    pool = ZH if zh else WORDS
    return ("" if zh else " ").join(rng.choice(pool) for _ in range(n))


def _make_tokenizer(folder: Path) -> int:
    """Byte-level BPE trained on MMLU-shaped text, so ' A'..' D' are single tokens as in real vocabularies."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    corpus = []
    for _ in range(200):
        corpus.append(f"Question: {_text(rng)}?\nA. {_text(rng, n=2)}\nB. x\nC. y\nD. z\nAnswer: "
                      f"{rng.choice('ABCD')}\n\n The following are multiple choice questions (with answers) about")
        corpus.append(f"问题：{_text(rng, True)}\nA. {_text(rng, True, 2)}\n答案：{rng.choice('ABCD')}\n\n")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(folder / "tokenizer.json"))
    chatml = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
              "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": chatml}))
    return tok.get_vocab_size()


@pytest.fixture(scope="module")
def tiny_mc_dir(tmp_path_factory) -> Path:
    import transformers

    from tests.conftest import tiny_hf_config

    folder = tmp_path_factory.mktemp("tiny_mc")
    n = _make_tokenizer(folder)
    cfg = tiny_hf_config("qwen2", n, max_position_embeddings=2048, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # larger random weights: log-probs far from uniform, so disagreements show
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if ("bias" in name or "norm" in name) else 0.05))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def tiny_mc(tiny_mc_dir):
    import qianwen

    return qianwen.load(str(tiny_mc_dir), dtype="float32", device="cpu")


def _task(rng: random.Random, name: str = "mmlu", lang: str = "en", subjects=("alpha_beta", "gamma"),
          n: int = 7, dev: int = 0) -> MCTask:
    def item(s: str, i: int) -> MCItem:
        return MCItem(_text(rng, lang == "zh", rng.randint(3, 12)),
                      [_text(rng, lang == "zh", rng.randint(1, 4)) for _ in range(4)], rng.choice("ABCD"), s, i)

    test = {s: [item(s, i) for i in range(n)] for s in subjects}
    devs = {s: [item(s, i) for i in range(dev)] for s in subjects} if dev else {}
    return MCTask(name, lang, test, devs)


@pytest.mark.parametrize("lang,dev", [("en", 0), ("zh", 5)])
def test_letter_scoring_matches_transformers(tiny_mc, tiny_mc_dir, lang, dev):
    import transformers

    rng = random.Random(1)
    task = _task(rng, "mmlu" if lang == "en" else "ceval", lang, dev=dev)
    items = MC.stratified_sample(task, None)
    prompts = MC.build_prompts(task, items, tiny_mc.tokenizer.encode, shots=3)
    letters = MC.letter_token_ids(tiny_mc.tokenizer, lang)
    # the shared prefix really is shared: fewer distinct prefixes than questions
    assert len({tuple(p.prefix) for p in prompts}) < len(prompts)
    ours = MC.score_prompts(tiny_mc.net, prompts, letters, "cpu", batch_size=3)

    # the vocabulary exactly as tokenizer.json defines it (AutoTokenizer would pick Qwen2's pre-tokenizer
    # for this model_type, which this synthetic vocabulary was not trained with)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tiny_mc_dir / "tokenizer.json"))
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_mc_dir), dtype=torch.float32)
    sep = " " if lang == "en" else ""
    tail = "\nAnswer:" if lang == "en" else "\n答案："
    assert letters == [hf_tok(tail + sep + x)["input_ids"][-1] for x in "ABCD"]
    for p, lp in zip(prompts, ours, strict=True):
        text = MC.few_shot_prefix(task, p.item, 3) + MC.format_item(p.item, lang, False)
        ids = hf_tok(text)["input_ids"]
        assert p.prefix + p.suffix == ids  # split tokenization equals tokenizing the whole prompt
        with torch.no_grad():
            ref = torch.log_softmax(ref_model(torch.tensor([ids])).logits[0, -1].float(), -1)[letters]
        torch.testing.assert_close(torch.tensor(lp), ref, atol=2e-4, rtol=1e-4)
        assert max(range(4), key=lambda j: lp[j]) == int(ref.argmax())


def test_prompt_format_and_exemplars():
    it = MCItem("What is 2+2?", ["3", "4", "5", "6"], "B", "elementary_mathematics", 0)
    assert MC.format_item(it, "en", True) == "Question: What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\n"
    assert MC.format_item(it, "zh", False).endswith("\nD. 6\n答案：")
    task = MCTask("mmlu", "en", {"elementary_mathematics": [MCItem(f"q{i}", list("abcd"), "A", "elementary_mathematics", i)
                                                             for i in range(8)]})
    pre = MC.few_shot_prefix(task, task.test["elementary_mathematics"][0], 5)
    assert pre.startswith("The following are multiple choice questions (with answers) about elementary mathematics.\n\n")
    # no dev split: exemplars are other questions of the subject, never the question itself
    ex = task.exemplars_for(task.test["elementary_mathematics"][2], 5)
    assert [x.index for x in ex] == [0, 1, 3, 4, 5]
    assert [x.index for x in task.exemplars_for(task.test["elementary_mathematics"][7], 5)] == [0, 1, 2, 3, 4]


def test_stratified_sample_is_fixed_and_per_subject():
    task = _task(random.Random(3), n=30, subjects=("a", "b", "c"))
    s1, s2 = MC.stratified_sample(task, 4), MC.stratified_sample(task, 4)
    assert [(x.subject, x.index) for x in s1] == [(x.subject, x.index) for x in s2]
    assert {s: sum(x.subject == s for x in s1) for s in "abc"} == {"a": 4, "b": 4, "c": 4}
    assert len(MC.stratified_sample(task, 100)) == 90


def test_mmlu_from_registry():
    task = load_mmlu()
    assert len(task.test) == 57
    assert sum(len(v) for v in task.test.values()) == 14042  # 14,044 lines less the two header rows
    assert not task.dev and "no dev split" in task.note
    assert all(x.question != "question" for v in task.test.values() for x in v)
    assert {x.answer for v in task.test.values() for x in v} == set("ABCD")
    assert "high_school_us_history" in task.test and task.subject_name("high_school_us_history") == "high school us history"


def _write_csv(path: Path, header: list[str] | None, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)


def write_cmmlu(root: Path, rng: random.Random, subjects=("agronomy", "anatomy"), n_test=6, n_dev=5) -> None:
    for s in subjects:
        for split, n in (("dev", n_dev), ("test", n_test)):
            rows = [[str(i), _text(rng, True) + "，是什么？", *(_text(rng, True, 2) for _ in range(4)), rng.choice("ABCD")]
                    for i in range(n)]
            _write_csv(root / split / f"{s}.csv", ["", "Question", "A", "B", "C", "D", "Answer"], rows)


def write_ceval(root: Path, rng: random.Random, subjects=("computer_network", "logic"), n_val=6, n_dev=5) -> None:
    for s in subjects:
        for split, n in (("dev", n_dev), ("val", n_val), ("test", 4)):
            rows = [[str(i), _text(rng, True), *(_text(rng, True, 2) for _ in range(4)),
                     "" if split == "test" else rng.choice("ABCD"), "解析" if split == "dev" else ""]
                    for i in range(n)]
            _write_csv(root / split / f"{s}_{split}.csv", ["id", "question", "A", "B", "C", "D", "answer", "explanation"], rows)


def test_cmmlu_and_ceval_loaders(tmp_path):
    rng = random.Random(5)
    write_cmmlu(tmp_path / "cmmlu", rng)
    t = load_cmmlu(tmp_path / "cmmlu")
    assert t.language == "zh" and sorted(t.test) == ["agronomy", "anatomy"]
    assert [len(v) for v in t.test.values()] == [6, 6] and [len(v) for v in t.dev.values()] == [5, 5]
    first = next(csv.reader(open(tmp_path / "cmmlu/test/agronomy.csv", encoding="utf-8")))
    assert first == ["", "Question", "A", "B", "C", "D", "Answer"]
    row = list(csv.reader(open(tmp_path / "cmmlu/test/agronomy.csv", encoding="utf-8")))[1]
    assert t.test["agronomy"][0].question == row[1] and t.test["agronomy"][0].choices == row[2:6]
    assert t.exemplars_for(t.test["agronomy"][0], 5) == t.dev["agronomy"]

    write_ceval(tmp_path / "ceval", rng)
    c = load_ceval(tmp_path / "ceval")  # scores on val: the test split has no answers
    assert sorted(c.test) == ["computer_network", "logic"] and [len(v) for v in c.test.values()] == [6, 6]
    assert [len(v) for v in c.dev.values()] == [5, 5]
    assert MC.HEADERS["ceval"].format(subject="logic") in MC.few_shot_prefix(c, c.test["logic"][0], 5)


def test_loader_errors(tmp_path):
    with pytest.raises(QianwenError, match="--data"):
        load_cmmlu(None)  # type: ignore[arg-type]
    with pytest.raises(QianwenError, match="not found"):
        load_ceval(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(QianwenError, match="no CSV"):
        load_cmmlu(tmp_path / "empty")
    _write_csv(tmp_path / "bad/test/x.csv", ["", "Question", "A", "B", "C", "D", "Answer"], [["0", "q", "a", "b", "c", "d", "E"]])
    with pytest.raises(QianwenError, match="one of A, B, C, D"):
        load_cmmlu(tmp_path / "bad")


def test_runner_cmmlu_end_to_end(tiny_mc, tmp_path):
    from qianwen.eval import report, runner

    write_cmmlu(tmp_path / "cmmlu", random.Random(7))
    for chat in (False, True):
        res = runner.run(tiny_mc, "cmmlu", data=str(tmp_path / "cmmlu"), shots=2, chat=chat, batch_size=4)
        assert res["n"] == 12 and res["metric"] == "accuracy" and res["shots"] == 2
        assert set(res["subjects"]) == {"agronomy", "anatomy"}
        assert res["score"] == pytest.approx(100 * sum(r["pred"] == r["answer"] for r in res["records"]) / 12)
        md = report.markdown(res)
        assert "| agronomy | 6 |" in md and "Qwen-7B 62.2" in md
    report.write_json(tmp_path / "r.json", res)
    saved = json.loads((tmp_path / "r.json").read_text())
    for key in ("task", "model", "n", "shots", "metric", "score", "subjects", "wall_s", "qianwen_version"):
        assert key in saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["attention_lse", "_attention_lse_matmul"])
def test_merged_attention_equals_one_softmax(dtype, impl):
    """A question attending to a kept prefix (all of it) and causally to itself, in two parts merged by
    log-sum-exp, equals one masked softmax over the prefix and the question together (GQA: 6 query heads
    on 2 key heads)."""
    from qianwen.models import cache as C

    attend = getattr(C, impl)
    torch.manual_seed(0)
    p, t = 37, 11
    q = torch.randn(1, 6, t, 16) * 2
    k, v = torch.randn(1, 2, p + t, 16) * 2, torch.randn(1, 2, p + t, 16)
    mask = torch.arange(p + t)[None, :] <= torch.arange(t)[:, None] + p
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    o1, lse1 = attend(q, k[:, :, :p], v[:, :, :p], causal=False)
    o2, lse2 = attend(q, k[:, :, p:], v[:, :, p:], causal=True)
    assert lse1.shape == (1, 6, t) and lse1.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(C.merge_attention(o1, lse1, o2, lse2).float(), ref, atol=tol, rtol=tol)
    scores = (q.float() @ k.float().repeat_interleave(3, 1)[:, :, :p].transpose(-1, -2)) / 4
    torch.testing.assert_close(lse1, torch.logsumexp(scores, -1), atol=1e-4, rtol=1e-4)


def _plain_scores(net, prompts: list, letters: list[int]) -> list[list[float]]:
    with torch.no_grad():
        return [torch.log_softmax(net(torch.tensor([p.prefix + p.suffix]))[0, -1].float(), -1)[letters].tolist()
                for p in prompts]


@pytest.mark.parametrize("batch_size,tokens", [(1, 2048), (3, 2048), (100, 2048), (100, 40), (4, 1)])
def test_packed_scoring_matches_plain_forward(tiny_mc, batch_size, tokens):
    """However prompts are packed into forwards (a prefix in the same forward as its questions or an
    earlier one, several subjects in one forward, a prefix or question longer than the token budget
    alone), each question scores as its whole prompt in a plain forward; a group without a shared prefix
    and a prompt longer than the context (scored alone on its last max_len tokens) are handled too."""
    rng = random.Random(2)
    task = _task(rng, subjects=("alpha", "beta", "gamma"), n=5)
    items = MC.stratified_sample(task, None)
    prompts = MC.build_prompts(task, items, tiny_mc.tokenizer.encode, shots=2)
    prompts += [MC.Prompt([], p.prefix + p.suffix, p.item) for p in prompts[:3]]  # no shared prefix
    letters = MC.letter_token_ids(tiny_mc.tokenizer, "en")
    longest = max(len(p.prefix) + len(p.suffix) for p in prompts)
    ours = MC.score_prompts(tiny_mc.net, prompts, letters, "cpu", batch_size=batch_size, max_len=longest - 1,
                            tokens=tokens)
    long = [i for i, p in enumerate(prompts) if len(p.prefix) + len(p.suffix) == longest]
    cut = [MC.Prompt([], (p.prefix + p.suffix)[1:], p.item) if i in long else p for i, p in enumerate(prompts)]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(_plain_scores(tiny_mc.net, cut, letters)),
                               atol=1e-4, rtol=1e-4)


def test_each_prefix_runs_once_and_nothing_is_padded(tiny_mc, monkeypatch):
    """The forwards see every shared prefix once and every question's own tokens once, nothing more."""
    rng = random.Random(4)
    task = _task(rng, subjects=("alpha", "beta"), n=6)
    items = MC.stratified_sample(task, None)
    prompts = MC.build_prompts(task, items, tiny_mc.tokenizer.encode, shots=2)
    seen = []
    run = tiny_mc.net.hidden_states
    monkeypatch.setattr(tiny_mc.net, "hidden_states", lambda ids, *a, **k: seen.append(ids.numel()) or run(ids, *a, **k))
    MC.score_prompts(tiny_mc.net, prompts, MC.letter_token_ids(tiny_mc.tokenizer, "en"), "cpu", batch_size=4)
    prefixes = {tuple(p.prefix) for p in prompts}
    assert sum(seen) == sum(map(len, prefixes)) + sum(len(p.suffix) for p in prompts)
    assert len(seen) == 3  # 12 questions, 4 a forward


@pytest.mark.parametrize("t", [5, 128, 300])
def test_blocked_causal_attention_equals_causal_attention(t):
    from qianwen.models.cache import blocked_causal_attention, causal_attention

    torch.manual_seed(1)
    q, k, v = torch.randn(1, 6, t, 16), torch.randn(1, 2, t, 16), torch.randn(1, 2, t, 16)
    torch.testing.assert_close(blocked_causal_attention(q, k, v, block=64), causal_attention(q, k, v),
                               atol=1e-5, rtol=1e-5)


def test_engine_scoring_matches_plain_forward_and_reuses_prefixes(tiny_mc):
    """On the CPU kernels the engine scores (score_with_engine): each question's letter log-probs are its
    whole prompt's in a plain forward (a prompt longer than the context cut to its last tokens), the first
    question of each subject runs before the others, which find its prefix in the prefix cache."""
    from qianwen.engine import LLM

    rng = random.Random(5)
    task = _task(rng, subjects=("alpha", "beta", "gamma"), n=5)
    items = MC.stratified_sample(task, None)
    prompts = MC.build_prompts(task, items, tiny_mc.tokenizer.encode, shots=2)
    letters = MC.letter_token_ids(tiny_mc.tokenizer, "en")
    llm = LLM(tiny_mc)
    assert llm.engine.runner.rows, "the C kernels are not built"
    longest = max(len(p.prefix) + len(p.suffix) for p in prompts)
    ours = MC.score_with_engine(llm, prompts, letters, max_len=longest)
    cut = [MC.Prompt([], (p.prefix + p.suffix)[1:], p.item) if len(p.prefix) + len(p.suffix) == longest else p
           for p in prompts]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(_plain_scores(tiny_mc.net, cut, letters)),
                               atol=1e-4, rtol=1e-4)
    b, firsts = llm.engine.cache.prefix.block_size, {}
    for p in prompts:
        firsts.setdefault(tuple(p.prefix), p)
    rest = [p for p in prompts if firsts[tuple(p.prefix)] is not p]
    assert rest and all(len(p.prefix) >= b for p in rest)
    assert llm.engine.prefix_cache_stats()["hit_tokens"] >= sum(len(p.prefix) // b * b for p in rest)
