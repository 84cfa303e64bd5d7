"""The tiny local language model of the shapes suite: its tokenizer and its training data.

It plays the LLM of the caption + LLM pipeline on the built-in benchmark, so it learns the facts the shapes
OK-VQA questions ask for (shapes.COLOUR_FRUIT, shapes.SHAPE_THING) from prompts in exactly the pipeline's format,
rendered exactly as the local backend renders them (`llm.render_plain`): the caption variant's messages with a
train-split caption as context (0 or 3 in-context examples), the salient-noun pick, the three-question proposal and
the answer from BLIP-2's answers to those questions. `blip_repro.train` trains it (`TINY["tiny-okvqa-lm"]`, a
2-layer Llama) on the answer tokens plus the language-model loss of the whole prompt (train_loss).
"""
from __future__ import annotations

import random
import re
from collections import Counter

import torch

from blip_repro.errors import UserError
from blip_repro.tasks import okvqa_llm_prompts as P

LM_SPECIALS = ["[PAD]", "[UNK]", "</s>", "\n"]  # "\n" is a word: it separates turns and proposed questions
MAX_TOKENS = 320  # the longest prompt (3-shot caption, or the summary) is about 190 words
_WORDS = re.compile(r"\n|[^\sA-Za-z0-9]|[A-Za-z0-9]+")


def _split(text: str) -> list[str]:
    return _WORDS.findall(text.lower())


def lm_vocabulary() -> list[str]:
    from blip_repro.data import shapes

    words = set(shapes.vocabulary())
    for text in P.prompt_texts() + ["system: user: assistant:", "0 1 2 3 4 5 6 7 8 9"]:
        words.update(_split(text))
    return LM_SPECIALS + sorted(words - set(LM_SPECIALS))


def build_tokenizer():
    """Word-level, lowercasing; splits on spaces and punctuation and keeps "\\n" (deterministic, no training)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(lm_vocabulary())}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
        pre_tokenizers.Split(Regex(r"\n|[^\sA-Za-z0-9]"), behavior="isolated")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>",
                                   bos_token="</s>", model_max_length=MAX_TOKENS)


# --- training data from the shapes train split --------------------------------------------------------------------
def _read_train() -> tuple[dict, list[dict], dict]:
    """(captions per image id, OK-VQA train questions with their majority answer, VQAv2 train answers per
    (image id, question)) from the shapes files in their official formats."""
    from blip_repro.data import readers, shapes

    root = shapes.generate()
    captions: dict[int, list[str]] = {}
    for rec in readers.read_json(root / "annotations" / "coco_karpathy_train.json"):
        captions.setdefault(readers.image_id_from_file(rec["image"]), []).append(rec["caption"])

    def questions(dataset):
        q_file, a_file, _ = readers.vqa_paths(dataset, "train")
        answers = {a["question_id"]: a for a in readers.read_json(a_file)["annotations"]}
        return [(q, answers[q["question_id"]]) for q in readers.read_json(q_file)["questions"]]

    okvqa = [dict(q, question_type=a["question_type"],
                  answer=Counter(x["answer"] for x in a["answers"]).most_common(1)[0][0])
             for q, a in questions("shapes-okvqa")]
    facts = {(q["image_id"], q["question"]): a["multiple_choice_answer"] for q, a in questions("shapes-vqav2")}
    return captions, okvqa, facts


def _key_question(q: dict) -> tuple[str, list[str]]:
    """The visual question whose answer decides a shapes OK-VQA question, then two generic ones."""
    words = q["question"].rstrip("?").split()
    if q["question_type"] == "fruit":  # "which fruit has the color of the {shape}?"
        return f"what color is the {words[-1]}?", [f"is there a {words[-1]}?", "how many shapes are there?"]
    return f"what shape is {words[-2]}?", ["is there a circle?", "how many shapes are there?"]  # "... the {c} shape?"


def _as_generated(caption: str, rng: random.Random) -> str:
    """A caption as a word-level decoder prints it half of the time ("shapes : a red circle , a ...")."""
    return re.sub(r"\s*([,:])", r" \1", caption) if rng.random() < 0.5 else caption


# prompt kind -> share of the training prompts; one batch holds one kind (similar lengths, little padding)
KINDS = {"caption0": 0.4, "caption3": 0.33, "noun": 0.02, "propose": 0.1, "summary": 0.15}
GROUP = 16  # prompts per training example: the recipe's batch_size 1 is one group of 16 prompts of one kind


def _example(kind: str, q: dict, captions: list[str], facts: dict, rng: random.Random) -> tuple[list[dict], str]:
    from blip_repro.data import shapes

    fruit_of, thing_of = shapes.COLOUR_FRUIT, shapes.SHAPE_THING
    question, answer = q["question"], q["answer"]
    if kind.startswith("caption"):
        context = f"a photo of {_as_generated(rng.choice(captions), rng)}"
        if rng.random() < 0.2:  # the noun variant's second description
            noun = question.rstrip("?").split()[-1]
            context += f". {P.NOUN_PROMPT.format(noun=noun)} {_as_generated(rng.choice(captions), rng)}"
        return P.caption_messages(context, question, int(kind[-1])), answer
    if kind == "noun":
        return P.noun_messages(question), question.rstrip("?").split()[-1]
    key, fillers = _key_question(q)
    if kind == "propose":
        return P.questions_messages(question), "\n".join([key] + fillers)
    asked = [key] + fillers
    replies = [facts.get((q["image_id"], a), rng.choice(["yes", "no", "1", "2"])) for a in asked]
    table = fruit_of if q["question_type"] == "fruit" else thing_of
    if rng.random() < 0.2:  # the evidence decides, not the image's memory: follow a changed key answer
        replies[0] = rng.choice(sorted(table))
    answer = table.get(replies[0], answer)
    blip = rng.choice(sorted(fruit_of) + sorted(fruit_of.values()) + sorted(thing_of.values()))
    return P.summary_messages(question, blip, asked, replies), answer


class _Encoder:
    """Token ids of llm.render_plain(messages), one message at a time: every rendered message ends with "\\n", a
    token boundary, so the ids concatenate; the fixed system prompts and examples are encoded once."""

    def __init__(self, processor):
        self.processor, self.seen = processor, {}

    def _ids(self, text: str) -> list[int]:
        if text not in self.seen:
            self.seen[text] = self.processor(text).input_ids
        return self.seen[text]

    def messages(self, messages: list[dict]) -> list[int]:
        from blip_repro.llm import render_plain

        ids = [i for m in messages for i in self._ids(render_plain([m])[:-len("assistant:")])]
        return ids + self._ids("assistant:")


def train_examples(cfg, processor) -> list[dict]:
    """Groups of GROUP token-id (prompt, answer) pairs of one prompt kind, 4 prompts per OK-VQA train question."""
    if cfg.dataset != "shapes":
        raise UserError(f"the tiny OK-VQA language model trains on dataset 'shapes', not {cfg.dataset!r}")
    captions, okvqa, facts = _read_train()
    rng = random.Random(cfg.seed)
    by_kind: dict[str, list] = {k: [] for k in KINDS}
    for q in (okvqa[:cfg.limit] if cfg.limit else okvqa):
        for kind in rng.choices(list(KINDS), weights=list(KINDS.values()), k=4):
            by_kind[kind].append(_example(kind, q, captions[q["image_id"]], facts, rng))
    groups, encode = [], _Encoder(processor)
    for pairs in by_kind.values():
        prompts = [encode.messages(m) for m, _ in pairs]
        answers = [ids + [processor.eos_token_id] for ids in processor([" " + a for _, a in pairs]).input_ids]
        longest = max((len(p) + len(a) for p, a in zip(prompts, answers)), default=0)
        if longest > MAX_TOKENS:
            raise UserError(f"a tiny LM training prompt of {longest} tokens exceeds {MAX_TOKENS}")
        for i in range(0, len(pairs) - GROUP + 1, GROUP):
            groups.append({"prompt_ids": prompts[i:i + GROUP], "answer_ids": answers[i:i + GROUP]})
    return groups


def train_batch_for(processor, examples: list[dict], cfg, family: str) -> dict:
    """Right-padded prompt + answer ids of every prompt in the groups; labels only on the answer and end token."""
    pairs = [(p, a) for g in examples for p, a in zip(g["prompt_ids"], g["answer_ids"])]
    n = max(len(p) + len(a) for p, a in pairs)
    ids = torch.full((len(pairs), n), processor.pad_token_id)
    labels = torch.full((len(pairs), n), -100)
    mask = torch.zeros((len(pairs), n), dtype=torch.long)
    for i, (p, a) in enumerate(pairs):
        ids[i, :len(p) + len(a)] = torch.tensor(p + a)
        mask[i, :len(p) + len(a)] = 1
        labels[i, len(p):len(p) + len(a)] = torch.tensor(a)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train_loss(model, batch: dict, cfg) -> torch.Tensor:
    """Answer loss plus the language-model loss on every token: predicting the question's shape or colour word
    from the caption before it trains the copying that answering needs, a far denser signal than one answer token
    (measured: answer accuracy 0.64 after 800 steps of 16 caption prompts with it, at the prior without)."""
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logits = logits.reshape(-1, logits.shape[-1])
    every = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    return F.cross_entropy(logits, batch["labels"][:, 1:].reshape(-1)) + F.cross_entropy(logits, every.reshape(-1))
