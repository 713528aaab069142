"""Stage 06: FIRE-Bench, fixed- and free-dialogue evaluation with bootstrap confidence intervals.

    from fire_core import config
    from fire_core.stages import firebench as stage_firebench
    result = stage_firebench.run(config.load("06_fire_bench", ["scale=smoke"]))
    result.free        # DataFrame: provider, model, subset, AT, AT_rel, ADR, ATR, RR, ... (+ CIs)

Test data: the seen families' test split and the unseen families (never trained on), as
FIRE-Bench's 8 seen + 8 new sources. Gold dialogues for the fixed setting are written by the
oracle on those test samples, from the base VLM's first answers (never on training samples).

- Fixed dialogue, student: every gold student turn is generated from the gold history and
  compared with the gold turn (BLEU-1..4, CIDEr, METEOR, ROUGE-L); reported over all turns and
  over the refinement turns (2+) alone, since turn 1 of the gold is the base VLM's own answer.
- Fixed dialogue, teacher: every gold teacher turn from the gold history (score MAE with an
  unparsable score counted as 10, failed-to-follow count, BLEU/CIDEr of the feedback).
- Free dialogue: each student talks with each feedback provider (the trained teacher, and the
  oracle) through the dialogue engine; AT (also relative to the base model), ADR, ATR, RR and
  RR_conditional (definitions in :mod:`fire_core.eval`), the same with "satisfied" decided by
  the answer checker, teacher-vs-truth agreement, and the share solved by turn t. Every
  headline number carries a bootstrap 95% interval (dialogues resampled), per provider, model,
  seen/unseen and family.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fire_core import dialogue, files, metrics, models, plots, provenance, records, world
from fire_core import eval as evaluate
from fire_core.config import FireConfig
from fire_core.metrics import HEADLINE, bootstrap_metrics, paired_bootstrap, solved_by_turn
from fire_core.stages import common as stage_common

log = logging.getLogger(__name__)



@dataclass
class BenchResult:
    dir: Path
    free: Any  # DataFrame
    per_family: Any
    fixed_student: Any
    fixed_teacher: Any
    curves: dict[str, Any]
    paired: Any  # DataFrame: B minus A with paired-bootstrap intervals
    seconds: float


def run(cfg: FireConfig) -> BenchResult:
    """Stage 06 (see the module docstring)."""
    import matplotlib.pyplot as plt
    import pandas as pd


    t0 = time.time()
    if cfg.data.source == "hub":
        return _released(cfg, t0)
    dirs = {s: provenance.require_stage(cfg, s) for s in ("00_build_world", "01_train_base_vlm", "03_train_teacher",
                                                          "04_train_student", "05_simulate_fire1m")}
    ds = world.load(cfg)
    b, d = cfg.bench, cfg.dialogue
    seen = ds["test"].select(sorted(records.select_per_family(ds["test"], cfg.world.seen_families, b.per_family, cfg.seed)))
    unseen = ds["unseen"].select(sorted(records.select_per_family(ds["unseen"], cfg.world.unseen_families, b.per_family,
                                                                cfg.seed)))
    rows = list(seen) + list(unseen)
    images = {r["id"]: r["image"].convert("RGB") for r in rows}
    seen_fams = set(cfg.world.seen_families)
    with provenance.stage_run(cfg, inputs=[dirs["00_build_world"] / "dataset", dirs["01_train_base_vlm"] / "model",
                                           dirs["03_train_teacher"] / "model", dirs["04_train_student"] / "model",
                                           dirs["05_simulate_fire1m"] / "fire_student"]) as run:
        # one student in memory at a time, beside the teacher (a GPU holds at most two models)
        student_dirs = {"base": None, "fire100k_student": dirs["04_train_student"] / "model",
                        "fire_student": dirs["05_simulate_fire1m"] / "fire_student"}
        base = stage_common.load_base(cfg, dirs["01_train_base_vlm"])
        # gold dialogues (fixed setting): the oracle on the test samples
        gold = stage_common.gold_dialogues(rows, *base, cfg)
        files.write_jsonl(run.dir / "gold_dialogues.jsonl", gold)
        teacher = models.load(dirs["03_train_teacher"] / "model")
        providers = {"teacher": dialogue.hf_role("teacher", *teacher, d.teacher_max_new_tokens, d.cache_prefix),
                     "oracle": dialogue.oracle_role()}
        fixed_rows, fixed_preds, free_by = [], [], {}
        for name, path in student_dirs.items():
            m, p = base if path is None else models.load(path)
            # fixed dialogue: the student's turns from the gold history
            preds = evaluate.student_fixed(m, p, gold, images, d.student_max_new_tokens, cfg.model.generate_batch_size, desc=f"{name} fixed")
            fixed_rows += fixed_student_rows(name, preds)
            fixed_preds += [{**x, "model": name} for x in preds]
            # free dialogue: the student with every feedback provider
            s_role = dialogue.hf_role(name, m, p, d.student_max_new_tokens, d.cache_prefix)
            for prov, t_role in providers.items():
                rid = lambda i, name=name, prov=prov: files.request_id(i, "firebench", name, prov)  # noqa: E731
                res = dialogue.run(records.world_samples(rows, rid), s_role, t_role, d, cfg.seed,
                                   source=f"{name}x{prov}", total=len(rows))
                free_by[(prov, name)] = [{**r, "provider": prov, "model": name} for r in res.records]
            del m, p, s_role
            base = None if path is None else base
            _release()
        fixed_student = pd.DataFrame(fixed_rows)
        fixed_student.to_csv(run.dir / "fixed_student.csv", index=False, float_format="%.4f")
        # fixed dialogue: the teacher
        t_turns = evaluate.teacher_fixed(*teacher, gold, images, d.teacher_max_new_tokens, cfg.model.generate_batch_size,
                                         d.score_min, d.score_max)
        t_rows = []
        for subset, sel in (("all", t_turns), ("seen", [t for t in t_turns if t["family"] in seen_fams]),
                            ("unseen", [t for t in t_turns if t["family"] not in seen_fams])):
            if sel:
                t_rows.append({"subset": subset, **evaluate.teacher_summary(sel, d.threshold)})
        fixed_teacher = pd.DataFrame(t_rows)
        fixed_teacher.to_csv(run.dir / "fixed_teacher.csv", index=False, float_format="%.4f")
        files.write_jsonl(run.dir / "fixed_predictions.jsonl", fixed_preds + [{**t, "model": "teacher"} for t in t_turns])
        roles = list(student_dirs)
        if b.extra_student_endpoint:
            extra = dialogue.openai_role(b.extra_student_model, b.extra_student_endpoint, b.extra_student_api_key_env,
                                         d.concurrency, d.timeout_s, d.max_retries, d.student_max_new_tokens)
            roles.append(b.extra_student_model)
            for prov, t_role in providers.items():
                rid = lambda i, prov=prov: files.request_id(i, "firebench", extra.name, prov)  # noqa: E731
                res = dialogue.run(records.world_samples(rows, rid), extra, t_role, d, cfg.seed,
                                   source=f"{extra.name}x{prov}", total=len(rows))
                free_by[(prov, extra.name)] = [{**r, "provider": prov, "model": extra.name} for r in res.records]
        free_records = [r for prov in providers for name in roles for r in free_by[(prov, name)]]
        files.write_jsonl(run.dir / "free_dialogues.jsonl", free_records)
        # tables with confidence intervals
        table, fam_rows, curves = [], [], {}
        for prov in providers:
            base_at: dict[str, float] = {}  # per subset
            for name in roles:
                recs = [r for r in free_records if r["provider"] == prov and r["model"] == name]
                for subset, sel in (("all", recs), ("seen", [r for r in recs if r["task"] in seen_fams]),
                                    ("unseen", [r for r in recs if r["task"] not in seen_fams])):
                    if not sel:
                        continue
                    m = bootstrap_metrics(sel, d.threshold, d.max_turns, b.n_bootstrap, b.ci, cfg.seed)
                    if name == "base":
                        base_at[subset] = m["AT"]
                    table.append({"provider": prov, "model": name, "subset": subset, **m})
                for fam in [*cfg.world.seen_families, *cfg.world.unseen_families]:
                    sel = [r for r in recs if r["task"] == fam]
                    if sel:
                        fam_rows.append({"provider": prov, "model": name, "family": fam, "seen": fam in seen_fams,
                                         **bootstrap_metrics(sel, d.threshold, d.max_turns, b.n_bootstrap, b.ci, cfg.seed)})
                curves[f"{prov}/{name}"] = solved_by_turn(recs, d.threshold, d.max_turns)
            for row in table:
                if row["provider"] == prov and base_at.get(row["subset"]):
                    row["AT_rel"] = row["AT"] / base_at[row["subset"]]  # the poster's: base = 1.00
        free = pd.DataFrame(table)
        per_family = pd.DataFrame(fam_rows)
        paired = paired_differences(free_records, list(providers), seen_fams, cfg)
        free.to_csv(run.dir / "free_dialogue.csv", index=False, float_format="%.4f")
        paired.to_csv(run.dir / "paired_differences.csv", index=False, float_format="%.4f")
        per_family.to_csv(run.dir / "free_dialogue_per_family.csv", index=False, float_format="%.4f")
        provenance.write_json_atomic(run.dir / "solved_by_turn_curves.json", curves)
        # figures: per-turn curves, and example dialogues
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
        turns = list(range(1, d.max_turns + 1))
        for ax, kind in zip(axes, ("teacher", "truth"), strict=True):
            for key, c in curves.items():
                ax.plot(turns, c[kind], marker="o", label=key, linestyle="-" if key.startswith("teacher") else "--")
            what = f"teacher score >= {d.threshold}" if kind == "teacher" else "answer correct"
            ax.set(xlabel="turn", title=f"solved by turn ({what})", xticks=turns)
        axes[0].set_ylabel("share of dialogues")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        plots.save(fig, run.dir / "solved_by_turn", sources=[run.dir / "free_dialogue.csv", run.dir / "solved_by_turn_curves.json"],
                   cfg=cfg)
        examples = pick_examples(free_records, 3)
        _example_figure(examples, images, run.dir / "example_dialogues", cfg)
        summary = {"test_dialogues": len(rows), "gold_dialogues": len(gold),
                   "headline": free[free.subset == "all"][["provider", "model", *HEADLINE, "AT_rel"]].to_dict("records"),
                   "paired_all": paired[paired.subset == "all"][
                       ["provider", "model_a", "model_b", *[f"{k}{e}" for k in HEADLINE for e in ("", "_lo", "_hi")]]
                   ].to_dict("records"),
                   "examples": [e["id"] for e in examples]}
        provenance.write_json_atomic(run.dir / "fire_bench.json", summary)
        run.extra.update({**summary, "seconds": round(time.time() - t0, 1)})
    return BenchResult(dir=run.dir, free=free, per_family=per_family, fixed_student=fixed_student,
                       fixed_teacher=fixed_teacher, curves=curves, paired=paired, seconds=time.time() - t0)


def _release() -> None:
    """Give a dropped model's memory back (the GPU's cache too) before the next one loads."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fixed_student_rows(name: str, preds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Text metrics of one student's fixed-dialogue turns against the gold ones: over all turns,
    and over turns 2+ alone (turn 1 of the gold is the base VLM's own answer)."""
    rows = []
    for subset, sel in (("all turns", preds), ("turns 2+", [x for x in preds if x["turn"] > 1])):
        if sel:
            key = lambda x: f"{x['id']}#{x['turn']}"  # noqa: E731
            rows.append({"model": name, "turns": subset, "n": len(sel), **metrics.text_metrics(
                {key(x): x["prediction"] for x in sel}, {key(x): x["reference"] for x in sel}, meteor_rouge=True)})
    return rows


# (model A, model B) pairs compared on the same samples: the paper's orderings
PAIRS = (("base", "fire100k_student"), ("fire100k_student", "fire_student"), ("base", "fire_student"))


def paired_differences(free_records, providers: list[str], seen_fams: set[str], cfg: FireConfig):
    """B minus A on every free-dialogue metric, per provider and subset, with the paired
    bootstrap interval (both models answered the same samples): the test of "B is better"."""
    import pandas as pd

    b, d = cfg.bench, cfg.dialogue
    rows = []
    for prov in providers:
        for model_a, model_b in PAIRS:
            recs = {m: [r for r in free_records if r["provider"] == prov and r["model"] == m] for m in (model_a, model_b)}
            for subset, keep in (("all", lambda r: True), ("seen", lambda r: r["task"] in seen_fams),
                                 ("unseen", lambda r: r["task"] not in seen_fams)):
                sel_a = [r for r in recs[model_a] if keep(r)]
                sel_b = [r for r in recs[model_b] if keep(r)]
                if sel_a and sel_b:
                    rows.append({"provider": prov, "model_a": model_a, "model_b": model_b, "subset": subset,
                                 **paired_bootstrap(sel_a, sel_b, d.threshold, d.max_turns, b.n_bootstrap, b.ci, cfg.seed)})
    return pd.DataFrame(rows)


def pick_examples(records, k: int, providers=("teacher", "oracle")) -> list[dict[str, Any]]:
    """Samples where the base model repeats a wrong answer and the FIRE student ends correct:
    (base dialogue, FIRE-student dialogue) on the same sample with the same provider, looked for
    with each provider in turn; then any sample the FIRE student solved after turn 1."""
    by = {(r["provider"], r["model"], r["id"]): r for r in records}
    out, fallback = [], []
    for provider in providers:
        for (prov, model, sid), r in sorted(by.items()):
            if prov != provider or model != "fire_student":
                continue
            b = by.get((prov, "base", sid))
            if b is None or not r["turns"][-1]["correct"] or len(r["turns"]) < 2 or r["turns"][0]["correct"]:
                continue
            resp = [t["response"] for t in b["turns"]]
            repeats = len(resp) > 1 and len(set(resp)) < len(resp) and not any(t["correct"] for t in b["turns"])
            (out if repeats else fallback).append({"id": sid, "provider": prov, "base": b, "fire_student": r})
    return (out + fallback)[:k]


def _example_figure(examples, images, stem: Path, cfg) -> None:
    import matplotlib.pyplot as plt


    n = max(1, len(examples))
    fig, axes = plt.subplots(n, 3, figsize=(15, 2.6 * n), squeeze=False, gridspec_kw={"width_ratios": [1, 3, 3]})
    for row, ex in zip(axes, examples, strict=False):
        row[0].imshow(images[ex["id"]], interpolation="nearest")
        row[0].axis("off")
        for ax, who in zip(row[1:], ("base", "fire_student"), strict=True):
            r = ex[who]
            lines = [f"{who} with the {ex['provider']}   Q: {r['question'].splitlines()[0][:60]}  (truth: {r['answer']})"]
            for k, t in enumerate(r["turns"], 1):
                mark = "+" if t["correct"] else "-"
                lines.append(f"S{k}{mark} {t['response'][:80]}")
                lines.append(f"T{k}  Score {t['score']}. {t['feedback'][:75]}")
            ax.text(0, 0.5, "\n".join(lines), va="center", fontsize=6.5, family="monospace")
            ax.axis("off")
    if not examples:
        for ax in axes[0]:
            ax.axis("off")
        axes[0][1].text(0, 0.5, "no sample where the FIRE student refined to a correct answer", va="center")
    fig.tight_layout()
    plots.save(fig, stem, sources=[stem.parent / "free_dialogues.jsonl"], cfg=cfg)


def paper_table(free, provider: str, subset: str = "all"):
    """The paper's layout: models as rows; AT, AT relative to base, ADR, ATR, RR and
    RR_conditional as 'value [low, high]' strings."""
    import pandas as pd

    t = free[(free.provider == provider) & (free.subset == subset)]
    show = pd.DataFrame({k: [f"{r[k]:.2f} [{r[k + '_lo']:.2f}, {r[k + '_hi']:.2f}]" for _, r in t.iterrows()]
                         for k in HEADLINE}, index=pd.Index(t.model, name="model"))
    if "AT_rel" in t:
        show.insert(1, "AT_rel", t.AT_rel.round(2).values)
    return show


def _released(cfg: FireConfig, t0: float) -> BenchResult:
    """``data.source=hub``: FIRE-Bench on the released FIRE-test. The fixed setting replays its
    gold conversations (student and teacher turns); the free setting runs each student with the
    trained teacher, judged by the teacher's score alone, as the paper does (no oracle, no
    checker: real data has neither). Models are loaded one at a time beside the teacher, so a GPU
    holds at most two."""
    import pandas as pd

    dirs = {s: provenance.require_stage(cfg, s) for s in ("01_train_base_vlm", "03_train_teacher",
                                                          "04_train_student", "05_simulate_fire1m")}
    b, d = cfg.bench, cfg.dialogue
    src = cfg.data.files()["fire_test"]
    gold = stage_common.hub_fire(cfg, "fire_test", "test")
    gold_scored = [r for r in gold if all(t["score"] is not None for t in r["turns"])]
    images = {r["id"]: records.open_image(r["image"]) for r in gold}
    student_dirs = {"base": None, "fire100k_student": dirs["04_train_student"] / "model",
                    "fire_student": dirs["05_simulate_fire1m"] / "fire_student"}

    def load_student(name):
        if student_dirs[name] is None:
            return stage_common.load_base(cfg, dirs["01_train_base_vlm"])
        return models.load(student_dirs[name])

    with provenance.stage_run(cfg, inputs=[src, dirs["01_train_base_vlm"] / "model", dirs["03_train_teacher"] / "model",
                                           *[p for p in student_dirs.values() if p is not None]]) as run:
        files.write_jsonl(run.dir / "gold_dialogues.jsonl", gold)
        teacher = models.load(dirs["03_train_teacher"] / "model")
        t_turns = evaluate.teacher_fixed(*teacher, gold_scored, images, d.teacher_max_new_tokens,
                                         cfg.model.generate_batch_size, d.score_min, d.score_max) if gold_scored else []
        fixed_teacher = pd.DataFrame([{"subset": "all", **evaluate.teacher_summary(t_turns, d.threshold)}] if t_turns else [])
        t_role = dialogue.hf_role("teacher", *teacher, d.teacher_max_new_tokens, d.cache_prefix)
        fixed_rows, fixed_preds, free_records = [], [], []
        for name in student_dirs:  # one student in memory at a time, beside the teacher
            m, p = load_student(name)
            preds = evaluate.student_fixed(m, p, gold, images, d.student_max_new_tokens, cfg.model.generate_batch_size,
                                           desc=f"{name} fixed")
            fixed_rows += fixed_student_rows(name, preds)
            fixed_preds += [{**x, "model": name} for x in preds]
            s_role = dialogue.hf_role(name, m, p, d.student_max_new_tokens, d.cache_prefix)
            rid = lambda i, name=name: files.request_id(i, "firebench", name, "teacher")  # noqa: E731
            res = dialogue.run(stage_common.hub_samples(gold, rid, images), s_role, t_role, d, cfg.seed,
                               source=f"{name}xteacher", total=len(gold))
            free_records += [{**r, "provider": "teacher", "model": name} for r in res.records]
            del m, p, s_role
            _release()
        fixed_student = pd.DataFrame(fixed_rows)
        fixed_student.to_csv(run.dir / "fixed_student.csv", index=False, float_format="%.4f")
        fixed_teacher.to_csv(run.dir / "fixed_teacher.csv", index=False, float_format="%.4f")
        files.write_jsonl(run.dir / "fixed_predictions.jsonl", fixed_preds + [{**t, "model": "teacher"} for t in t_turns])
        files.write_jsonl(run.dir / "free_dialogues.jsonl", free_records)
        table, curves = [], {}
        for name in student_dirs:
            recs = [r for r in free_records if r["model"] == name]
            table.append({"provider": "teacher", "model": name, "subset": "all",
                          **bootstrap_metrics(recs, d.threshold, d.max_turns, b.n_bootstrap, b.ci, cfg.seed)})
            curves[f"teacher/{name}"] = solved_by_turn(recs, d.threshold, d.max_turns)
        free = pd.DataFrame(table)
        base_at = free.loc[free.model == "base", "AT"].iloc[0]
        free["AT_rel"] = free["AT"] / base_at if base_at else float("nan")
        paired = pd.DataFrame([{"provider": "teacher", "model_a": a, "model_b": bb, "subset": "all",
                                **paired_bootstrap([r for r in free_records if r["model"] == a],
                                                   [r for r in free_records if r["model"] == bb],
                                                   d.threshold, d.max_turns, b.n_bootstrap, b.ci, cfg.seed)}
                               for a, bb in PAIRS])
        free.to_csv(run.dir / "free_dialogue.csv", index=False, float_format="%.4f")
        paired.to_csv(run.dir / "paired_differences.csv", index=False, float_format="%.4f")
        provenance.write_json_atomic(run.dir / "solved_by_turn_curves.json", curves)
        summary = {"data": "hub", "source": str(src), "test_dialogues": len(gold),
                   "headline": free[["provider", "model", *HEADLINE, "AT_rel"]].to_dict("records"),
                   "not_run": "oracle provider and answer-checker metrics (real data has neither)"}
        provenance.write_json_atomic(run.dir / "fire_bench.json", summary)
        run.extra.update({**summary, "seconds": round(time.time() - t0, 1)})
    return BenchResult(dir=run.dir, free=free, per_family=None, fixed_student=fixed_student,
                       fixed_teacher=fixed_teacher, curves=curves, paired=paired, seconds=time.time() - t0)
