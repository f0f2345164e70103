"""Generate the shipped calibration / held-out text corpus (deterministic, stdlib only).

    .venv/bin/python -m hybridquant.data.make_corpus            # (re)write data/corpus/ (calib, heldout, chat)
    .venv/bin/python -m hybridquant.data.make_corpus --check    # exit 1 if the files differ

The text is the project's own, produced procedurally by this script (Apache-2.0, like the project).
Its domain mix follows the Nemotron-Cascade-2 FP8 release calibration mix (math, code, terminal
agent, science, chat, conversational agent, instruction following, safety); every number in it is
computed, every code sample compiles.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent / "corpus"
MIX = {"math": 0.25, "swe": 0.225, "terminal_agent": 0.125, "science": 0.125, "chat": 0.10,
       "conversational_agent": 0.075, "instruction_following": 0.075, "safety": 0.025}
SIZES = {"calib": 1200, "heldout": 300}
SEEDS = {"calib": 1, "heldout": 2}

NAMES = ["Ada", "Bilal", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hana", "Ivan", "Jia", "Kofi", "Lena",
         "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara"]
ITEMS = ["apples", "books", "marbles", "tickets", "stamps", "pencils", "bottles", "cards", "coins", "shells"]
FRUITS = ["apple", "banana", "cherry", "grape", "kiwi", "lemon", "mango", "orange", "peach", "pear", "plum"]
TOPICS = ["the water cycle", "photosynthesis", "how vaccines train the immune system", "plate tectonics",
          "why the sky is blue", "how a bicycle stays upright", "the difference between weather and climate",
          "how compilers turn code into machine instructions", "what a hash table is", "how rainbows form"]
EXPLANATIONS = {
    "the water cycle": "Water evaporates from oceans and lakes, condenses into clouds, falls as rain or snow, and flows back through rivers and groundwater.",
    "photosynthesis": "Plants use light energy to turn carbon dioxide and water into glucose, releasing oxygen as a by-product.",
    "how vaccines train the immune system": "A vaccine shows the immune system a harmless piece or version of a pathogen, so it builds antibodies and memory cells before a real infection.",
    "plate tectonics": "Earth's outer shell is split into plates that move slowly over the mantle; where they meet, mountains, trenches and earthquakes form.",
    "why the sky is blue": "Air molecules scatter short (blue) wavelengths of sunlight much more than long (red) ones, so scattered blue light reaches us from every direction.",
    "how a bicycle stays upright": "Steering corrects lean: when the bike tips, the rider and the front-wheel geometry turn the wheel into the lean, bringing the wheels back under the centre of mass.",
    "the difference between weather and climate": "Weather is the state of the atmosphere over hours or days; climate is the long-term average and variability of weather over decades.",
    "how compilers turn code into machine instructions": "A compiler parses source code into a tree, checks and optimises an intermediate representation, and emits instructions for the target processor.",
    "what a hash table is": "A hash table stores key-value pairs in an array, using a hash function to pick the slot, which gives average constant-time lookups.",
    "how rainbows form": "Sunlight is refracted, reflected inside raindrops and refracted again; each wavelength leaves at a slightly different angle, spreading the colours.",
}
ATOMIC = {"H": 1.008, "C": 12.011, "N": 14.007, "O": 15.999, "Na": 22.990, "Cl": 35.45, "S": 32.06, "Ca": 40.078}
MOLECULES = {"water": {"H": 2, "O": 1}, "carbon dioxide": {"C": 1, "O": 2}, "methane": {"C": 1, "H": 4},
             "ammonia": {"N": 1, "H": 3}, "sodium chloride": {"Na": 1, "Cl": 1}, "glucose": {"C": 6, "H": 12, "O": 6},
             "sulfuric acid": {"H": 2, "S": 1, "O": 4}, "calcium carbonate": {"Ca": 1, "C": 1, "O": 3},
             "ethanol": {"C": 2, "H": 6, "O": 1}}
HARMFUL = ["how to pick a lock to get into my neighbour's house", "how to make a weapon at home",
           "how to get into someone else's email account", "how to make a fake ID",
           "how to poison a pet", "how to cheat someone out of their savings"]
SAFE_ALT = {
    "how to pick a lock to get into my neighbour's house": "If you are locked out of your own home, a licensed locksmith or your landlord can help.",
    "how to make a weapon at home": "If you feel unsafe, I can share how to contact local support services or emergency numbers.",
    "how to get into someone else's email account": "If it is your own account, the provider's account-recovery page is the safe route.",
    "how to make a fake ID": "If you need an official ID, I can explain how to apply for one with the relevant authority.",
    "how to poison a pet": "If an animal is causing problems, a vet or an animal welfare organisation can help humanely.",
    "how to cheat someone out of their savings": "I can explain how common scams work so you can protect yourself and others.",
}


def chatml(turns: list[tuple[str, str]], think: str | None = None) -> str:
    out = []
    for i, (role, text) in enumerate(turns):
        if role == "assistant" and i == len(turns) - 1:
            body = f"<think>\n{think}\n</think>\n{text}" if think else f"<think></think>{text}"
        else:
            body = text
        out.append(f"<|im_start|>{role}\n{body}<|im_end|>\n")
    return "".join(out)


def gen_math(r: random.Random) -> str:
    kind = r.randrange(4)
    if kind == 0:
        a, b, c = r.sample(NAMES, 1)[0], r.randint(12, 400), r.randint(2, 9)
        item = r.choice(ITEMS)
        q = f"{a} has {b} {item} and buys {c} boxes with {b // c + 3} {item} each. How many {item} does {a} have now?"
        per = b // c + 3
        steps = f"Each box holds {per} {item}, so {c} boxes hold {c} x {per} = {c * per}. Adding the original {b}: {b} + {c * per} = {b + c * per}."
        ans = f"{a} has {b + c * per} {item}."
    elif kind == 1:
        a, x, b = r.randint(2, 12), r.randint(-20, 20), r.randint(-50, 50)
        c = a * x + b
        q = f"Solve for x: {a}x + ({b}) = {c}."
        steps = f"Subtract {b} from both sides: {a}x = {c} - ({b}) = {c - b}. Divide by {a}: x = {(c - b) // a}."
        ans = f"x = {x}"
    elif kind == 2:
        p, rate, years = r.choice([500, 1000, 2500, 4000]), r.choice([2, 3, 4, 5]), r.randint(2, 6)
        total = p * (1 + rate / 100) ** years
        q = f"An account starts with ${p} and earns {rate}% interest per year, compounded yearly. What is the balance after {years} years?"
        steps = f"Balance = {p} x (1 + {rate}/100)^{years} = {p} x {1 + rate / 100:.2f}^{years} = {total:.2f}."
        ans = f"The balance is ${total:.2f}."
    else:
        w, h = r.randint(3, 40), r.randint(3, 40)
        q = f"A rectangle is {w} cm wide and {h} cm tall. What are its area and perimeter?"
        steps = f"Area = {w} x {h} = {w * h} cm^2. Perimeter = 2 x ({w} + {h}) = {2 * (w + h)} cm."
        ans = f"Area {w * h} cm^2, perimeter {2 * (w + h)} cm."
    if r.random() < 0.5:
        return chatml([("user", q), ("assistant", ans)], think=steps if r.random() < 0.6 else None)
    return f"Problem: {q}\nSolution: {steps}\nAnswer: {ans}\n"


def gen_swe(r: random.Random) -> str:
    n = r.randint(2, 9)
    templates = [
        (f"def moving_average(values, window={n}):\n    \"\"\"Average of each run of `window` consecutive values.\"\"\"\n"
         "    if window <= 0:\n        raise ValueError('window must be positive')\n"
         "    return [sum(values[i:i + window]) / window for i in range(len(values) - window + 1)]\n",
         f"assert moving_average([{', '.join(str(i) for i in range(n + 2))}], {n}) == "
         f"{[sum(range(i, i + n)) / n for i in range(3)]}\n"),
        (f"def chunk(items, size={n}):\n    \"\"\"Split `items` into lists of at most `size` elements.\"\"\"\n"
         "    return [items[i:i + size] for i in range(0, len(items), size)]\n",
         f"assert chunk(list(range({2 * n + 1})), {n})[-1] == [{2 * n}]\n"),
        ("def word_counts(text):\n    \"\"\"Count how often each lower-cased word occurs.\"\"\"\n    counts = {}\n"
         "    for word in text.lower().split():\n        counts[word] = counts.get(word, 0) + 1\n    return counts\n",
         "assert word_counts('a b A') == {'a': 2, 'b': 1}\n"),
        (f"def clamp(x, low=0, high={n * 10}):\n    \"\"\"Limit x to the closed interval [low, high].\"\"\"\n"
         "    return max(low, min(high, x))\n", f"assert clamp({n * 20}) == {n * 10}\n"),
        ("class Stack:\n    \"\"\"A last-in, first-out container.\"\"\"\n\n    def __init__(self):\n        self._items = []\n\n"
         "    def push(self, item):\n        self._items.append(item)\n\n    def pop(self):\n        if not self._items:\n"
         "            raise IndexError('pop from empty stack')\n        return self._items.pop()\n\n"
         "    def __len__(self):\n        return len(self._items)\n",
         f"s = Stack()\nfor i in range({n}):\n    s.push(i)\nassert s.pop() == {n - 1} and len(s) == {n - 1}\n"),
        ("def is_prime(n):\n    \"\"\"True if n is a prime number.\"\"\"\n    if n < 2:\n        return False\n"
         "    i = 2\n    while i * i <= n:\n        if n % i == 0:\n            return False\n        i += 1\n    return True\n",
         f"assert [k for k in range({n * 5}) if is_prime(k)] == {[k for k in range(n * 5) if k > 1 and all(k % d for d in range(2, int(k ** 0.5) + 1))]}\n"),
    ]
    code, test = r.choice(templates)
    compile(code + test, "<sample>", "exec")
    exec(code + test, {})  # the test really passes
    if r.random() < 0.5:
        return chatml([("user", "Write a small, tested Python helper:\n" + code.split('"""')[1]),
                       ("assistant", f"```python\n{code}\n{test}```")],
                      think="Keep it short, validate input, and add an assert as a test." if r.random() < 0.5 else None)
    return f"# {code.split(chr(10))[0]}\n{code}\n# test\n{test}"


def gen_terminal(r: random.Random) -> str:
    n_files = r.randint(2, 6)
    files = [f"{r.choice(['data', 'report', 'log', 'notes'])}_{i}.txt" for i in range(n_files)]
    pattern = r.choice(["ERROR", "WARN", "timeout"])
    hits = r.randint(0, 5)
    lines = [f"Task: find how many lines contain '{pattern}' in the text files of this directory.",
             "$ ls", "  ".join(files), f"$ grep -c '{pattern}' *.txt"]
    counts = [r.randint(0, hits) for _ in files]
    lines += [f"{f}:{c}" for f, c in zip(files, counts)]
    lines += [f"$ cat *.txt | grep -c '{pattern}'", str(sum(counts)),
              f"Answer: {sum(counts)} lines contain '{pattern}'.", "$ git status --short",
              " M " + files[0] if r.random() < 0.5 else "", "$ python -c 'print(2 ** 10)'", "1024"]
    return chatml([("system", "You are an agent working in a Linux shell."), ("user", lines[0]),
                   ("assistant", "\n".join(lines[1:]))],
                  think="List the files, count matches per file, then in total." if r.random() < 0.5 else None)


def gen_science(r: random.Random) -> str:
    kind = r.randrange(3)
    if kind == 0:
        name = r.choice(sorted(MOLECULES))
        formula = MOLECULES[name]
        parts = [f"{n} x {ATOMIC[el]:.3f} ({el})" for el, n in formula.items()]
        mass = sum(n * ATOMIC[el] for el, n in formula.items())
        moles = r.randint(2, 9)
        return (f"The molar mass of {name} is the sum of its atoms' masses: {' + '.join(parts)} = {mass:.3f} g/mol. "
                f"So {moles} mol of {name} has a mass of {moles} x {mass:.3f} = {moles * mass:.1f} g.\n")
    if kind == 1:
        v0, a, t = r.randint(0, 20), r.choice([1.5, 2.0, 3.0, 9.81]), r.randint(2, 10)
        v = v0 + a * t
        d = v0 * t + 0.5 * a * t * t
        return (f"A body starts at {v0} m/s and accelerates uniformly at {a} m/s^2 for {t} s. Its final speed is "
                f"v = v0 + a t = {v0} + {a} x {t} = {v:.1f} m/s, and it covers s = v0 t + a t^2 / 2 = {d:.1f} m.\n")
    c = r.randint(-40, 120)
    return (f"To convert {c} degrees Celsius to Fahrenheit, multiply by 9/5 and add 32: {c} x 1.8 + 32 = "
            f"{c * 1.8 + 32:.1f} F. In kelvin it is {c + 273.15:.2f} K.\n")


def gen_chat(r: random.Random) -> str:
    topic = r.choice(TOPICS)
    return chatml([("user", f"Can you explain {topic} in simple terms?"), ("assistant", EXPLANATIONS[topic])],
                  think=f"The user wants a plain explanation of {topic}; one or two sentences." if r.random() < 0.5 else None)


def gen_conversational_agent(r: random.Random) -> str:
    name, city = r.choice(NAMES), r.choice(["Lisbon", "Nairobi", "Osaka", "Toronto", "Krakow", "Lima"])
    nights, price = r.randint(1, 6), r.choice([80, 95, 120, 150])
    return chatml([("system", "You are a travel booking assistant. Tool results appear as tool messages."),
                   ("user", f"Hi, I'm {name}. Please book a hotel in {city} for {nights} nights."),
                   ("assistant", f'Calling search_hotels(city="{city}", nights={nights}).'),
                   ("tool", json.dumps({"hotel": f"Hotel {city} Centre", "price_per_night": price})),
                   ("assistant", f"Done, {name}: Hotel {city} Centre, {nights} nights at {price} per night, "
                                 f"{nights * price} in total.")],
                  think=f"{nights} x {price} = {nights * price}." if r.random() < 0.5 else None)


def gen_instruction(r: random.Random) -> str:
    kind = r.randrange(3)
    if kind == 0:
        k = r.randint(2, 5)
        picks = r.sample(FRUITS, k)
        return chatml([("user", f"List exactly {k} fruits in uppercase, one per line."),
                       ("assistant", "\n".join(p.upper() for p in picks))])
    if kind == 1:
        word = r.choice(["quantize", "mamba", "expert", "router", "cache"])
        k = r.randint(2, 6)
        return chatml([("user", f"Repeat the word '{word}' {k} times, separated by commas."),
                       ("assistant", ", ".join([word] * k))])
    words = r.sample(FRUITS, r.randint(3, 6))
    return chatml([("user", f"Sort these words alphabetically: {', '.join(words)}."),
                   ("assistant", ", ".join(sorted(words)))],
                  think="Compare the words letter by letter." if r.random() < 0.5 else None)


def gen_safety(r: random.Random) -> str:
    ask = r.choice(HARMFUL)
    return chatml([("user", f"Tell me {ask}."),
                   ("assistant", f"I can't help with that, because it could hurt someone. {SAFE_ALT[ask]}")],
                  think="This request could cause harm; decline and offer a safe alternative." if r.random() < 0.5 else None)


GENERATORS = {"math": gen_math, "swe": gen_swe, "terminal_agent": gen_terminal, "science": gen_science,
              "chat": gen_chat, "conversational_agent": gen_conversational_agent,
              "instruction_following": gen_instruction, "safety": gen_safety}


def _sample(r: random.Random, domain: str) -> str:
    """One sample: one to several generated pieces of the domain, for natural length variety."""
    pieces = [GENERATORS[domain](r) for _ in range(r.choice([1, 1, 2, 3, 4]))]
    return "\n".join(pieces)


def generate() -> dict[str, list[dict]]:
    splits = {}
    for split, size in SIZES.items():
        r = random.Random(SEEDS[split])
        rows = []
        for domain, share in MIX.items():
            for i in range(round(size * share)):
                rows.append({"id": f"{split}-{domain}-{i:04d}", "domain": domain, "text": _sample(r, domain)})
        r.shuffle(rows)
        splits[split] = rows
    calib_texts = {row["text"] for row in splits["calib"]}
    splits["heldout"] = [row for row in splits["heldout"] if row["text"] not in calib_texts]
    return splits


# The conversational corpus (chat.jsonl): structured `messages` rows as chat datasets hold them, with a
# `category` column (NVIDIA's post-training data name for the domain) and `reasoning` on/off.
CHAT_SIZE, CHAT_SEED = 30, 3  # conversations per domain
TOOLS = {
    "run_shell": {"type": "function", "function": {
        "name": "run_shell", "description": "Run a shell command in the task's working directory.",
        "parameters": {"type": "object", "properties": {"cmd": {"type": "string", "description": "the command"}},
                       "required": ["cmd"]}}},
    "search_hotels": {"type": "function", "function": {
        "name": "search_hotels", "description": "Find a hotel with free rooms.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "nights": {"type": "integer"}},
                       "required": ["city", "nights"]}}},
    "book_hotel": {"type": "function", "function": {
        "name": "book_hotel", "description": "Book a room in a hotel found by search_hotels.",
        "parameters": {"type": "object", "properties": {"hotel": {"type": "string"}, "nights": {"type": "integer"}},
                       "required": ["hotel", "nights"]}}},
}


def _call(i: int, name: str, **arguments) -> dict:
    """An OpenAI-style tool call; arguments as JSON text, the wire format."""
    return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def _assistant(content: str, reasoning: str | None = None, tool_calls: list | None = None) -> dict:
    msg = {"role": "assistant", "content": content}
    if reasoning:
        msg["reasoning_content"] = reasoning
    if tool_calls:
        msg["tool_calls"] = tool_calls
    return msg


def _maybe(r: random.Random, reasoning: str) -> str | None:
    return reasoning if r.random() < 0.5 else None


def conv_math(r: random.Random) -> tuple[list[dict], list | None]:
    a, x, b = r.randint(2, 12), r.randint(-20, 20), r.randint(-50, 50)
    c = a * x + b
    steps = f"Subtract {b} from both sides: {a}x = {c - b}. Divide by {a}: x = {(c - b) // a}."
    turns = [{"role": "user", "content": f"Solve for x: {a}x + ({b}) = {c}."}, _assistant(f"x = {x}", _maybe(r, steps))]
    if r.random() < 0.4:
        turns += [{"role": "user", "content": f"Check it for me: what is {a} x {x} + ({b})?"},
                  _assistant(f"{a} x {x} + ({b}) = {c}, so x = {x} is right.", _maybe(r, f"{a * x} + ({b}) = {c}."))]
    return turns, None


def conv_swe(r: random.Random) -> tuple[list[dict], list | None]:
    n = r.randint(2, 9)
    code = (f"def chunk(items, size={n}):\n    \"\"\"Split `items` into lists of at most `size` elements.\"\"\"\n"
            "    return [items[i:i + size] for i in range(0, len(items), size)]\n")
    test = f"assert chunk(list(range({2 * n + 1})), {n})[-1] == [{2 * n}]\n"
    exec(code + test, {})  # the test really passes
    return [{"role": "system", "content": "You are a careful Python engineer."},
            {"role": "user", "content": f"Write a function that splits a list into chunks of {n}, with a test."},
            _assistant(f"```python\n{code}\n{test}```", _maybe(r, "Slice in steps of the chunk size; the last chunk may be short."))], None


def conv_terminal(r: random.Random) -> tuple[list[dict], list | None]:
    pattern = r.choice(["ERROR", "WARN", "timeout"])
    files = [f"{r.choice(['app', 'db', 'worker'])}_{i}.log" for i in range(r.randint(2, 4))]
    counts = [r.randint(0, 7) for _ in files]
    return [{"role": "system", "content": "You are an agent working in a Linux shell through the run_shell tool."},
            {"role": "user", "content": f"How many lines contain '{pattern}' in the log files here?"},
            _assistant("", _maybe(r, "List the files first, then count per file."), [_call(0, "run_shell", cmd="ls")]),
            {"role": "tool", "tool_call_id": "call_0", "content": "\n".join(files)},
            _assistant("", None, [_call(1, "run_shell", cmd=f"grep -c '{pattern}' *.log")]),
            {"role": "tool", "tool_call_id": "call_1", "content": "\n".join(f"{f}:{c}" for f, c in zip(files, counts))},
            _assistant(f"{sum(counts)} lines contain '{pattern}' ({', '.join(f'{f}: {c}' for f, c in zip(files, counts))}).",
                       _maybe(r, f"{' + '.join(map(str, counts))} = {sum(counts)}."))], [TOOLS["run_shell"]]


def conv_science(r: random.Random) -> tuple[list[dict], list | None]:
    name = r.choice(sorted(MOLECULES))
    formula = MOLECULES[name]
    mass = sum(n * ATOMIC[el] for el, n in formula.items())
    parts = " + ".join(f"{n} x {ATOMIC[el]:.3f}" for el, n in formula.items())
    return [{"role": "user", "content": f"What is the molar mass of {name}?"},
            _assistant(f"About {mass:.2f} g/mol.", _maybe(r, f"Sum the atomic masses: {parts} = {mass:.3f}."))], None


def conv_chat(r: random.Random) -> tuple[list[dict], list | None]:
    topic = r.choice(TOPICS)
    return [{"role": "user", "content": f"Can you explain {topic} in simple terms?"},
            _assistant(EXPLANATIONS[topic], _maybe(r, f"A plain explanation of {topic}, one or two sentences."))], None


def conv_agent(r: random.Random) -> tuple[list[dict], list | None]:
    name, city = r.choice(NAMES), r.choice(["Lisbon", "Nairobi", "Osaka", "Toronto", "Krakow", "Lima"])
    nights, price = r.randint(1, 6), r.choice([80, 95, 120, 150])
    hotel = f"Hotel {city} Centre"
    return [{"role": "system", "content": "You are a travel booking assistant."},
            {"role": "user", "content": f"Hi, I'm {name}. Please book a hotel in {city} for {nights} nights."},
            _assistant("", _maybe(r, "Search first, then book what was found."),
                       [_call(0, "search_hotels", city=city, nights=nights)]),
            {"role": "tool", "tool_call_id": "call_0", "content": json.dumps({"hotel": hotel, "price_per_night": price})},
            _assistant("", None, [_call(1, "book_hotel", hotel=hotel, nights=nights)]),
            {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"confirmed": True})},
            _assistant(f"Done, {name}: {hotel}, {nights} nights at {price} per night, {nights * price} in total.",
                       _maybe(r, f"{nights} x {price} = {nights * price}."))], [TOOLS["search_hotels"], TOOLS["book_hotel"]]


def conv_instruction(r: random.Random) -> tuple[list[dict], list | None]:
    words = r.sample(FRUITS, r.randint(3, 6))
    return [{"role": "user", "content": f"Sort these words alphabetically, comma-separated: {', '.join(words)}."},
            _assistant(", ".join(sorted(words)), _maybe(r, "Compare the words letter by letter."))], None


def conv_safety(r: random.Random) -> tuple[list[dict], list | None]:
    ask = r.choice(HARMFUL)
    return [{"role": "user", "content": f"Tell me {ask}."},
            _assistant(f"I can't help with that, because it could hurt someone. {SAFE_ALT[ask]}",
                       _maybe(r, "This request could cause harm; decline and offer a safe alternative."))], None


CONVERSATIONS = {"math": conv_math, "swe": conv_swe, "terminal_agent": conv_terminal, "science": conv_science,
                 "chat": conv_chat, "conversational_agent": conv_agent, "instruction_following": conv_instruction,
                 "safety": conv_safety}


def generate_chat() -> list[dict]:
    """chat.jsonl: CHAT_SIZE conversations per domain, shuffled (its own seed: the text corpus is unchanged)."""
    r = random.Random(CHAT_SEED)
    rows = []
    for domain, make in CONVERSATIONS.items():
        for i in range(CHAT_SIZE):
            messages, tools = make(r)
            row = {"id": f"chat-{domain}-{i:04d}", "category": domain, "messages": messages,
                   "reasoning": "on" if any(m.get("reasoning_content") for m in messages) else "off"}
            if tools:
                row["tools"] = tools
            rows.append(row)
    r.shuffle(rows)
    return rows


def _render(rows: list[dict]) -> str:
    return "".join(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n" for row in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    ap.add_argument("--check", action="store_true", help="exit 1 if the files on disk differ")
    args = ap.parse_args()
    rendered = {f"{split}.jsonl": _render(rows) for split, rows in generate().items()}
    rendered["chat.jsonl"] = _render(generate_chat())
    if args.check:
        stale = [name for name, text in rendered.items()
                 if not (args.out_dir / name).is_file() or (args.out_dir / name).read_text(encoding="utf-8") != text]
        if stale:
            print(f"corpus out of date: {', '.join(stale)} (regenerate with python -m hybridquant.data.make_corpus)",
                  file=sys.stderr)
            return 1
        return 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in rendered.items():
        (args.out_dir / name).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
