"""What attend's arithmetic costs on the real model: the default model's logits with a bf16 cache, from two
checkouts' kernels (each process builds the kernels.c of the qianwen it imports), compared.

    PYTHONPATH=OLD python benchmarks/attend_accuracy.py dump old.pt [--kv float32]
    PYTHONPATH=NEW python benchmarks/attend_accuracy.py dump new.pt
    python benchmarks/attend_accuracy.py compare old.pt new.pt

Four prompts (English prose, Chinese prose, C code, a ChatML chat; 200-600 tokens) go through the C decode
step as rows of one sequence, 64 a call (as the engine prefills a chat turn), then 32 greedy tokens one at a
time. `compare` prints, per prompt, max |dlogit| and KL(first || second) at the prompt's last position,
the mean KL over all its positions, and how many of the 32 greedy tokens agree (before the first
difference).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

EN = ("Tea came to Europe in the seventeenth century, first as a costly medicine sold by apothecaries and "
      "then as a fashionable drink of the court. Dutch traders carried it from Java, the English East India "
      "Company soon followed, and by the middle of the eighteenth century it had become the everyday drink "
      "of ordinary households. Its rise changed more than breakfast: the trade paid for fleets, shaped "
      "colonial policy, and led to the opium wars when Britain sought silver to pay Chinese merchants. "
      "Growers in India and Ceylon later broke China's monopoly, planting vast estates in Assam and the hill "
      "country, where new machines rolled and dried the leaves on an industrial scale. Today tea is the most "
      "widely consumed drink after water. Green, black, oolong and white teas all come from the same plant, "
      "Camellia sinensis; what differs is how long the leaves are left to oxidise and how they are heated, "
      "rolled and dried. A good cup depends on water temperature as much as on the leaf: boiling water "
      "suits black tea, while green tea turns bitter unless the water has cooled for a few minutes. ") * 2
ZH = ("中国是茶的故乡，饮茶的历史已有几千年。相传神农尝百草，日遇七十二毒，得茶而解之。唐代陆羽写成《茶经》，"
      "系统地总结了茶的种植、采摘、制作和饮用方法，被后人尊为茶圣。宋代流行点茶和斗茶，文人雅士以茶会友，"
      "茶成为诗词书画中常见的题材。明代以后，散茶逐渐取代团茶，泡茶的方法也与今天相近。杭州的龙井茶以色绿、"
      "香郁、味甘、形美而闻名，福建的武夷岩茶和安溪铁观音各有特色，云南的普洱茶越陈越香。茶叶经由丝绸之路和"
      "海上贸易传到世界各地，改变了许多国家的生活习惯。今天，中国仍是世界上最大的产茶国，茶文化也在不断发展，"
      "年轻人开始喜欢新式茶饮，把传统与现代结合在一起。")
CHAT = [{"role": "system", "content": "You are a helpful assistant who answers in the user's language."},
        {"role": "user", "content": "What will the weather be like in Hangzhou tomorrow? Should I bring an umbrella?"},
        {"role": "assistant", "content": "Tomorrow looks cloudy with light rain in the afternoon, so an umbrella is "
                                         "a good idea. Temperatures will stay between 18 and 24 degrees."},
        {"role": "user", "content": "明天北京天气怎么样？我要去故宫和颐和园，需要穿什么衣服？"},
        {"role": "assistant", "content": "北京明天多云转小雨，气温十五到二十二度，早晚比较凉。建议穿长袖衬衫，"
                                         "带一件薄外套和一把伞。故宫和颐和园都要走很多路，最好穿舒适的鞋子。"},
        {"role": "user", "content": "Thanks! Can you suggest a one-day plan that covers both places, with lunch "
                                    "somewhere nearby, and tell me how to get from one to the other?"}]


def prompts(model) -> list[tuple[str, list[int]]]:
    code = (ROOT / "qianwen" / "native" / "kernels.c").read_text().split("/* ---- decode attention")[0][-1400:]
    return [("en", model.tokenizer.encode(EN)), ("zh", model.tokenizer.encode(ZH)),
            ("code", model.tokenizer.encode(code)), ("chat", model.encode_chat(CHAT, add_generation_prompt=True))]


def dump(out: Path, kv: str) -> None:
    import qianwen
    from qianwen.engine.cache_manager import BatchCache, CacheManager

    torch.set_num_threads(2)
    model = qianwen.load(None)
    net, c = model.net, model.config
    assert net.fast_decode is not None
    cm = CacheManager(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, getattr(torch, kv),
                      torch.device("cpu"), 4096)
    res = {}
    with torch.inference_mode():
        for name, ids in prompts(model):
            kvb, logits, s = cm.allocate(len(ids) + 40), [], 0
            while s < len(ids):
                n = min(64, len(ids) - s)
                cache = BatchCache([kvb] * n, list(range(s, s + n)))
                logits.append(net.fast_decode(torch.tensor(ids[s:s + n])[:, None],
                                              torch.arange(s, s + n)[:, None], cache).reshape(n, -1).float())
                s += n
            greedy = [int(logits[-1][-1].argmax())]
            for _ in range(31):
                cache = BatchCache([kvb], [s])
                y = net.fast_decode(torch.tensor([[greedy[-1]]]), torch.tensor([[s]]), cache).reshape(-1)
                greedy.append(int(y.argmax()))
                s += 1
            res[name] = {"logits": torch.cat(logits), "greedy": greedy}
            print(name, len(ids), "tokens", flush=True)
    torch.save(res, out)


def compare(a: Path, b: Path) -> None:
    x, y = torch.load(a), torch.load(b)
    print(f"{'prompt':6} {'tokens':>6} {'max|dlogit| last':>17} {'KL last':>9} {'mean KL':>9} {'greedy agree':>13}")
    for name in x:
        la, lb = x[name]["logits"].double(), y[name]["logits"].double()
        pa, pb = la.log_softmax(-1), lb.log_softmax(-1)
        kl = (pa.exp() * (pa - pb)).sum(-1)
        ga, gb = x[name]["greedy"], y[name]["greedy"]
        same = next((i for i, (u, v) in enumerate(zip(ga, gb, strict=True)) if u != v), len(ga))
        print(f"{name:6} {len(la):6d} {(la[-1] - lb[-1]).abs().max().item():17.2e} {kl[-1].item():9.2e} "
              f"{kl.mean().item():9.2e} {same:>10d}/32")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("out", type=Path)
    d.add_argument("--kv", default="bfloat16", choices=["bfloat16", "float32", "int8"])
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    a = ap.parse_args()
    dump(a.out, a.kv) if a.cmd == "dump" else compare(a.a, a.b)


if __name__ == "__main__":
    sys.exit(main())
