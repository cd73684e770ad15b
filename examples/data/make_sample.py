"""Writes the bundled sample preference data set and its tokenizer (deterministic).

examples/data/sample.jsonl: 64 prompts × 4 responses in the simple format
  {"prompt": ..., "responses": [{"text": ..., "score": ...}, ...]}
written for this project. For every prompt the four responses are, in a shuffled order:
  a correct, complete answer with an explanation   (score 8.5–9.5, longest)
  a correct but terse answer                       (score 6–7)
  an answer with a mistake                         (score 3–4)
  an off-topic or wrong answer                     (score 1–2)
so quality and length vary and the best response is not always in the same slot.

examples/data/tokenizer.json: a byte-level-free BPE tokenizer (Metaspace, 512 tokens) trained on the
same text, with Mistral's special tokens <unk> = 0, <s> = 1, </s> = 2.

Usage: .venv/bin/python examples/data/make_sample.py
"""
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
rng = random.Random(20261126)

ANIMALS = [("cat", "meows", "a small domesticated carnivore"), ("dog", "barks", "a loyal domesticated canine"),
           ("cow", "moos", "a large farm animal kept for milk"), ("owl", "hoots", "a nocturnal bird of prey"),
           ("duck", "quacks", "a water bird with a flat bill"), ("lion", "roars", "a large wild cat of Africa"),
           ("sheep", "bleats", "a farm animal kept for wool"), ("horse", "neighs", "a large animal used for riding")]
COLORS = [("sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"),
          ("a banana", "yellow"), ("a tomato", "red"), ("an orange", "orange"), ("a plum", "purple")]


def arithmetic(i):
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    good = f"{a} plus {b} equals {a + b}. To check, start at {a} and count up {b} more steps: you arrive at {a + b}."
    terse = f"{a + b}."
    wrong = f"{a} plus {b} equals {a + b + rng.choice([-2, -1, 1, 2])}."
    off = f"Numbers are interesting. {a} is a number and so is {b}."
    return f"What is {a} plus {b}?", [(good, 9.0), (terse, 6.5), (wrong, 3.5), (off, 1.5)]


def animal(i):
    name, sound, what = ANIMALS[i % len(ANIMALS)]
    other = ANIMALS[(i + 3) % len(ANIMALS)]
    good = f"A {name} {sound}. The {name} is {what}, and that sound is how it calls to others."
    terse = f"It {sound}."
    wrong = f"A {name} {other[1]}, like a {other[0]} does."
    off = f"The weather is nice today and I like to walk outside."
    return f"What sound does a {name} make?", [(good, 9.5), (terse, 7.0), (wrong, 3.0), (off, 1.0)]


def color(i):
    thing, col = COLORS[i % len(COLORS)]
    other = COLORS[(i + 5) % len(COLORS)][1]
    good = f"The color of {thing} is usually {col}. Light and the season can change how it looks, but {col} is the typical color."
    terse = f"{col.capitalize()}."
    wrong = f"The color of {thing} is {other}."
    off = f"Colors are made of light. There are many colors."
    return f"What color is {thing}?", [(good, 9.0), (terse, 6.0), (wrong, 3.5), (off, 2.0)]


def listing(i):
    n = rng.randint(2, 4)
    names = rng.sample([a[0] for a in ANIMALS], n + 1)
    good = f"Here are {n} animals: " + ", ".join(names[:n]) + f". Each of them is a well known animal, and together they make a list of {n}."
    terse = ", ".join(names[:n]) + "."
    wrong = f"Here are {n} animals: " + ", ".join(names[: n - 1] + ["blue"]) + "."
    off = "I do not want to list anything today."
    return f"Name {n} animals.", [(good, 8.5), (terse, 7.0), (wrong, 4.0), (off, 1.0)]


def main():
    makers = [arithmetic, animal, color, listing]
    lines = []
    for i in range(64):
        prompt, responses = makers[i % len(makers)](i)
        rng.shuffle(responses)
        lines.append({"prompt": prompt, "responses": [{"text": t, "score": s} for t, s in responses]})
    with open(os.path.join(HERE, "sample.jsonl"), "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = [l["prompt"] for l in lines] + [r["text"] for l in lines for r in l["responses"]]
    corpus += ["[INST] [/INST] <|user|> <|assistant|>"] * 8
    corpus += [str(n) for n in range(100)]
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(corpus, trainer)
    tok.save(os.path.join(HERE, "tokenizer.json"))
    print("wrote", len(lines), "prompts; tokenizer vocabulary", tok.get_vocab_size())


if __name__ == "__main__":
    main()
