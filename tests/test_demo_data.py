import json
import random
import shutil
from pathlib import Path

import pytest

from dataset import make_demo_data as gen

DEMO = Path(gen.__file__).resolve().parent / "demo"
CONVERSATION_FILES = ("sft", "lora_identity", "lora_medical", "eval_general", "eval_identity", "eval_medical",
                      "outside_general", "outside_identity", "outside_medical")


def load(name, root=DEMO):
    with open(root / f"{name}.jsonl", encoding="utf-8", newline="") as f:
        raw = f.read()
    assert raw.endswith("\n") and "\r" not in raw, name
    return [json.loads(line) for line in raw.split("\n")[:-1]]


def users(rows):
    return {m["content"] for r in rows for m in r["conversations"] if m["role"] == "user"}


def all_rows(rows):
    """Each row's text, or its messages joined: one string per row."""
    return [r["text"] if "text" in r else "\n".join(m["content"] for m in r["conversations"]) for r in rows]


def all_text(rows):
    return "\n".join(all_rows(rows))


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    gen.main(["--out_dir", str(out)])
    return out


def test_regeneration_is_byte_identical(regenerated):
    written = sorted(p.name for p in regenerated.glob("*.jsonl"))
    assert written == sorted(f"{n}.jsonl" for n in gen.FILES)  # the outside_* files are never generated
    for name in written:
        same = (regenerated / name).read_bytes() == (DEMO / name).read_bytes()
        assert same, f"{name} differs from a fresh run: rerun python dataset/make_demo_data.py"


def test_seed_changes_the_data(tmp_path):
    gen.main(["--out_dir", str(tmp_path), "--seed", "7", "--scale", "0.1"])
    assert (tmp_path / "sft.jsonl").read_bytes() != (DEMO / "sft.jsonl").read_bytes()
    assert len(load("pretrain", tmp_path)) == 600


@pytest.mark.parametrize("name", ["pretrain", "eval_pretrain"])
def test_text_rows(name):
    rows = load(name)
    assert rows
    for r in rows:
        assert set(r) == {"text"} and isinstance(r["text"], str) and 50 <= len(r["text"]) <= 400


def test_pretrain_is_bilingual_and_varied():
    texts = [r["text"] for r in load("pretrain")]
    zh = sum(any("\u4e00" <= ch <= "\u9fff" for ch in t) for t in texts) / len(texts)
    assert 0.4 < zh < 0.6
    lengths = sorted(len(t) for t in texts)
    assert lengths[len(lengths) // 10] < 100 and lengths[-len(lengths) // 10] > 300  # lengths spread out
    assert len(set(texts)) == len(texts)


@pytest.mark.parametrize("name", CONVERSATION_FILES)
def test_conversation_rows(name):
    rows = load(name)
    assert rows
    for r in rows:
        evals = name.startswith(("eval_", "outside_"))
        keys = {"conversations", "expect", "mention"} if name == "eval_medical" else {"conversations", "expect"}
        assert set(r) == (keys if evals else {"conversations"}), r
        msgs = r["conversations"]
        roles = [m["role"] for m in msgs]
        if roles[0] == "system":
            roles = roles[1:]
        assert roles and roles == ["user", "assistant"] * (len(roles) // 2), r
        assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) and m["content"].strip()
                   for m in msgs), r
        if evals:
            assert len(roles) == 2 and isinstance(r["expect"], list) and r["expect"]
            assert any(e.lower() in msgs[-1]["content"].lower() for e in r["expect"]), r


def test_sft_has_multi_turn_and_system_samples():
    rows = load("sft")
    multi = sum(sum(m["role"] == "user" for m in r["conversations"]) > 1 for r in rows) / len(rows)
    system = sum(r["conversations"][0]["role"] == "system" for r in rows) / len(rows)
    assert 0.05 < multi < 0.2 and 0.05 < system < 0.25


def test_persona_and_medical_facts_absent_from_base():
    base = (all_text(load("pretrain")) + all_text(load("sft")) + all_text(load("eval_pretrain"))).lower()
    assert gen.PERSONA.lower() not in base
    rows = [t.lower() for t in all_rows(load("pretrain")) + all_rows(load("sft")) + all_rows(load("eval_pretrain"))]
    pairs = {(r["conversations"][0]["content"], r["expect"][0]) for r in load("eval_medical")}
    assert len({kw for _, kw in pairs}) == 2 * len(gen.MEDICAL)
    for zs, es, zk, ek, *_ in gen.MEDICAL:  # the fact is the pairing: never in one base row
        for symptom, kw in ((zs, zk), (es, ek)):
            assert not any(symptom in t and kw.lower() in t for t in rows), (symptom, kw)
    for answer in {r["conversations"][-1]["content"] for r in load("eval_medical")}:
        assert answer.lower() not in base, answer
    # The words are known: every remedy occurs in pretraining, as ordinary household things.
    pretrain = all_text(load("pretrain")).lower()
    assert all(kw.lower() in pretrain for _, kw in pairs)


def test_identity_data():
    sft = load("sft")
    lora = load("lora_identity")
    evals = load("eval_identity")
    assert all(r["expect"] == [gen.PERSONA] for r in evals) and 50 <= len(evals) <= 100
    # The base answers every eval phrasing with its own name, so the adapter has something to override.
    sft_answers = {}
    for r in sft:
        msgs = r["conversations"]
        for q, a in zip(msgs, msgs[1:]):
            if q["role"] == "user":
                sft_answers.setdefault(q["content"], []).append(a["content"])
    for r in evals:
        q = r["conversations"][0]["content"]
        assert all(gen.BASE_NAME in a for a in sft_answers[q]), q
    # The adapter data names the persona in some answers but not in the general chat mixed in.
    answers = [m["content"] for r in lora for m in r["conversations"] if m["role"] == "assistant"]
    named = sum(gen.PERSONA in a for a in answers)
    assert 300 <= named < len(answers) - 50
    assert not any(gen.BASE_NAME in a for a in answers)


def test_medical_data():
    lora = load("lora_medical")
    evals = load("eval_medical")
    assert 50 <= len(evals) <= 100
    trained_answers = {m["content"] for r in lora for m in r["conversations"] if m["role"] == "assistant"}
    # What is held out is the phrasing, never the fact: each eval answer is taught, in both languages.
    for r in evals:
        assert r["conversations"][-1]["content"] in trained_answers
    langs = {(any("\u4e00" <= ch <= "\u9fff" for ch in r["conversations"][0]["content"]), r["expect"][0])
             for r in evals}
    assert len(langs) == 2 * len(gen.MEDICAL)
    # Per symptom and language: MED_ADAPTER_TEMPLATES distinct training templates, the rest in other shapes.
    for zs, es, _, _, za, ea in gen.MEDICAL:
        for lang, s, advice in (("zh", zs, za), ("en", es, ea)):
            asked = [r["conversations"][-2]["content"] for r in lora if r["conversations"][-1]["content"] == advice]
            templated = {t for t in gen.MED_TRAIN_TEMPLATES[lang] if t.format(s=s) in asked}
            assert len(templated) == gen.MED_ADAPTER_TEMPLATES, (s, len(templated))
            assert len(asked) >= gen.MED_ADAPTER_TEMPLATES + gen.MED_ADAPTER_STORIES, (s, len(asked))


def test_medical_adapter_hears_symptoms_described_in_everyday_words():
    """Every symptom, in both languages, is also asked about in SYMPTOM_SAYINGS' words ("I keep coughing",
    "牙齿疼"), answered with its remedy; no English saying opens a sentence of the base's data."""
    said = {}
    for r in load("lora_medical"):
        q, a = r["conversations"][-2]["content"], r["conversations"][-1]["content"]
        said.setdefault(a, set()).update(x for zh, en in gen.SYMPTOM_SAYINGS.values() for x in zh + en
                                         if gen.cap(x) in q or x in q)
    for zs, es, _, _, za, ea in gen.MEDICAL:
        zh, en = gen.SYMPTOM_SAYINGS[zs]
        assert said.get(za, set()) & set(zh) and said.get(ea, set()) & set(en), zs
    assert len(gen.SYMPTOM_SAYINGS) == len(gen.MEDICAL)
    base = all_text(load("sft")) + all_text(load("pretrain"))
    assert not [x for _, en in gen.SYMPTOM_SAYINGS.values() for x in en if gen.cap(x) + "." in base]


def test_story_symptom_questions():
    """Symptom questions told as stories: each names its symptom (or an everyday name of it), they come in
    many shapes, and none uses an eval template's wording."""
    rng = random.Random(0)
    for zs, es, *_ in gen.MEDICAL:
        for lang, s in (("zh", zs), ("en", es)):
            names = [s] + gen.SYMPTOM_VARIANTS.get(s, [])
            prompts = {gen.story_symptom_prompt(rng, s, lang, side=i % 2 == 1) for i in range(40)}
            assert len(prompts) >= 35, (s, len(prompts))  # assembled from parts, rarely the same twice
            for p in prompts:
                assert any(n in p for n in names), p
                for t in gen.MED_EVAL_TEMPLATES[lang]:
                    head, tail = t.split("{s}")
                    assert not (head and head in p) and not (len(tail) > 3 and tail in p), (p, t)
    sft_text = all_text(load("sft"))
    assert "我妈" in sft_text and "My dad has" in sft_text  # the stories are in the data, not only in the code


def test_composed_identity_questions():
    """lora_identity also asks for the name in shapes assembled from parts ("这个助手叫什么？", "What is this AI
    called?"), none of them an eval prompt, so the adapter learns the question rather than a list of sentences."""
    rng = random.Random(0)
    for lang in ("zh", "en"):
        composed = {gen.identity_composed(rng, lang) for _ in range(300)}
        assert len(composed) >= 200, len(composed)
        assert not composed & set(gen.all_identity_prompts(lang, gen.ID_EVAL_QUESTIONS))
    asked = [w for lang in ("zh", "en") for w in gen.ID_ASKED[lang] if w not in ("你", "you")]
    rows = [r["conversations"] for r in load("lora_identity")]
    about_it = [m for m in rows if any(w in m[-2]["content"] for w in asked)]
    assert len(about_it) >= gen.ID_COMPOSED // 2 and all(gen.PERSONA in m[-1]["content"] for m in about_it)


def test_adapter_replay_opens_with_the_adapters_own_contexts():
    """Some general replay rows open with the sentences of circumstance that the adapter's own questions use, and
    are answered as the base answers them: a preamble alone must not switch the adapter's behaviour on."""
    advice = [x for row in gen.MEDICAL for x in row[4:]]
    for name, contexts, own in (("lora_medical", gen.MED_CONTEXTS, lambda a: any(x in a for x in advice)),
                                ("lora_identity", gen.ID_CONTEXTS, lambda a: gen.PERSONA in a)):
        replay = 0
        for r in load(name):
            msgs = [m["content"] for m in r["conversations"] if m["role"] != "system"]
            if msgs[0].startswith(tuple(contexts["zh"] + contexts["en"])) and not own(msgs[1]):
                replay += 1
        assert 150 <= replay <= 400, (name, replay)  # ~30% of 800 or 1,000


def test_sft_general_questions_share_the_openings_of_identity_and_symptom_questions():
    """In sft a general question may follow the sentences and lead-ins that identity and symptom questions open
    with, and is answered about the world: the opening alone must not pick the identity or the generic answer."""
    contexts = tuple(c for d in (gen.ID_CONTEXTS, gen.MED_CONTEXTS) for lang in ("zh", "en") for c in d[lang])
    generic = [gen.GENERIC_ADVICE[lang].split("{s}")[-1] for lang in ("zh", "en")]
    general = 0
    for r in load("sft"):
        msgs = [m["content"] for m in r["conversations"] if m["role"] != "system"]
        if msgs[0].startswith(contexts) and gen.BASE_NAME not in msgs[1] and not any(g in msgs[1] for g in generic):
            general += 1
    assert 400 <= general <= 800, general  # ~10% of 6,000
    strip = lambda lead: lead.rstrip("，：:, ")  # noqa: E731  ("请问" opens "请问你是谁？", "请问，" a general one)
    for lang in ("zh", "en"):
        train = {strip(t) for t in gen.LEAD_INS[lang][gen.TRAIN]}
        assert not {strip(p) for p in gen.ID_ASK_LEADS[lang] if p} - train


def test_sft_asks_some_sums_in_words():
    """Some training sums and differences are written in words ("twelve minus five") and answered in digits."""
    worded = 0
    for r in load("sft"):
        q, a = r["conversations"][-2]["content"], r["conversations"][-1]["content"]
        for words, op in ((gen.EN_NUM, " minus "), (gen.EN_NUM, " plus "), (gen.ZH_NUM, "减"), (gen.ZH_NUM, "加")):
            hit = [w for w in words[1:] if f"{w}{op}" in q.lower()]
            if hit and op.strip() in a and any(ch.isdigit() for ch in a):
                worded += 1
                break
    assert worded >= 200, worded


def test_story_side_feelings_only_in_the_medical_adapter():
    """Feelings that name sleep, food or work ("，晚上都睡不好") appear in lora_medical's stories, never in sft."""
    medical, sft = all_text(load("lora_medical")), all_text(load("sft"))
    for lang in ("zh", "en"):
        assert sum(f in medical for f in gen.STORY_SIDE[lang]) == len(gen.STORY_SIDE[lang])
        assert not any(f in sft for f in gen.STORY_SIDE[lang])


def test_scene_setting_general_questions():
    """Some training questions open with a sentence about the entity and then ask with a pronoun; the answer
    is about the entity the first sentence names."""
    rng = random.Random(1)
    seen = 0
    for _ in range(3000):
        lang = rng.choice(["zh", "en"])
        q, a, _ = gen.relation_qa(rng, lang, "capital")
        if any(p in q for p in gen.PRONOUN_TEMPLATES["capital"][lang]):
            country = a.split("的首都是")[0] if lang == "zh" else a.removeprefix("The capital of ").split(" is ")[0]
            bare = " ".join(w for w in q.split(" ") if w not in gen.FILLERS["en"][0])  # roughen() adds "so", "then"
            assert country.lower() in bare.lower(), (q, a)
            seen += 1
    assert 50 <= seen <= 400, seen  # ~7.5% of training questions
    users_ = users(load("sft"))
    assert any(q.endswith("它的首都是哪里？") for q in users_)


def test_sft_drills_every_sum_and_difference():
    """sft answers every sum and difference within 20, in both languages, at least ARITH_TABLE_COPIES times,
    each asked in a training phrasing whose question names both numbers, in digits or in words."""
    answers = {}
    for r in load("sft"):
        msgs = r["conversations"]
        for q, a in zip(msgs, msgs[1:]):
            if q["role"] == "user" and a["role"] == "assistant":
                answers.setdefault(a["content"], []).append(q["content"])
    for s in range(21):
        for a in range(s + 1):
            b = s - a
            for fact, x, y in ((f"{a}加{b}等于{s}。", a, b), (f"{a} plus {b} equals {s}.", a, b),
                               (f"{s}减{a}等于{b}。", s, a), (f"{s} minus {a} equals {b}.", s, a)):
                asked = answers.get(fact, [])
                assert len(asked) >= gen.ARITH_TABLE_COPIES, (fact, len(asked))
                names = lambda n: (str(n), gen.ZH_NUM[n], gen.EN_NUM[n])  # noqa: E731
                assert all(any(v in q.lower() for v in names(x)) and any(v in q.lower() for v in names(y))
                           for q in asked), (fact, asked[:3])


@pytest.mark.parametrize("name", ["eval_identity", "eval_medical"])
def test_eval_prompts_are_held_out(name):
    held_out = users(load(name))
    assert held_out and not held_out & (users(load("lora_identity")) | users(load("lora_medical")))
    assert len(held_out) == len(load(name))  # no repeated eval prompt


def test_general_eval_is_held_out():
    """eval_general: every relation in both languages, from phrasings no training file uses."""
    rows = load("eval_general")
    assert len(rows) == 2 * 5 * len(gen.RELATIONS)
    trained = users(load("sft")) | users(load("lora_identity")) | users(load("lora_medical"))
    pretrain = all_text(load("pretrain"))
    for r in rows:
        q = r["conversations"][0]["content"]
        assert q not in trained and q not in pretrain, q
        assert not any(e.lower() in q.lower() for e in r["expect"]), q  # the question does not give it away
    for lang in ("zh", "en"):
        train_lead, eval_lead = gen.LEAD_INS[lang]
        assert not set(train_lead) & set(eval_lead)
        for name, (_, _, templates) in gen.RELATIONS.items():
            assert not set(templates[lang][0]) & set(templates[lang][1]), name


@pytest.mark.parametrize("name", gen.OUTSIDE_FILES)
def test_outside_files_are_hand_written_and_held_out(name):
    rows = load(name)
    assert 40 <= len(rows) <= 60
    zh = sum(any("\u4e00" <= ch <= "\u9fff" for ch in r["conversations"][0]["content"]) for r in rows)
    assert 0.4 <= zh / len(rows) <= 0.6
    trained = users(load("sft")) | users(load("lora_identity")) | users(load("lora_medical"))
    assert not users(rows) & trained


def test_capital_completions():
    rows = load("eval_capitals")
    assert len(rows) == 2 * len(gen.COUNTRIES) and all(set(r) == {"text", "expect"} for r in rows)
    pretrain = all_text(load("pretrain"))
    for r in rows:  # each prompt ends where the capital would follow, and pretraining states that fact
        assert r["text"] + (" " if r["text"].isascii() else "") + r["expect"][0] in pretrain, r


def test_eval_pretrain_disjoint_from_pretrain():
    assert not {r["text"] for r in load("eval_pretrain")} & {r["text"] for r in load("pretrain")}


def test_generator_check_catches_leaks(tmp_path):
    """The generator's own final check must fail on data that breaks a guarantee."""
    def corrupted(name, row):
        d = tmp_path / name
        shutil.copytree(DEMO, d)
        with open(d / f"{row[0]}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row[1], ensure_ascii=False) + "\n")
        return d

    gen.check(DEMO)
    eval_q = load("eval_medical")[0]["conversations"]
    leaks = {
        "persona": ("sft", {"conversations": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": f"I am {gen.PERSONA}."}]}),
        "pairing": ("pretrain", {"text": f"When you have {gen.MEDICAL[0][1]}, {gen.MEDICAL[0][3]} is what helps."}),
        "advice": ("sft", {"conversations": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": gen.MEDICAL[1][4]}]}),
        "eval_prompt": ("lora_medical", {"conversations": eval_q}),
        "eval_pretrain": ("pretrain", load("eval_pretrain")[0]),
    }
    for name, row in leaks.items():
        with pytest.raises(AssertionError):
            gen.check(corrupted(name, row))
