"""Every metric of the BLIP / BLIP-2 tables, computed as the official evaluators compute them.

- VQA accuracy (VQAv2, OK-VQA) and GQA exact match: `metrics_vqa` (protocols.md §3).
- Caption scores through pycocoevalcap's COCOEvalCap pipeline: `metrics_caption` (protocols.md §1.4).
- Retrieval recall@K and r_mean as BLIP's itm_eval: `metrics_retrieval` (protocols.md §1.2).
"""
from blip_repro.metrics_caption import SPICE_JARS, caption_scores, spice_missing_note
from blip_repro.metrics_retrieval import recall_at_k
from blip_repro.metrics_vqa import (
    GQA_RULES,
    VQA_EVALUATORS,
    gqa_match,
    gqa_score,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    vqa_accuracy,
    vqa_score,
)

__all__ = [
    "GQA_RULES", "SPICE_JARS", "VQA_EVALUATORS", "caption_scores", "gqa_match", "gqa_score", "normalize_answer",
    "process_digit_article", "process_punctuation", "recall_at_k", "spice_missing_note", "vqa_accuracy",
    "vqa_score",
]
