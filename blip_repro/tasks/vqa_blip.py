"""BLIP VQA (BlipForQuestionAnswering) as BLIP's models/blip_vqa.py does it (protocols.md §1.5): the question's
first token is `[ENC]`, answers are generated or ranked over the answer list (first-token probability keeps the top
k_test, then each candidate's full-sequence loss with label smoothing 0.1 picks one), and training weighs each
annotator answer by its share of the votes.

transformers 5.23 drops the text cross-attention padding mask (protocols.md §4.3 item 2): BlipTextAttention never
hands `encoder_attention_mask` to its cross-attention, and BlipForQuestionAnswering.generate passes a mask of ones
anyway, so the answer decoder attends to padded question states. `question_padding_mask` gives the mask back to the
decoder's cross-attention (a forward pre-hook) for generate, rank and the training loss.
"""
from __future__ import annotations

import contextlib
from collections import Counter

import torch
import torch.nn.functional as F

from blip_repro.errors import UserError

QUESTION_MAX_TOKENS = 35  # blip_vqa.py: tokenizer(question, padding='longest', truncation=True, max_length=35)
LABEL_SMOOTHING = 0.1  # models/med.py's LM loss, also when ranking (protocols.md §1.1, §1.5)
RANK_CHUNK = 1024  # candidate sequences per decoder call: bounds the logits memory (rows are independent: exact)


def enc_token_id(tokenizer) -> int:
    """Id of `[ENC]`: the tokenizer's, or the id after `[DEC]` for hub tokenizers without it (bert-base-uncased +
    `[DEC]` = 30522; the model's 30524-entry vocabulary has `[ENC]` = 30523, protocols.md §1.1, §4.3)."""
    found = tokenizer.convert_tokens_to_ids("[ENC]")
    if found is not None and found != tokenizer.unk_token_id:
        return found
    if tokenizer.bos_token_id == len(tokenizer) - 1:
        return tokenizer.bos_token_id + 1
    raise UserError("the tokenizer has no [ENC] token and [DEC] is not its last entry (BLIP's layout); cannot build "
                    "BLIP's image-grounded question encoding")


@contextlib.contextmanager
def question_padding_mask(decoder, question_mask: torch.Tensor):
    """While active, the decoder's cross-attention ignores padded question positions (mask 0). Decoder batches that
    repeat each question n times in a row (beams, ranked candidates) get the mask repeated the same way."""
    def hook(module, args, kwargs):
        states = kwargs.get("encoder_hidden_states")
        if states is None:
            return None
        mask = question_mask.to(states.device)
        if states.shape[0] != mask.shape[0]:
            mask = mask.repeat_interleave(states.shape[0] // mask.shape[0], dim=0)
        additive = (1.0 - mask[:, None, None, :].to(states.dtype)) * torch.finfo(states.dtype).min
        return args, {**kwargs, "encoder_attention_mask": additive}

    handles = [layer.crossattention.self.register_forward_pre_hook(hook, with_kwargs=True)
               for layer in decoder.bert.encoder.layer if hasattr(layer, "crossattention")]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def question_inputs(processor, questions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids with [ENC] first, attention_mask) of BLIP-preprocessed questions."""
    from blip_repro.tasks.vqa import pre_question

    enc = processor.tokenizer([pre_question(q) for q in questions], padding="longest", truncation=True,
                              max_length=QUESTION_MAX_TOKENS, return_tensors="pt")
    ids = enc["input_ids"].clone()
    ids[:, 0] = enc_token_id(processor.tokenizer)
    return ids, enc["attention_mask"]


def answer_inputs(processor, answers: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Answers as the decoder reads them: [DEC] first (replacing [CLS]), [SEP] last, padded (blip_vqa.py)."""
    tok = processor.tokenizer
    enc = tok(answers, padding="longest", return_tensors="pt")
    ids = enc["input_ids"].clone()
    ids[:, 0] = tok.bos_token_id
    return ids, enc["attention_mask"]


def sequence_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                  smoothing: float = LABEL_SMOOTHING) -> torch.Tensor:
    """Per sequence: sum over the answer tokens of the label-smoothed next-token CE (med.py, reduction='none')."""
    targets = ids.masked_fill(mask == 0, -100)[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                         ignore_index=-100, reduction="none", label_smoothing=smoothing)
    return ce.view(ids.shape[0], -1).sum(1)


@torch.no_grad()
def answer(model, processor, images: list, questions: list[str], protocol, answer_list: list[str] | None) -> list[str]:
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"].to(device, dtype)
    ids, mask = (t.to(device) for t in question_inputs(processor, questions))
    if int(ids[0, 0]) >= model.config.text_config.vocab_size:
        raise UserError(f"[ENC] id {int(ids[0, 0])} is outside the model's text vocabulary "
                        f"({model.config.text_config.vocab_size}); tokenizer and model do not belong together")
    if protocol.inference == "generate":
        with question_padding_mask(model.text_decoder, mask):
            out = model.generate(input_ids=ids, pixel_values=pixel_values, attention_mask=mask,
                                 num_beams=protocol.num_beams, max_length=protocol.max_length,
                                 min_length=protocol.min_length, length_penalty=protocol.length_penalty)
        return [t.strip() for t in processor.batch_decode(out, skip_special_tokens=True)]
    if not answer_list:
        raise UserError("inference=rank needs the answer list (answer_list.json)")
    a_ids, a_mask = (t.to(device) for t in answer_inputs(processor, answer_list))
    best = rank(model.text_decoder, question_states(model, pixel_values, ids, mask), mask, a_ids, a_mask,
                protocol.k_test)
    return [answer_list[i] for i in best.tolist()]


def question_states(model, pixel_values: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The image-grounded question encoding the answer decoder cross-attends to (ids start with [ENC])."""
    image_embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state
    return model.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                              return_dict=True).last_hidden_state


def rank(decoder, states: torch.Tensor, mask: torch.Tensor, a_ids: torch.Tensor, a_mask: torch.Tensor,
         k: int) -> torch.Tensor:
    """blip_vqa.py rank_answer: index of the best answer per question (protocols.md §1.5)."""
    top_ids, scores = candidate_scores(decoder, states, mask, a_ids, a_mask, k)
    return top_ids[torch.arange(len(top_ids), device=top_ids.device), scores.argmax(dim=1)]


def candidate_scores(decoder, states: torch.Tensor, mask: torch.Tensor, a_ids: torch.Tensor, a_mask: torch.Tensor,
                     k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices of the k answers whose first token is likeliest after [DEC], their scores = minus the summed
    label-smoothed loss of the whole answer), both [questions, k]. k is capped at the answer list's length."""
    n, k = states.shape[0], min(k, a_ids.shape[0])
    start = a_ids[:1, :1].expand(n, 1)  # [DEC]
    with question_padding_mask(decoder, mask):
        first = decoder(input_ids=start, encoder_hidden_states=states, use_cache=False, return_dict=True).logits
    prob_first = first[:, 0, :].float().softmax(dim=1).index_select(1, a_ids[:, 1])
    top_ids = prob_first.topk(k, dim=1).indices
    flat = top_ids.reshape(-1)
    scores = torch.empty(n * k, device=states.device)
    per_call = max(1, RANK_CHUNK // k) * k  # whole questions per call, so the mask repeats line up
    for lo in range(0, n * k, per_call):
        rows = flat[lo:lo + per_call]
        q = slice(lo // k, (lo + len(rows)) // k)
        with question_padding_mask(decoder, mask[q]):
            logits = decoder(input_ids=a_ids[rows], attention_mask=a_mask[rows],
                             encoder_hidden_states=states[q].repeat_interleave(k, dim=0), use_cache=False,
                             return_dict=True).logits
        scores[lo:lo + len(rows)] = -sequence_loss(logits, a_ids[rows], a_mask[rows])
    return top_ids, scores.view(n, k)


# --- training (BLIP train_vqa.py + blip_vqa.py forward) -------------------------------------------------------------
def answer_weights(answers: list[str]) -> list[tuple[str, float]]:
    """Each distinct annotator answer with its share of the votes (vqa_dataset.py: += 1 / len(answers))."""
    counts = Counter(answers)
    return [(a, c / len(answers)) for a, c in counts.items()]


def train_batch(processor, examples: list[dict], pixel_values: torch.Tensor) -> dict:
    """One row per (question, distinct answer): the question (with [ENC]) and image repeated for each answer."""
    rows, weights, owner = [], [], []
    for i, e in enumerate(examples):
        for a, w in answer_weights(e["answers"]):
            rows.append(a)
            weights.append(w)
            owner.append(i)
    index = torch.tensor(owner)
    q_ids, q_mask = question_inputs(processor, [e["question"] for e in examples])
    a_ids, a_mask = answer_inputs(processor, rows)
    return {"pixel_values": pixel_values[index], "input_ids": q_ids[index], "attention_mask": q_mask[index],
            "answer_ids": a_ids, "answer_mask": a_mask, "answer_weights": torch.tensor(weights),
            "n_questions": torch.tensor(len(examples))}


def train_loss(model, batch: dict, smoothing: float = LABEL_SMOOTHING) -> torch.Tensor:
    """Σ weight · (label-smoothed answer loss) / #questions (blip_vqa.py). The wrapper (DDP or the model) is
    called once; the decoder logits are read by a forward hook, with the question padding masked."""
    inner = getattr(model, "module", model)
    seen = {}
    handle = inner.text_decoder.register_forward_hook(lambda m, a, out: seen.__setitem__("logits", out.logits))
    try:
        with question_padding_mask(inner.text_decoder, batch["attention_mask"]):
            model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                  attention_mask=batch["attention_mask"], labels=batch["answer_ids"],
                  decoder_attention_mask=batch["answer_mask"])
    finally:
        handle.remove()
    per_answer = sequence_loss(seen["logits"], batch["answer_ids"], batch["answer_mask"], smoothing)
    return (batch["answer_weights"] * per_answer).sum() / batch["n_questions"]
