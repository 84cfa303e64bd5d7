"""Caption scores (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE) exactly as pycocoevalcap's COCOEvalCap computes them.

protocols.md §1.4: BLIP and BLIP-2 score captions with `pycocoevalcap.eval.COCOEvalCap`. Scores are on
pycocoevalcap's scale (CIDEr 1.33 = the paper's 133.3). PTBTokenizer, METEOR and SPICE run java; SPICE also
needs Stanford CoreNLP 3.6.0, which pycocoevalcap downloads on first use and which is absent offline
(environment.md §4), so SPICE is reported as None with a note instead of hanging on the download.
"""
from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
from pathlib import Path

from blip_repro.errors import UserError

CORENLP_URL = "http://nlp.stanford.edu/software/stanford-corenlp-full-2015-12-09.zip"
SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def spice_lib_dir() -> Path:
    """pycocoevalcap's spice/lib folder, where its get_stanford_models() looks for the CoreNLP jars."""
    from pycocoevalcap.spice import get_stanford_models  # importing it downloads nothing; calling it would

    return Path(get_stanford_models.SPICEDIR).resolve() / get_stanford_models.SPICELIB


def spice_missing_note() -> str | None:
    """None if SPICE can run, else why not and how to fix it. Looks for the jars; never starts a download."""
    lib = spice_lib_dir()
    missing = [name for name in SPICE_JARS if not (lib / name).is_file()]
    if not missing:
        return None
    return (f"SPICE unavailable: needs Stanford CoreNLP 3.6.0 models ({' and '.join(missing)} missing in {lib}); "
            f"on a connected machine download {CORENLP_URL}, and copy stanford-corenlp-3.6.0.jar and "
            f"stanford-corenlp-3.6.0-models.jar from it into {lib}")


def _require_java() -> None:
    if shutil.which("java") is None:
        raise UserError("caption_scores needs java (PTBTokenizer and METEOR are java programs) and none is on PATH; "
                        "install a JRE, e.g. `apt-get install default-jre-headless` or `conda install openjdk`")


def _check_inputs(references: dict, candidates: dict) -> list:
    """The ids to score, in the order of references; every id needs one candidate and at least one reference."""
    for image_id in references:
        if image_id not in candidates:
            raise UserError(f"no candidate caption for image id {image_id!r} ({len(candidates)} candidates for "
                            f"{len(references)} images with references)")
    for image_id in candidates:
        if image_id not in references:
            raise UserError(f"candidate caption for image id {image_id!r}, which has no references")
    if not references:
        raise UserError("references is empty; there is nothing to score")
    for image_id, refs in references.items():
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise UserError(f"references[{image_id!r}] must be a non-empty list of strings, got {refs!r}")
        if not isinstance(candidates[image_id], str):
            raise UserError(f"candidates[{image_id!r}] must be a string, got {candidates[image_id]!r}")
    return list(references)


def _tokenize(references: dict, candidates: dict, ids: list) -> tuple[dict, dict]:
    """PTB-tokenize both sides as COCOEvalCap does: two tokenizer runs, references first."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
    res = tokenizer.tokenize({i: [{"caption": candidates[i]}] for i in ids})
    return gts, res


def _meteor(gts: dict, res: dict) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()  # starts a JVM (~5 s: the paraphrase table loads)
    try:
        score, _ = scorer.compute_score(gts, res)
    except ValueError as exc:  # the JVM answered nothing: it died (memory for -Xmx2G, broken java)
        scorer.lock.release()  # compute_score raised while holding it; __del__ would wait for it forever
        scorer.meteor_p.kill()
        err = scorer.meteor_p.stderr.read().decode(errors="replace").strip().splitlines()[-1:]
        raise UserError(f"METEOR (java -jar meteor-1.5.jar -Xmx2G) returned no score ({exc}); "
                        f"java said: {err[0] if err else 'nothing'}") from None
    finally:
        scorer.__del__()  # close the JVM now rather than whenever the object is collected
    return float(score)


def _spice(gts: dict, res: dict) -> tuple[float | None, str | None]:
    note = spice_missing_note()
    if note is not None:
        return None, note
    from pycocoevalcap.spice.spice import Spice

    try:
        score, _ = Spice().compute_score(gts, res)
    except (subprocess.CalledProcessError, OSError) as exc:
        return None, f"SPICE failed: {exc} (java -jar spice-1.0.jar -Xmx8G needs 8 GB of memory and lmdbjni)"
    return float(score), None


def caption_scores(references: dict, candidates: dict, spice: bool = True, meteor: bool = True) -> dict:
    """Scores of one candidate caption per image against that image's reference captions.

    references: {image_id: [caption, ...]}; candidates: {image_id: caption}, the same ids. Returns bleu1..4,
    meteor, rouge_l, cider and spice (None when SPICE cannot run or spice=False; spice_note says why) on the
    pycocoevalcap scale, and n_images. meteor=False skips METEOR (its JVM takes ~6 s), e.g. for controls."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = _check_inputs(references, candidates)
    _require_java()
    gts, res = _tokenize(references, candidates, ids)
    with contextlib.redirect_stdout(io.StringIO()):  # BLEU prints its length ratios
        bleu, _ = Bleu(4).compute_score(gts, res)
    out = {f"bleu{n}": float(b) for n, b in zip(range(1, 5), bleu)}
    out["meteor"] = _meteor(gts, res) if meteor else None
    out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    out["cider"] = float(Cider().compute_score(gts, res)[0])
    if spice:
        out["spice"], out["spice_note"] = _spice(gts, res)
    else:
        out["spice"], out["spice_note"] = None, "SPICE not computed (spice=False)"
    out["n_images"] = len(ids)
    return out
