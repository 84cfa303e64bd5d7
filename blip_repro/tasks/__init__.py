"""Tasks: one module per kind of paper table. Each exposes KEY, records(cfg), required_files(cfg),
predict_records(model, processor, batch, cfg, family) and score_run(records, predictions, cfg, family)."""
from __future__ import annotations

from importlib import import_module

from blip_repro.errors import UserError

TASKS = {"captioning": "blip_repro.tasks.captioning", "okvqa_llm": "blip_repro.tasks.okvqa_llm",
         "vqa": "blip_repro.tasks.vqa", "retrieval": "blip_repro.tasks.retrieval"}


def get(task: str):
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    return import_module(TASKS[task])


def required_files(cfg) -> list:
    return get(cfg.task).required_files(cfg)
