"""VQA training for blip_repro.train (train_examples, train_batch_for, train_loss) and the tiny VQA models of the
shapes suite: tiny-blip2-opt / tiny-blip2-t5 (Blip2ForConditionalGeneration with a 2-layer OPT or T5, the frozen
vision tower of the trained tiny-blip, shared/reference/shapes.md §4 run F) and tiny-blip-vqa
(BlipForQuestionAnswering initialised from tiny-blip, trained with BLIP's answer-weighted loss).

BLIP-2's VQA numbers are zero-shot; a tiny BLIP-2 has no pre-trained language model to be zero-shot with, so on
shapes it learns question answering from the VQAv2- and GQA-format training splits (never from OK-VQA's, whose
answers need knowledge the images do not show: that is what the caption + LLM pipeline adds).
"""
from __future__ import annotations

import torch

from blip_repro.errors import UserError

BLIP2_SPECIALS = ["<pad>", "<unk>", "</s>", "<image>"]  # ids 0..3: pad, unk, bos/eos, the query placeholder
NUM_QUERY_TOKENS = 8  # shapes.md §4
# dataset -> the VQA training splits it stands for ("shapes": the tiny BLIP-2 recipe's VQAv2 + GQA mixture)
TRAIN_SETS = {"shapes": ("shapes-vqav2", "shapes-gqa"), "shapes-vqav2": ("shapes-vqav2",),
              "shapes-gqa": ("shapes-gqa",), "shapes-okvqa": ("shapes-okvqa",), "vqav2": ("vqav2",),
              "gqa": ("gqa",), "okvqa": ("okvqa",)}


# --- tiny processors and models ------------------------------------------------------------------------------------
def blip2_processor(kind: str):
    """Blip2Processor with a word-level tokenizer over shapes.vocabulary() (deterministic; committed under
    assets/processors/). OPT prepends </s> as its BOS, T5 appends </s>. `<image>` is in the vocabulary and not
    declared special: the processor adds it as a special token and reuses its id (shapes.md §3 items 4-5)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import Blip2Processor, PreTrainedTokenizerFast

    from blip_repro.data.shapes import vocabulary
    from blip_repro.tiny import _image_processor

    vocab = {w: i for i, w in enumerate(BLIP2_SPECIALS + vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    template = "</s> $A" if kind == "shapes-opt" else "$A </s>"
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                   bos_token="</s>" if kind == "shapes-opt" else None, model_max_length=64)
    size = len(fast)
    proc = Blip2Processor(image_processor=_image_processor(), tokenizer=fast, num_query_tokens=NUM_QUERY_TOKENS)
    if len(fast) != size:  # a new id would split vocab_size and image_token_index apart
        raise RuntimeError(f"Blip2Processor grew the tokenizer from {size} to {len(fast)} entries")
    return proc


def _tiny_blip():
    from transformers import BlipForConditionalGeneration

    from blip_repro import tiny

    return BlipForConditionalGeneration.from_pretrained(tiny.checkpoint("tiny-blip"))


def build_tiny_blip2(name: str, tok, seed: int = 0):
    """64 px tiny-blip vision tower (copied), Q-Former 128 wide x 2 layers with 8 queries, a 2-layer LM 128 wide."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    src = _tiny_blip()
    torch.manual_seed(seed)  # after tiny-blip's (possible) training, so the new weights depend on the seed only
    v = src.config.vision_config
    vision = dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                  num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                  image_size=v.image_size, patch_size=v.patch_size, layer_norm_eps=v.layer_norm_eps, qkv_bias=True,
                  initializer_range=0.02)
    qformer = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
                   cross_attention_frequency=1, encoder_hidden_size=v.hidden_size, vocab_size=len(tok),
                   max_position_embeddings=64)
    if name == "tiny-blip2-opt":
        text = dict(model_type="opt", vocab_size=len(tok), hidden_size=128, num_hidden_layers=2, ffn_dim=512,
                    num_attention_heads=4, word_embed_proj_dim=128, max_position_embeddings=128, dropout=0.0,
                    attention_dropout=0.0, pad_token_id=0, bos_token_id=2, eos_token_id=2)
    else:
        text = dict(model_type="t5", vocab_size=len(tok), d_model=128, d_kv=32, d_ff=512, num_layers=2,
                    num_decoder_layers=2, num_heads=4, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                    tie_word_embeddings=False, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)
    cfg = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text,
                      num_query_tokens=NUM_QUERY_TOKENS, image_token_index=BLIP2_SPECIALS.index("<image>"))
    model = Blip2ForConditionalGeneration(cfg)
    model.vision_model.load_state_dict(src.vision_model.state_dict())  # same names and shapes (qkv_bias=True)
    return model


def build_tiny_blip_vqa(seed: int = 0):
    """BlipForQuestionAnswering with tiny-blip's configuration; vision tower and answer decoder from tiny-blip,
    question encoder from its decoder's BERT (BLIP fine-tunes VQA from pre-trained encoder and decoder)."""
    from transformers import BlipForQuestionAnswering

    src = _tiny_blip()
    torch.manual_seed(seed)
    model = BlipForQuestionAnswering(src.config)
    model.vision_model.load_state_dict(src.vision_model.state_dict())
    model.text_decoder.load_state_dict(src.text_decoder.state_dict())
    model.text_encoder.load_state_dict(src.text_decoder.bert.state_dict())
    return model


# --- training data and batches ------------------------------------------------------------------------------------
def train_examples(cfg, processor) -> list[dict]:
    """{"image", "question", "answer" (the majority answer), "answers" (every annotator's)} of cfg.dataset."""
    from blip_repro.tasks.vqa import read
    from blip_repro.tasks.vqa_score import _majority

    if cfg.dataset not in TRAIN_SETS:
        raise UserError(f"VQA training: dataset {cfg.dataset!r} is not one of {', '.join(TRAIN_SETS)}")
    out = []
    for dataset in TRAIN_SETS[cfg.dataset]:
        for r in read(dataset, cfg.split, cfg.limit):
            answers = r.get("answers") or [r.get("answer")]
            if answers == [None]:
                raise UserError(f"{dataset}/{cfg.split}: question {r['question_id']} has no answer to train on")
            out.append({"image": r["image"], "question": r["question"], "answer": _majority(r), "answers": answers})
    return out


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def _blip2_batch(processor, examples: list[dict], prompt: str, family: str) -> dict:
    """The zero-shot prompt, then the answer and EOS: the LM loss is on the answer and EOS only. OPT reads
    `<image>*Q </s> prompt answer eos` (right-padded); FlanT5 encodes `<image>*Q prompt </s>` and decodes the answer."""
    from blip_repro.tasks.vqa import pre_question

    tok = processor.tokenizer
    image = [tok.convert_tokens_to_ids("<image>")] * processor.num_query_tokens
    prompts = [image + tok(prompt.format(pre_question(e["question"])))["input_ids"] for e in examples]
    # a space before the answer, as it follows "answer:" in the text (byte-level BPE tokenizers encode it)
    answers = [tok(" " + e["answer"], add_special_tokens=False)["input_ids"] for e in examples]
    if family == "blip2-opt":
        newline = tok("\n", add_special_tokens=False)["input_ids"]  # LAVIS ends OPT text with "\n"
        ids = [p + a + (newline or [tok.eos_token_id]) for p, a in zip(prompts, answers)]
        labels = [[-100] * len(p) + i[len(p):] for p, i in zip(prompts, ids)]
        return {"input_ids": _pad(ids, tok.pad_token_id), "attention_mask": _pad([[1] * len(i) for i in ids], 0),
                "labels": _pad(labels, -100)}
    targets = [a + [tok.eos_token_id] for a in answers]
    return {"input_ids": _pad(prompts, tok.pad_token_id), "attention_mask": _pad([[1] * len(p) for p in prompts], 0),
            "labels": _pad(targets, -100), "decoder_attention_mask": _pad([[1] * len(t) for t in targets], 0)}


def train_batch_for(processor, examples: list[dict], cfg, family: str) -> dict:
    from blip_repro.tasks import vqa_blip
    from blip_repro.tasks.captioning import _pixels
    from blip_repro.tasks.vqa import PROTOCOLS

    pixel_values = _pixels(processor, examples)
    if family == "blip-vqa":
        return vqa_blip.train_batch(processor, examples, pixel_values)
    if family in ("blip2-opt", "blip2-t5"):
        prompt = cfg.prompt if cfg.prompt is not None else PROTOCOLS[family].prompt
        return {"pixel_values": pixel_values, **_blip2_batch(processor, examples, prompt, family)}
    raise UserError(f"VQA training for model family {family!r} is not implemented; use a BLIP-2 or BLIP VQA model")


def train_loss(model, batch: dict, cfg) -> torch.Tensor:
    """BLIP-2: the language model's own loss on the answer tokens; BLIP: the answer-weighted loss (vqa_blip)."""
    if "answer_weights" in batch:
        from blip_repro.tasks import vqa_blip

        return vqa_blip.train_loss(model, batch, cfg.label_smoothing)
    return model(**batch).loss
