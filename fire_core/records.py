"""Records and their sources: world rows to sample records, dialogue records, held-out splits, FIRE-100K shards."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from fire_core.files import jsonl_lines
from fire_core.prompts import parse_teacher


def select_per_family(ds, families: Sequence[str], n: int, seed: int) -> list[int]:
    """Up to n row indices per family (all if n == 0), in a seeded order."""
    import random

    rng = random.Random(seed)
    by_fam: dict[str, list[int]] = {}
    for i, f in enumerate(ds["family"]):
        by_fam.setdefault(f, []).append(i)
    picked: list[int] = []
    for f in families:
        idx = by_fam.get(f, [])
        picked += idx if n == 0 else rng.sample(idx, min(n, len(idx)))
    rng.shuffle(picked)
    return picked


def is_heldout(dialogue_id: str, fraction: float) -> bool:
    """A fixed, seed-free split of FIRE-100K by id, the same in stages 03, 04 and 05."""
    return int(hashlib.sha256(f"heldout:{dialogue_id}".encode()).hexdigest(), 16) % 10_000 < fraction * 10_000



def image_lookup(split_ds) -> Callable[[str], Image.Image]:
    index = {i: k for k, i in enumerate(split_ds["id"])}

    def image_of(sample_id: str) -> Image.Image:
        if sample_id not in index:
            raise KeyError(f"image '{sample_id}' is not in the world's {split_ds.split} split; rebuild stage 00")
        return split_ds[index[sample_id]]["image"].convert("RGB")

    return image_of


def sample_record(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "split": row["split"], "family": row["family"], "question": row["question"],
            "answer": row["answer"], "response": row["response"], "scene": json.loads(row["scene"]),
            "annotation": row["annotation"]}



def world_samples(rows, rid_of: Callable[[str], str], with_scene: bool = True) -> Iterator[dict[str, Any]]:
    """Engine samples from world rows (decoded lazily, one at a time)."""
    for r in rows:
        s = {"id": r["id"], "request_id": rid_of(r["id"]), "question": r["question"], "answer": r["answer"],
             "family": r["family"], "split": r["split"], "image": r["image"].convert("RGB"),
             "response": r["response"], "annotation": r["annotation"]}
        if with_scene:
            s["scene"] = json.loads(r["scene"])
        yield s


def dialogue_record(sample: dict[str, Any], turns: list[dict[str, Any]], rid: str, source: str,
                    stop: str | None = None, **meta: Any) -> dict[str, Any]:
    """The one shape of a dialogue record, for FIRE-100K, FIRE-1M, the gold and judgement
    dialogues and FIRE-Bench alike. ``sample`` is a world row or a sample record (``family`` and
    ``split``); ``image`` names the image by split and id; ``meta`` says who wrote it."""
    split = sample.get("split", "train")
    rec = {"id": sample["id"], "request_id": rid, "image": sample.get("image_path") or f"world/{split}/{sample['id']}",
           "question": sample["question"], "answer": sample["answer"], "task": sample["family"], "split": split,
           "source": source, "turns": turns, "meta": meta}
    if stop is not None:
        rec["stop"] = stop
    return rec


NLF_CRITIQUE_KEYS = ("critique NLF", "critique_NLF", "critique_nlf", "critique")  # spellings accepted


def load_lvlm_nlf(path: Path | str, image_dir: Path | str | None = None) -> list[dict[str, Any]]:
    """DRESS's released feedback data (hub ``YangyiYY/LVLM_NLF``: JSONL, one trajectory per line
    with ``image_id`` (COCO train2017), ``caption`` and ``interaction``, a list of
    ``{user, model, rating, critique NLF}``) as dialogue records. Turn i's refinement is the
    ``user`` text of turn i+1; turn 1's ``user`` is the question. The caption is the dense
    annotation the annotator read; the reference answer is the last turn's response. Images are
    named ``<image_dir>/<image_id as 12 digits>.jpg``, as in COCO. A bad line fails with its
    number and what is wrong; nothing is downloaded."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LVLM_NLF file not found: {path}")
    out = []
    for n, row in jsonl_lines(path):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {n}: expected a JSON object")
        missing = [k for k in ("image_id", "interaction") if k not in row]
        if missing or not isinstance(row.get("interaction"), list) or not row["interaction"]:
            raise ValueError(f"{path}: line {n}: needs 'image_id' and a non-empty 'interaction' list "
                             f"(missing: {missing or 'interaction is empty'})")
        turns = []
        inter = row["interaction"]
        for k, t in enumerate(inter):
            if not isinstance(t, dict):
                raise ValueError(f"{path}: line {n}: turn {k + 1} is not an object")
            crit = next((t[c] for c in NLF_CRITIQUE_KEYS if c in t), None)
            if "user" not in t or "model" not in t or "rating" not in t or crit is None:
                raise ValueError(f"{path}: line {n}: turn {k + 1} needs 'user', 'model', 'rating' and a critique "
                                 f"(one of {NLF_CRITIQUE_KEYS}); it has {sorted(t)}")
            try:
                rating = int(t["rating"])
            except (TypeError, ValueError):
                raise ValueError(f"{path}: line {n}: turn {k + 1} rating {t['rating']!r} is not a number 1-4") from None
            if not 1 <= rating <= 4:
                raise ValueError(f"{path}: line {n}: turn {k + 1} rating {rating} is outside 1-4")
            turns.append({"response": str(t["model"]), "rating": rating, "critique": str(crit),
                          "refinement": str(inter[k + 1]["user"]) if k + 1 < len(inter) else ""})
        image_id = str(row["image_id"])
        name = f"{int(image_id):012d}.jpg" if image_id.isdigit() else image_id
        out.append({"id": f"nlf-{n}", "request_id": f"nlf-{n}", "image": str(Path(image_dir) / name) if image_dir else name,
                    "question": str(inter[0]["user"]), "answer": turns[-1]["response"], "task": "lvlm_nlf",
                    "split": "train", "source": "LVLM_NLF", "turns": turns,
                    "meta": {"image_id": image_id, "caption": row.get("caption", "")}})
    return out


# ----------------------------------------------------------------------------- FIRE's released files
FIRE_FILES = {"train": "FIRE-train-100K.json", "fire1m": "FIRE-1M.json", "test": "FIRE-test.json"}
FIRE_QUESTION_KEYS = ("question", "instruction", "query", "prompt")  # spellings accepted
FIRE_ANSWER_KEYS = ("answer", "gt_answer", "ground_truth", "gt")


def _json_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, value) for a JSON array file, or a JSONL file, of records."""
    with open(path, encoding="utf-8") as fh:
        head = fh.read(1 << 12).lstrip()
    if head.startswith("["):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
        for k, row in enumerate(data):
            yield f"record {k}", row
    else:
        for n, row in jsonl_lines(path):
            yield f"line {n}", row


def _first(row: dict[str, Any], keys: Sequence[str]) -> Any:
    return next((row[k] for k in keys if row.get(k) not in (None, "")), None)


def load_fire(path: Path | str, image_dir: Path | str | None = None, split: str = "train") -> list[dict[str, Any]]:
    """FIRE's released files (hub ``PengxiangLi/FIRE``: FIRE-train-100K.json, FIRE-1M.json,
    FIRE-test.json; a JSON array or JSONL) as internal dialogue records. Two conversation
    schemas are read, per record:

    - FIRE's own: ``conversations`` of ``{role: student|teacher, type: response|feedback,
      value}``; each teacher value is ``Score: N`` then ``Feedback: ...``;
    - LLaVA's training layout: ``conversations`` of ``{from: human|gpt, value}`` with
      ``<image>`` in the first human turn (the question); gpt turns are the student's
      responses and later human turns the feedback (no scores in this layout: ``None``).

    The question is ``question`` (or ``instruction``, ``query``, ``prompt``) or, in the LLaVA
    layout, the first human turn; the ground truth (``answer``, ``gt_answer``, ``ground_truth``,
    ``gt``) is ``""`` when a file has none (FIRE-Bench judges by the teacher's score alone).
    ``image`` is the record's relative path joined to ``image_dir``. A malformed record fails
    with the file, the record and what is wrong; nothing is downloaded."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FIRE file not found: {path}")
    out = []
    for where, row in _json_records(path):
        def bad(msg: str, where: str = where) -> ValueError:
            return ValueError(f"{path}: {where}: {msg}")

        if not isinstance(row, dict):
            raise bad("expected a JSON object")
        conv = row.get("conversations")
        if not isinstance(conv, list) or not conv or not all(isinstance(c, dict) for c in conv):
            raise bad("needs a non-empty 'conversations' list of objects")
        if not row.get("image"):
            raise bad("has no 'image' (a path relative to the image folder)")
        turns: list[dict[str, Any]] = []
        if "role" in conv[0]:
            schema = "fire"
            question = _first(row, FIRE_QUESTION_KEYS)
            if question is None:
                raise bad(f"has no question (one of {FIRE_QUESTION_KEYS})")
            expect = "student"
            for k, c in enumerate(conv):
                role, value = c.get("role"), c.get("value")
                if role not in ("student", "teacher") or not isinstance(value, str):
                    raise bad(f"conversation item {k} needs role student|teacher and a string value, got {sorted(c)}")
                if role != expect:
                    raise bad(f"conversation item {k} is a {role} turn where a {expect} turn belongs "
                              "(turns alternate, the student first)")
                if role == "student":
                    turns.append({"response": value, "score": None, "feedback": ""})
                else:
                    parsed = parse_teacher(value)
                    if not parsed.parsable:
                        raise bad(f"conversation item {k}: the teacher's reply has no readable 'Score: N' (1-10): "
                                  f"{value[:80]!r}")
                    turns[-1].update(score=parsed.score, feedback=parsed.feedback)
                expect = "teacher" if role == "student" else "student"
        elif "from" in conv[0]:
            schema = "llava"
            if conv[0].get("from") != "human" or "<image>" not in str(conv[0].get("value", "")):
                raise bad("the first turn of a LLaVA-layout conversation must be the human's, with <image> in it")
            question = str(conv[0]["value"]).replace("<image>", "").strip()
            for k, c in enumerate(conv[1:], start=1):
                who, value = c.get("from"), c.get("value")
                if who not in ("human", "gpt") or not isinstance(value, str):
                    raise bad(f"conversation item {k} needs from human|gpt and a string value, got {sorted(c)}")
                if (who == "gpt") != (k % 2 == 1):
                    raise bad(f"conversation item {k} is from {who} out of turn (human and gpt alternate)")
                if who == "gpt":
                    turns.append({"response": value, "score": None, "feedback": ""})
                else:
                    turns[-1]["feedback"] = value
        else:
            raise bad("conversation items need 'role' (FIRE's layout) or 'from' (LLaVA's layout)")
        if not turns:
            raise bad("has no student response")
        rid = str(row.get("id") or f"{path.stem}-{where.split()[-1]}")
        answer = _first(row, FIRE_ANSWER_KEYS)
        image = str(Path(image_dir) / row["image"]) if image_dir else str(row["image"])
        out.append({"id": rid, "request_id": rid, "image": image, "question": str(question),
                    "answer": "" if answer is None else str(answer), "task": str(row.get("source") or "fire"),
                    "split": split, "source": f"FIRE/{path.name}", "turns": turns,
                    "meta": {"schema": schema, "source": row.get("source")}})
    return out


def missing_images(recs: Sequence[dict[str, Any]], limit: int = 5) -> tuple[int, list[str]]:
    """How many records name an image file that is not there, and the first few of them."""
    gone = [r["image"] for r in recs if not Path(r["image"]).is_file()]
    return len(gone), gone[:limit]


def open_image(path: str) -> Image.Image:
    """A real-data image by path, as RGB; a missing or unreadable file says which."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except OSError as exc:
        raise ValueError(f"image {path} cannot be read ({exc})") from exc
