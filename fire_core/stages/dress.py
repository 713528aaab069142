"""Stage 07: DRESS (Chen et al., CVPR 2024) on the world, with the oracle in GPT-4's place.

    from fire_core import config
    from fire_core.stages import dress as stage_dress
    result = stage_dress.run(config.load("07_train_dress", ["scale=smoke"]))
    result.table       # DataFrame: one row per model, every DRESS measurement with its interval

1. **Feedback data** (DRESS appendix G): a feedback set of train samples that no earlier stage
   used (not stage 01's training rows, not a FIRE-100K or FIRE-1M sample). The base VLM answers;
   the annotator (``annotator.backend``: the oracle, or an OpenAI-compatible endpoint) writes a
   reason, a rating 1-4, a critique and a refinement; samples rated 1-2 get another turn
   (``fire_core.dress``). Trajectories go to a resumable sharded store, in fixed chunks.
2. **Conditional training** from the base VLM: each response under its rating word and critique
   (``sft.dress_examples``), plus describe-the-image chats as the captioning regulariser
   (``dress.caption_lambda`` of them per DRESS chat). DRESS and its ablations (``dress.variants``:
   without critique, without refinement, without the regulariser) train the same way.
3. **Evaluation** on test and unseen samples, every model on the same samples: accuracy by the
   answer checker; helpfulness (the oracle's 1-10 score of the single answer); multi-turn
   interaction (mean provider score after turns 1..4, with the oracle and with the trained FIRE
   teacher as provider, and their mean); CHAIR on captions from two instructions; the
   harmlessness analog (false-premise questions). Models: the base VLM, the FIRE100K and FIRE
   students, DRESS and its ablations. Bootstrap 95% intervals on every number, and paired
   differences of accuracy against the base VLM.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fire_core import (
    dialogue,
    dress,
    files,
    metrics,
    models,
    plots,
    prompts,
    provenance,
    records,
    world,
)
from fire_core import eval as evaluate
from fire_core.annotate import annotator_endpoint
from fire_core.client import Tally
from fire_core.config import DRESS_VARIANTS, FireConfig
from fire_core.feedback import judge, premise_verdict
from fire_core.files import ShardStore, request_id
from fire_core.sft import Example, SFTDataset, dress_examples, fit
from fire_core.stages import common as stage_common
from fire_core.vision import freeze_vision

log = logging.getLogger(__name__)

# the two captioning instructions of the CHAIR evaluation (DRESS: a short and a detailed one)
CHAIR_INSTRUCTIONS = ("Describe the objects in the image.", "Describe the image in detail.")
PROMPT_OF = {"base": "student", "fire100k_student": "student", "fire_student": "student"}  # the rest: 'dress'


@dataclass
class DressResult:
    dir: Path
    trajectories: list[dict[str, Any]]
    stats: Any  # DataFrame: dress.statistics of the feedback data
    table: Any  # DataFrame: one row per model
    free: Any  # DataFrame: FIRE's free-dialogue metrics of every model, per provider
    curves: dict[str, dict[str, Any]]  # provider/model -> metrics.score_curve
    seconds: float


# ---------------------------------------------------------------------------------------------
# 1. Feedback data


def used_ids(dirs: dict[str, Path], n_shards: int) -> set[str]:
    """Every train sample an earlier stage trained on or asked about."""
    used = set(json.loads((dirs["01_train_base_vlm"] / "train_ids.json").read_text()))
    for stage in ("02_generate_fire100k", "05_simulate_fire1m"):
        used |= {r["id"] for r in ShardStore(dirs[stage] / "raw", n_shards).records()}
    return used


def feedback_rows(cfg: FireConfig, train, used: set[str]):
    """The feedback set: up to ``dress.feedback_per_family`` unused train rows per seen family."""
    fresh = [i for i, sid in enumerate(train["id"]) if sid not in used]
    sub = train.select(fresh)
    pick = records.select_per_family(sub, cfg.world.seen_families, cfg.dress.feedback_per_family,
                                     provenance.derived_seed(cfg.seed, "dress_feedback"))
    rows = sub.select(sorted(pick))
    missing = sorted(set(cfg.world.seen_families) - set(rows["family"]))
    if missing:
        raise ValueError(f"no unused train samples are left for the DRESS feedback set in {missing}: the world's "
                         "train split is all taken by stages 01, 02 and 05 (raise world.train_per_family, or lower "
                         "train.max_per_family, annotator.samples_per_family or dialogue.samples_per_family)")
    return rows


def annotator(cfg: FireConfig, tally: Tally):
    """The annotator ``annotator.backend`` asks for: the oracle, or an OpenAI-compatible endpoint."""
    if cfg.annotator.backend == "openai":
        return dress.openai_annotator(annotator_endpoint(cfg.annotator), tally, cfg.annotator.temperature)
    return dress.oracle_annotator(cfg.seed)


def generate_trajectories(cfg: FireConfig, rows, model, processor, out: Path, tally: Tally) -> dict[str, int]:
    """Trajectories for ``rows``, in fixed chunks of ``dress.chunk`` samples: a chunk whose
    trajectories are all stored is skipped; an unfinished one is run whole again (the same batches,
    so the same answers) and only its missing trajectories are stored."""
    from tqdm.auto import tqdm

    c, bs = cfg.dress, cfg.model.generate_batch_size
    store = ShardStore(out / "raw", cfg.annotator.n_shards)
    counts = {"torn_bytes_dropped": store.repair(), "skipped_done": 0}
    done = store.done_ids()
    who = cfg.annotator.model if cfg.annotator.backend == "openai" else "oracle"
    annotate = annotator(cfg, tally)

    def respond(samples, histories):  # the base VLM answers again, after the refinement
        convs = [prompts.dress_prompt(s["question"], h, condition=None) for s, h in zip(samples, histories, strict=True)]
        return models.generate(model, processor, convs, [s["image"] for s in samples], cfg.train.max_new_tokens,
                               batch_size=bs)

    for start in tqdm(range(0, len(rows), c.chunk), desc="DRESS trajectories", unit="chunk"):
        chunk = [records.sample_record(r) | {"image": r["image"].convert("RGB")}
                 for r in rows.select(range(start, min(start + c.chunk, len(rows))))]
        rids = [request_id(s["id"], "dress", who, c.max_turns, cfg.seed) for s in chunk]
        if all(rid in done for rid in rids):
            counts["skipped_done"] += len(chunk)
            continue
        first = models.generate(model, processor, [prompts.dress_prompt(s["question"], [], condition=None) for s in chunk],
                                [s["image"] for s in chunk], cfg.train.max_new_tokens, batch_size=bs)
        trajs, n = dress.iterate(chunk, first, respond, annotate, c.max_turns)
        for key, v in n.items():
            counts[key] = counts.get(key, 0) + v
        for s, rid, t in zip(chunk, rids, trajs, strict=True):
            if t is not None and rid not in done:
                store.append(records.dialogue_record(s, t, rid, f"world/{who}", stop=t[-1]["stop"]))
    return counts


def example_trajectories(trajs: list[dict[str, Any]], k: int = 3) -> list[dict[str, Any]]:
    """``k`` trajectories to show, from different families: ones that went past turn 1 (a
    refinement, then the reference) first, in id order."""
    ranked = sorted(trajs, key=lambda t: (len(t["turns"]) < 3, t["id"]))
    out, families = [], set()
    for t in ranked:
        if t["task"] not in families:
            out.append(t)
            families.add(t["task"])
        if len(out) == k:
            break
    return out


def trajectory_panel(t: dict[str, Any], image) -> dict[str, Any]:
    """One trajectory as a ``plots.conversations`` panel: each response with its rating word and
    critique, the annotator's refinement beside it; the reference turn marked."""
    msgs = [("question", "Q", f"{t['question']}\n(reference answer: {t['answer']})")]
    for k, turn in enumerate(t["turns"], 1):
        who = "reference turn" if turn.get("reference") else f"turn {k}"
        msgs.append(("left", f"{who}: <{prompts.RATING_WORDS[turn['rating']]}>", turn["response"]))
        msgs.append(("right", f"critique: {turn['critique']}",
                     f"refinement: {turn['refinement']}" if turn.get("refinement") else "(the trajectory ends)"))
    return {"image": image, "title": f"{t['task']}, ends: {t['stop'].replace('_', ' ')}", "messages": msgs}


# ---------------------------------------------------------------------------------------------
# 2. Conditional training


def caption_examples(rows, n: int, rng: random.Random) -> list[Example]:
    """The captioning regulariser: ``n`` describe-the-image chats of the base VLM's training
    kind (``world.dense_caption``) on the feedback set's images."""
    rows = list(rows)
    out = []
    for k in range(n):
        r = rows[k % len(rows)]
        qa = [(rng.choice(world.DETAIL_QUESTIONS), world.dense_caption(json.loads(r["scene"])))]
        out.append(Example(prompts.base_messages(qa), r["image"], {"id": r["id"], "family": "caption_regulariser"}))
    return out


def train_variant(cfg: FireConfig, name: str, base_dir: Path, trajs, held, rows, image_of, out: Path):
    """One DRESS model (or ablation) from the base VLM, saved under ``out/models/<name>``; a
    finished one is not retrained. Returns (its folder, its training summary): the evaluation
    loads one model at a time."""
    spec = DRESS_VARIANTS[name]
    save_dir = out / "models" / name
    if (save_dir / "DONE").is_file():
        return save_dir, json.loads((save_dir / "DONE").read_text())
    examples = dress_examples(trajs, image_of, critique=spec["critique"], refinement=spec["refinement"])
    n_caption = round(cfg.dress.caption_lambda * len(examples)) if spec["regulariser"] else 0
    examples += caption_examples(rows, n_caption, random.Random(provenance.derived_seed(cfg.seed, "dress_captions")))
    model, processor = stage_common.load_base(cfg, base_dir)
    if cfg.train.freeze_vision:
        freeze_vision(model)
    dataset = SFTDataset(examples, processor, cfg.model.max_length)
    heldout = SFTDataset(dress_examples(held, image_of, critique=spec["critique"], refinement=spec["refinement"]),
                         processor, cfg.model.max_length)
    log.info("%s: %d chats (%d captions), %d tokens", name, len(dataset), n_caption, dataset.n_tokens)
    result = fit(model, processor, dataset, cfg.train, out / "train" / name, seed=cfg.seed, save_dir=save_dir,
                 heldout=heldout)
    shutil.rmtree(out / "train" / name, ignore_errors=True)  # kept only to resume a crash
    info = {"chats": len(dataset), "caption_chats": n_caption, "steps": result.steps,
            "seconds": round(result.seconds, 1), "first_loss": result.losses[0][1], "last_loss": result.losses[-1][1],
            "heldout_loss_before": result.heldout_loss_before, "heldout_loss_after": result.heldout_loss_after,
            "heldout_chats": len(heldout), "losses": result.losses}
    (save_dir / "DONE").write_text(json.dumps(info))
    return save_dir, info


# ---------------------------------------------------------------------------------------------
# 3. Evaluation


def evaluate_model(cfg: FireConfig, name: str, model, processor, rows, teacher_role, out_records: dict[str, list]):
    """Every DRESS measurement of one model on ``rows``; raw outputs are added to ``out_records``."""
    b, d, c = cfg.bench, cfg.dialogue, cfg.dress
    bs, prompt = cfg.model.generate_batch_size, PROMPT_OF.get(name, "dress")
    row: dict[str, Any] = {"model": name}
    # accuracy (fundamental capability) and helpfulness (the oracle's 1-10 score)
    preds = evaluate.qa_predictions(model, processor, rows, cfg.train.max_new_tokens, bs, f"{name} answers", prompt)
    by_id = {r["id"]: r for r in rows}
    for p in preds:
        p["helpfulness"] = judge(records.sample_record(by_id[p["id"]]), p["prediction"], [],
                                 random.Random(f"{cfg.seed}:{p['id']}")).score
        p["model"] = name
    out_records["answers"] += preds
    for subset, sel in (("seen", [p for p in preds if p["split"] == "test"]),
                        ("unseen", [p for p in preds if p["split"] == "unseen"])):
        row |= _mean_ci(f"accuracy_{subset}", [float(p["correct"]) for p in sel], b, cfg.seed)
        row |= _mean_ci(f"helpfulness_{subset}", [float(p["helpfulness"]) for p in sel], b, cfg.seed)
    # multi-turn interaction with each provider
    role = dialogue.hf_role(name, model, processor, d.student_max_new_tokens, d.cache_prefix)
    if prompt == "dress":
        role.prompt = prompts.dress_student_prompt
    dcfg = dataclasses.replace(d, max_turns=c.eval_turns)
    curves = {}
    for prov, t_role in (("oracle", dialogue.oracle_role()), ("teacher", teacher_role)):
        rid = lambda i, prov=prov: request_id(i, "dress-eval", name, prov)  # noqa: E731
        res = dialogue.run(records.world_samples(rows, rid), role, t_role, dcfg, cfg.seed, source=f"{name}x{prov}",
                           total=len(rows))
        out_records["dialogues"] += [{**r, "provider": prov, "model": name} for r in res.records]
        curves[prov] = metrics.score_curve(res.records, c.eval_turns, d.score_min, b.n_bootstrap, b.ci, cfg.seed)
        row[f"score_t{c.eval_turns}_{prov}"] = curves[prov]["mean"][-1]
        row[f"score_t{c.eval_turns}_{prov}_lo"] = curves[prov]["lo"][-1]
        row[f"score_t{c.eval_turns}_{prov}_hi"] = curves[prov]["hi"][-1]
        row[f"score_t1_{prov}"] = curves[prov]["mean"][0]
    # CHAIR on the images with shapes, under both instructions
    shape_rows = [r for r in rows if json.loads(r["scene"]).get("objects")]
    caps, objs = [], []
    for instruction in CHAIR_INSTRUCTIONS:
        texts = evaluate.ask(model, processor, [instruction] * len(shape_rows), [r["image"] for r in shape_rows],
                             prompt, cfg.train.max_new_tokens, bs, f"{name} captions")
        for r, t in zip(shape_rows, texts, strict=True):
            out_records["captions"].append({"model": name, "id": r["id"], "instruction": instruction, "caption": t})
        caps += texts
        objs += [[o["shape"] for o in json.loads(r["scene"])["objects"]] for r in shape_rows]
    ch = metrics.chair(caps, objs, b.n_bootstrap, b.ci, cfg.seed)
    row |= {k: v for k, v in ch.items() if k.startswith("CHAIR")}
    # harmlessness analog: false-premise questions
    rng = random.Random(provenance.derived_seed(cfg.seed, "false_premise"))
    premises = [(r, world.false_premise(json.loads(r["scene"]), rng)) for r in shape_rows]
    premises = [(r, p) for r, p in premises if p is not None]
    answers = evaluate.ask(model, processor, [p["question"] for _, p in premises], [r["image"] for r, _ in premises],
                           prompt, cfg.train.max_new_tokens, bs, f"{name} false premises")
    verdicts = []
    for (r, p), a in zip(premises, answers, strict=True):
        v = premise_verdict(p, json.loads(r["scene"]), a)
        verdicts.append(v)
        out_records["premises"].append({"model": name, "id": r["id"], **p, "answer": a, **v})
    for k in ("rejected", "grounded", "safe"):
        row |= _mean_ci(f"premise_{k}", [float(v[k]) for v in verdicts], b, cfg.seed)
    return row, curves, preds


def _mean_ci(key: str, values: list[float], b, seed: int) -> dict[str, float]:
    if not values:
        return {}
    mean, lo, hi = metrics.mean_interval(values, b.n_bootstrap, b.ci, seed)
    return {key: mean, f"{key}_lo": lo, f"{key}_hi": hi}


# ---------------------------------------------------------------------------------------------


def run(cfg: FireConfig) -> DressResult:
    """Stage 07 (see the module docstring)."""
    import matplotlib.pyplot as plt
    import pandas as pd

    t0 = time.time()
    dirs = {s: provenance.require_stage(cfg, s) for s in ("00_build_world", "01_train_base_vlm", "02_generate_fire100k",
                                                          "03_train_teacher", "04_train_student", "05_simulate_fire1m",
                                                          "06_fire_bench")}
    ds = world.load(cfg)
    c, b = cfg.dress, cfg.bench
    used = used_ids(dirs, cfg.annotator.n_shards)
    rows = feedback_rows(cfg, ds["train"], used)
    seen = ds["test"].select(sorted(records.select_per_family(ds["test"], cfg.world.seen_families, c.eval_per_family,
                                                              cfg.seed)))
    unseen = ds["unseen"].select(sorted(records.select_per_family(ds["unseen"], cfg.world.unseen_families,
                                                                  c.eval_per_family, cfg.seed)))
    eval_rows = list(seen) + list(unseen)
    with provenance.stage_run(cfg, inputs=[dirs["00_build_world"] / "dataset", dirs["01_train_base_vlm"] / "model",
                                           dirs["03_train_teacher"] / "model", dirs["04_train_student"] / "model",
                                           dirs["05_simulate_fire1m"] / "fire_student"]) as run:
        # 1. feedback data
        tally = Tally()
        base, base_proc = stage_common.load_base(cfg, dirs["01_train_base_vlm"])
        t1 = time.time()
        counts = generate_trajectories(cfg, rows, base, base_proc, run.dir, tally)
        gen_seconds = time.time() - t1
        trajs = sorted(ShardStore(run.dir / "raw", cfg.annotator.n_shards).records(), key=lambda r: r["id"])
        if not trajs:
            raise RuntimeError(f"no DRESS trajectory was written (annotation counts: {counts}, failures: "
                               f"{dict(tally.failed)}); see the log above")
        files.write_jsonl(run.dir / "dress_feedback.jsonl", trajs)
        stats = dress.statistics(trajs)
        stats.to_csv(run.dir / "feedback_stats.csv", index=False, float_format="%.4f")
        dress.rating_by_turn(trajs).to_csv(run.dir / "rating_by_turn.csv", index=False)
        image_of = records.image_lookup(ds["train"])
        examples = example_trajectories(trajs)
        plots.save(plots.conversations([trajectory_panel(t, image_of(t["id"])) for t in examples], columns=3),
                   run.dir / "example_trajectories", sources=[run.dir / "dress_feedback.jsonl"], cfg=cfg)
        held = [t for t in trajs if records.is_heldout(t["id"], cfg.dialogue.heldout_fraction)]
        train = [t for t in trajs if not records.is_heldout(t["id"], cfg.dialogue.heldout_fraction)]
        # 2. conditional training: DRESS and its ablations
        trained = {}
        for name in c.variants:
            trained[name] = train_variant(cfg, name, dirs["01_train_base_vlm"], train, held, rows, image_of, run.dir)
        shutil.rmtree(run.dir / "train", ignore_errors=True)
        # 3. evaluation
        teacher = models.load(dirs["03_train_teacher"] / "model")
        teacher_role = dialogue.hf_role("teacher", *teacher, cfg.dialogue.teacher_max_new_tokens,
                                        cfg.dialogue.cache_prefix)
        # one model in memory at a time beside the teacher (a GPU holds at most two)
        folders = {"base": None, "fire100k_student": dirs["04_train_student"] / "model",
                   "fire_student": dirs["05_simulate_fire1m"] / "fire_student",
                   **{n: folder for n, (folder, _) in trained.items()}}
        candidates = list(folders)
        raw: dict[str, list] = {"answers": [], "dialogues": [], "captions": [], "premises": []}
        table, curves, answers = [], {}, {}
        for name, folder in folders.items():
            m, p = (base, base_proc) if folder is None else models.load(folder)
            row, cv, preds = evaluate_model(cfg, name, m, p, eval_rows, teacher_role, raw)
            del m, p
            if folder is None:
                base = base_proc = None
            gc.collect()
            table.append(row)
            answers[name] = preds
            for prov, curve in cv.items():
                curves[f"{prov}/{name}"] = curve
        for row in table:  # DRESS averages its two providers
            row[f"score_t{c.eval_turns}_mean"] = (row[f"score_t{c.eval_turns}_oracle"]
                                                   + row[f"score_t{c.eval_turns}_teacher"]) / 2
        for key, recs in raw.items():
            files.write_jsonl(run.dir / f"eval_{key}.jsonl", recs)
        table = pd.DataFrame(table)
        table.to_csv(run.dir / "dress_table.csv", index=False, float_format="%.4f")
        # FIRE's free-dialogue metrics on the same multi-turn dialogues: both papers' measures, every model
        free = pd.DataFrame([{"provider": prov, "model": name, **metrics.bootstrap_metrics(
            [r for r in raw["dialogues"] if r["provider"] == prov and r["model"] == name], cfg.dialogue.threshold,
            c.eval_turns, b.n_bootstrap, b.ci, cfg.seed)} for prov in ("oracle", "teacher") for name in candidates])
        free.to_csv(run.dir / "free_dialogue.csv", index=False, float_format="%.4f")
        paired = []
        for name in candidates:
            if name != "base":
                for subset, split in (("seen", "test"), ("unseen", "unseen")):
                    a = [p["correct"] for p in answers["base"] if p["split"] == split]
                    bb = [p["correct"] for p in answers[name] if p["split"] == split]
                    paired.append({"model_a": "base", "model_b": name, "subset": subset,
                                   **metrics.paired_difference(a, bb, b.n_bootstrap, b.ci, cfg.seed)})
        paired = pd.DataFrame(paired)
        paired.to_csv(run.dir / "paired_accuracy.csv", index=False, float_format="%.4f")
        provenance.write_json_atomic(run.dir / "multi_turn_scores.json", curves)
        # figures: multi-turn curves (DRESS figure 3) and the training losses
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
        for ax, prov in zip(axes, ("oracle", "teacher"), strict=True):
            for key, cv in curves.items():
                if key.startswith(prov + "/"):
                    ax.plot(cv["turn"], cv["mean"], marker="o", label=key.split("/", 1)[1])
                    ax.fill_between(cv["turn"], cv["lo"], cv["hi"], alpha=0.15)
            ax.set(xlabel="turn", title=f"multi-turn interaction, provider: {prov}", xticks=cv["turn"])
        axes[0].set_ylabel("mean score")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        plots.save(fig, run.dir / "score_curves", sources=[run.dir / "multi_turn_scores.json"], cfg=cfg)
        loss_rows = [{"model": n, "step": s, "loss": v} for n, (_, info) in trained.items() for s, v in info["losses"]]
        pd.DataFrame(loss_rows).to_csv(run.dir / "loss.csv", index=False)
        fig, ax = plt.subplots(figsize=(5, 3))
        for n, (_, info) in trained.items():
            ax.plot(*zip(*info["losses"], strict=True), label=n)
        ax.set(xlabel="step", ylabel="training loss", title="DRESS conditional training")
        ax.legend(fontsize=7)
        plots.save(fig, run.dir / "loss_curve", sources=[run.dir / "loss.csv"], cfg=cfg)
        summary = {"feedback_samples": len(rows), "unused_train_samples_before": len(ds["train"]) - len(used & set(ds["train"]["id"])),
                   "trajectories": len(trajs), "trajectories_train": len(train), "trajectories_heldout": len(held),
                   "generation": counts, "generation_seconds": round(gen_seconds, 1),
                   "annotation_failures": dict(tally.failed),
                   "training": {n: {k: v for k, v in info.items() if k != "losses"} for n, (_, info) in trained.items()},
                   "eval_samples": len(eval_rows), "table": table.to_dict("records")}
        provenance.write_json_atomic(run.dir / "dress.json", summary)
        run.extra.update({k: v for k, v in summary.items() if k != "table"} | {"seconds": round(time.time() - t0, 1)})
    return DressResult(dir=run.dir, trajectories=trajs, stats=stats, table=table, free=free, curves=curves,
                       seconds=time.time() - t0)
