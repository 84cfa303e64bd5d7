"""OK-VQA with a language model in the loop: BLIP-2 describes the image, a language model answers from the
description, BLIP-2's own answer is the fallback ("BLIP-2.3", shared/reference/protocols.md §6).

Variants (the published rows; prompts in okvqa_llm_prompts.py):
  caption    BLIP-2 captions the image ("a photo of", beams 5, max 20 new tokens, repetition penalty 2.0, length
             penalty 1.5); the LLM answers from "a photo of <caption>" with 3 (or 0) in-context examples.
  noun       the LLM first picks the question's salient noun; BLIP-2 also continues "the <noun> can be described
             as"; both descriptions are the context.
  questions  the LLM proposes three questions, BLIP-2 answers each (beams 5, max 15 new tokens, repetition
             penalty 1.5), the LLM answers the main question from them (zero-shot, as published).

The pipeline runs on injected callables (`Vision`), so it is tested without a model; `predict_records` builds them
from a loaded BLIP-2 (okvqa_llm_vision.py). Every LLM answer is cached in
`<run dir>/llm_cache.sqlite` (or `llm_cache`): copying that file next to a fresh checkout replays the run offline.
"""
from __future__ import annotations

import dataclasses
import re
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

from blip_repro.errors import UserError
from blip_repro.tasks import okvqa_llm_prompts as P
from blip_repro.tasks.okvqa_llm_train import train_batch_for, train_examples, train_loss  # noqa: F401
from blip_repro.tasks.okvqa_llm_vision import ASK, CAPTION, Vision, vision_for  # noqa: F401

# variant -> published number of in-context examples (protocols.md §6 table)
VARIANTS = {"caption": 3, "noun": 3, "questions": 0}
DEVIATIONS = {
    "empty": "an empty LLM reply, or one that the clean-up empties, falls back to BLIP-2's answer; the published "
             "code scored the empty string (it never happened there: the API does not return empty answers)",
    "questions": "the proposed questions are the first 3 non-blank lines of the reply; the published code zipped "
                 "them across an 8-question batch, which drops questions when a reply has fewer lines",
}
USAGE_KEYS = ("requests", "cache_hits", "prompt_tokens", "completion_tokens", "retries")
_KEY_LIKE = re.compile(r"sk-[A-Za-z0-9_\-]{6,}")


def _lm_call(llm, messages: list[dict], params: dict, usage: Counter, seed: int) -> str:
    """One LLM answer; `usage` gains this call's requests, cache hits and tokens."""
    if llm.backend == "local" and params.get("temperature"):
        params = {**params, "seed": seed}  # a local model samples reproducibly (the API one is cached instead)
    before = dict(llm.stats)
    try:
        return llm.complete(messages, **params)
    finally:
        for k in USAGE_KEYS:
            usage[k] += (llm.stats.get(k) or 0) - (before.get(k) or 0)


def predict(variant: str, shots: int, items: list[dict], vision: Vision, llm, lemmatize=lambda xs: xs,
            seed: int = 0) -> list[dict]:
    """Answers for items [{"question_id", "image": PIL image, "question"}] (questions as BLIP-2 gets them)."""
    if variant not in VARIANTS:
        raise UserError(f"llm_variant {variant!r} is not one of {', '.join(VARIANTS)}")
    images, questions = [it["image"] for it in items], [it["question"] for it in items]
    blip = lemmatize(vision.answer(images, questions))
    usage = [Counter() for _ in items]
    out = [{"question_id": it["question_id"], "blip2_answer": b} for it, b in zip(items, blip)]
    if variant == "questions":
        raws = _ask_questions(items, vision, llm, blip, usage, seed, out)
        answers = [P.clean_summary_answer(r, b) for r, b in zip(raws, blip)]
    else:
        contexts = _contexts(variant, items, vision, llm, usage, seed, out)
        raws = [_lm_call(llm, P.caption_messages(c, q, shots), P.CAPTION_PARAMS, u, seed)
                for c, q, u in zip(contexts, questions, usage)]
        answers = [P.clean_caption_answer(r, b) for r, b in zip(raws, blip)]
    final = lemmatize([a for a, _ in answers])
    for rec, raw, (_, source), ans, u in zip(out, raws, answers, final, usage):
        rec.update(answer=ans, source=source, llm_raw=raw, llm_usage={k: u[k] for k in USAGE_KEYS})
    return out


def _contexts(variant, items, vision, llm, usage, seed, out) -> list[str]:
    images = [it["image"] for it in items]
    captions = vision.describe(images, [CAPTION.prompt] * len(items))
    contexts = [f"{CAPTION.prompt} {c}" for c in captions]  # published: f"{prompt} {answer}"
    if variant == "noun":
        nouns = [P.single_answer(P.alpha_span(_lm_call(llm, P.noun_messages(it["question"]), P.NOUN_PARAMS, u, seed)))
                 for it, u in zip(items, usage)]
        prompts = [P.NOUN_PROMPT.format(noun=n) for n in nouns]
        described = vision.describe(images, prompts)
        contexts = [f"{c}. {p} {d}" for c, p, d in zip(contexts, prompts, described)]  # '. '.join(contexts)
        for rec, n in zip(out, nouns):
            rec["noun"] = n
    for rec, c in zip(out, contexts):
        rec["context"] = c
    return contexts


def _ask_questions(items, vision, llm, blip, usage, seed, out) -> list[str]:
    asked = [P.parse_questions(_lm_call(llm, P.questions_messages(it["question"]), P.QUESTIONS_PARAMS, u, seed))
             for it, u in zip(items, usage)]
    flat = [(i, q) for i, qs in enumerate(asked) for q in qs]
    replies = vision.ask([items[i]["image"] for i, _ in flat], [q for _, q in flat]) if flat else []
    answers = [[] for _ in items]
    for (i, _), a in zip(flat, replies):
        answers[i].append(a)
    raws = []
    for it, b, qs, ans, u, rec in zip(items, blip, asked, answers, usage, out):
        raws.append(_lm_call(llm, P.summary_messages(it["question"], b, qs, ans), P.SUMMARY_PARAMS, u, seed))
        rec.update(asked=qs, asked_answers=ans)
    return raws


# --- the language model of a run ----------------------------------------------------------------------------------
_LLMS: dict[tuple, object] = {}


def _local_name(spec: str) -> str | None:
    """The zoo name of a local tiny language model spec ("local:tiny-okvqa-lm"), else None."""
    from blip_repro import zoo

    backend, _, name = spec.partition(":")
    return name if backend == "local" and name in zoo.MODELS else None


def weights_fingerprint(cfg) -> str:
    """What identifies the weights behind the LLM and the captioner, for the run id (API models: their name)."""
    from blip_repro import zoo

    parts = []
    name = _local_name(cfg.llm or "")
    if name or (cfg.llm or "").startswith("local:") and Path(cfg.llm[6:]).is_dir():
        parts.append(zoo.fingerprint(name or cfg.llm[6:]))
    if cfg.caption_model:
        parts.append(zoo.fingerprint(cfg.caption_model))
    return ";".join(parts)


def llm_for(cfg):
    """The run's LLM (one per process and setting); answers cached in `llm_cache` or <run dir>/llm_cache.sqlite."""
    from blip_repro import zoo
    from blip_repro.llm import make_llm

    check_config(cfg)
    cache = Path(cfg.llm_cache) if cfg.llm_cache else cfg.run_dir / "llm_cache.sqlite"
    key = (cfg.llm, cfg.llm_endpoint, str(cache.resolve()), cfg.llm_replay_only)
    if key not in _LLMS:
        spec, cache_model = cfg.llm, None
        name = _local_name(cfg.llm)
        if name:  # the trained checkpoint, keyed in the cache by name and recipe, not by this machine's path
            from blip_repro import tiny

            folder = tiny.checkpoint(name) if not cfg.llm_replay_only else Path(name)
            spec, cache_model = f"local:{folder}", f"{name}@{zoo.fingerprint(name)}"
        _LLMS[key] = make_llm(spec, endpoint=cfg.llm_endpoint, cache_path=cache, replay_only=cfg.llm_replay_only,
                              cache_model=cache_model)
    return _LLMS[key]


def session_stats() -> dict:
    """LLM work done in this process so far (every run): requests sent, cache hits, tokens, estimated cost."""
    out = {k: 0 for k in USAGE_KEYS}
    cost = None
    for llm in _LLMS.values():
        for k in USAGE_KEYS:
            out[k] += llm.stats.get(k) or 0
        if llm.stats.get("estimated_cost_usd") is not None:
            cost = (cost or 0.0) + llm.stats["estimated_cost_usd"]
    return {**out, "estimated_cost_usd": cost}


def check_config(cfg) -> tuple[str, int]:
    """(variant, shots) of a run; a missing LLM or a credential in a parameter is a one-line error up front."""
    if not cfg.llm:
        raise UserError("task okvqa_llm needs the parameter 'llm', e.g. openai:gpt-3.5-turbo, "
                        "openai-compatible:<model>@<url> or local:tiny-okvqa-lm")
    for name in ("llm", "llm_cache", "caption_model"):
        value = str(getattr(cfg, name) or "")
        netloc = urlsplit(value.split("@", 1)[-1]).netloc if "://" in value else ""
        if _KEY_LIKE.search(value) or "@" in netloc:
            raise UserError(f"parameter {name!r} holds what looks like a credential; the API key is read from "
                            f"$OPENAI_API_KEY only, and run parameters are written to config.yaml")
    variant = cfg.llm_variant or "caption"
    if variant not in VARIANTS:
        raise UserError(f"parameter 'llm_variant': {variant!r} is not one of {', '.join(VARIANTS)}")
    shots = VARIANTS[variant] if cfg.shots is None else cfg.shots
    if not 0 <= shots <= len(P.CAPTION_EXAMPLES):
        raise UserError(f"parameter 'shots': {shots} is not 0..{len(P.CAPTION_EXAMPLES)}")
    if variant == "questions" and shots:
        raise UserError("the 'questions' variant has no in-context examples (published zero-shot): set shots 0")
    return variant, shots


# --- the interface evaluate.py drives (one record = one question, as tasks/vqa.py) -------------------------------
KEY = "question_id"


def records(cfg) -> list[dict]:
    from blip_repro.tasks import vqa

    check_config(cfg)
    return vqa.records(cfg)


def required_files(cfg) -> list:
    from blip_repro.tasks import vqa

    check_config(cfg)
    return vqa.required_files(cfg)


def predict_records(model, processor, batch: list[dict], cfg, family: str) -> list[dict]:
    from blip_repro.data import readers
    from blip_repro.tasks import vqa

    variant, shots = check_config(cfg)
    # the LLM sees the question as BLIP-2 does: LAVIS's blip_question preprocessing (protocols.md §2.2)
    items = [{"question_id": r[KEY], "image": readers.load_image(r["image"]),
              "question": vqa.pre_question(r["question"])} for r in batch]
    lemmatize = vqa.lemmatize if vqa.lemmatizes(cfg) else (lambda xs: xs)
    return predict(variant, shots, items, vision_for(model, processor, cfg, family), llm_for(cfg), lemmatize,
                   cfg.seed)


def score_run(recs: list[dict], preds: dict, cfg, family: str) -> dict:
    """VQA accuracy of the pipeline's answers, BLIP-2's own answers in the same run, where the answers came from,
    and the LLM work the predictions took."""
    from blip_repro.llm import PRICES_PER_MTOK
    from blip_repro.tasks import vqa_score

    variant, shots = check_config(cfg)
    out = vqa_score.score_run(recs, preds, cfg, family)
    blip2 = vqa_score.score(recs, {k: p["blip2_answer"] for k, p in preds.items()}, cfg.dataset, cfg.evaluator,
                            cfg.gqa_rule)
    usage = {k: sum(p["llm_usage"][k] for p in preds.values()) for k in USAGE_KEYS}
    backend, _, model = cfg.llm.partition(":")
    price = PRICES_PER_MTOK.get(model) if backend == "openai" else None
    usage["estimated_cost_usd"] = round((usage["prompt_tokens"] * price[0] + usage["completion_tokens"] * price[1])
                                        / 1e6, 4) if price else None
    return {**out, "blip2_vqa_acc": blip2.get("vqa_acc"), "answer_source": dict(Counter(p["source"] for p in
                                                                                       preds.values())),
            "llm_usage": usage, "llm": cfg.llm, "llm_variant": variant, "shots": shots,
            "caption_protocol": dataclasses.asdict(CAPTION) if not cfg.caption_model else cfg.caption_model}
