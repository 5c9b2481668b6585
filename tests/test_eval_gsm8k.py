"""GSM8K: the answer extractor against all 1,319 reference solutions; the 8-shot prompt."""

from __future__ import annotations

import re
from decimal import Decimal

from qianwen.eval import gsm8k as G
from qianwen.eval.data import load_gsm8k


def _reference_number(answer: str) -> Decimal:
    # independent of the module's regexes: the text after the last '####', commas removed
    return Decimal(answer.rsplit("####", 1)[1].strip().replace(",", ""))


def test_extractor_recovers_every_reference_answer():
    rows = load_gsm8k()
    assert len(rows) == 1319
    for r in rows:
        gold = _reference_number(r["answer"])
        assert G.extract_reference(r["answer"]) == gold, r["answer"]
        # the prediction extractor on the reference solution itself (last number is the answer) ...
        assert G.extract_prediction(r["answer"]) == gold, r["answer"]
        # ... and on it rewritten in the exemplars' style, calculator annotations removed
        cot = re.sub(r"<<[^>]*>>", "", r["answer"].rsplit("####", 1)[0]).strip().replace("\n", " ")
        styled = f"{cot} The answer is {r['answer'].rsplit('####', 1)[1].strip()}."
        assert G.extract_prediction(styled) == gold, styled
        assert G.is_correct(" " + styled + "\n\nQ: next question", r["answer"])


def test_extraction_cases():
    assert G.extract_prediction("5 + 4 = 9. The answer is 9.") == Decimal(9)
    assert G.extract_prediction("The answer is $1,200.") == Decimal(1200)
    assert G.extract_prediction("So she has -3.5 left") == Decimal("-3.5")
    assert G.extract_prediction("The answer is 7. Later 12 more") == Decimal(7)  # the stated answer wins
    assert G.extract_prediction("no numbers here") is None
    assert G.is_correct("The answer is 18.00", "... #### 18")
    assert not G.is_correct("The answer is 17", "... #### 18")
    assert not G.is_correct("", "... #### 18")


def test_prompt_has_eight_exemplars():
    p = G.build_prompt("How many apples?")
    assert p.count("Q: ") == 9 and p.count("The answer is") == 8
    assert p.startswith("Q: There are 15 trees in the grove.") and p.endswith("Q: How many apples?\nA:")
    assert G.build_prompt("x", shots=0) == "Q: x\nA:"
    assert G.truncate_completion(" 3 + 2 = 5. The answer is 5.\n\nQ: If there") == " 3 + 2 = 5. The answer is 5."
