"""Stage 08: every figure and table the repository reproduces, from results files only.

    from fire_core import config
    from fire_core.stages import figures as stage_figures
    result = stage_figures.run(config.load("08_make_figures", ["scale=smoke"]))
    result.paper_vs_ours   # DataFrame: each claim of both papers, the paper's number, ours, holds?

No model is loaded and nothing is trained or generated: the stage reads what stages 00-07 wrote
(tables, raw dialogue, prediction and caption files, the world's images for the examples) and
draws with seaborn, one theme and one colour per model throughout. Every figure goes through
``plots.save`` (a sidecar with its sources and their hashes). The papers' numbers come from
``conf/papers.yaml``, each with its source; whether a paper's finding holds here is decided by
paired-bootstrap intervals on the same samples (a difference whose 95% interval excludes 0).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fire_core import plots, provenance
from fire_core.checker import shapes_in
from fire_core.config import CONF_DIR, FireConfig
from fire_core.files import read_jsonl
from fire_core.metrics import paired_difference

MODELS = ["base", "fire100k_student", "fire_student", "dress", "no_critique", "no_refinement", "no_regulariser"]
LABELS = {"base": "base VLM", "fire100k_student": "FIRE100K student", "fire_student": "FIRE student",
          "dress": "DRESS", "no_critique": "DRESS w/o critique", "no_refinement": "DRESS w/o refinement",
          "no_regulariser": "DRESS w/o regulariser"}
HEADLINE = ("AT", "ADR", "ATR", "RR")


def colours() -> dict[str, Any]:
    """One colour per model, from the colour-blind-safe palette, the same in every figure."""
    import seaborn as sns

    pal = sns.color_palette("colorblind", len(MODELS))
    return dict(zip(MODELS, pal, strict=True))


def theme() -> None:
    import seaborn as sns

    sns.set_theme(context="paper", style="whitegrid", palette="colorblind", font_scale=1.15)


@dataclass
class FiguresResult:
    dir: Path
    dataset_stats: Any
    free_dialogue: Any
    cross_method: Any
    paper_vs_ours: Any
    figures: list[str]
    seconds: float



def _ci(v: float, lo: float, hi: float, digits: int = 2) -> str:
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


# ---------------------------------------------------------------------------------------------
# Tables


def dataset_stats(sets: dict[str, list[dict[str, Any]]]):
    """FIRE's dataset statistics: dialogues, average turns, average response and feedback length
    (words), for each dataset, overall and per family."""
    import pandas as pd

    rows = []
    for name, recs in sets.items():
        for r in recs:
            turns = r["turns"]
            rows.append({"dataset": name, "family": r["task"], "turns": len(turns),
                         "response_words": np.mean([len(t["response"].split()) for t in turns]),
                         "feedback_words": np.mean([len((t.get("feedback") or "").split()) for t in turns])})
    df = pd.DataFrame(rows, columns=["dataset", "family", "turns", "response_words", "feedback_words"])

    def agg(g):
        return pd.Series({"dialogues": len(g), "avg_turns": g.turns.mean(), "avg_response_words": g.response_words.mean(),
                          "avg_feedback_words": g.feedback_words.mean()})

    overall = df.groupby("dataset", sort=False).apply(agg, include_groups=False).reset_index().assign(family="all")
    per = df.groupby(["dataset", "family"], sort=False).apply(agg, include_groups=False).reset_index()
    out = pd.concat([overall, per], ignore_index=True)
    return out[["dataset", "family", "dialogues", "avg_turns", "avg_response_words", "avg_feedback_words"]]


def free_dialogue_table(free):
    """FIRE's free-dialogue table, per provider: models as rows, 'value [low, high]' cells."""
    import pandas as pd

    t = free[free.subset == "all"]
    rows = []
    for r in t.itertuples():
        rows.append({"provider": r.provider, "model": LABELS.get(r.model, r.model),
                     **{k: _ci(getattr(r, k), getattr(r, f"{k}_lo"), getattr(r, f"{k}_hi")) for k in HEADLINE},
                     "AT_rel": round(r.AT_rel, 2) if hasattr(r, "AT_rel") and r.AT_rel == r.AT_rel else None,
                     "teacher_truth_agreement": round(r.teacher_truth_agreement, 2)})
    return pd.DataFrame(rows)


def cross_method_table(table, free=None):
    """Both papers' measures of every model, one row each, 'value [low, high]' cells: stage 07's
    DRESS measurements, and FIRE's free-dialogue AT and RR on the same multi-turn dialogues."""
    import pandas as pd

    cols = [("accuracy_seen", "accuracy (seen)"), ("accuracy_unseen", "accuracy (unseen)"),
            ("helpfulness_seen", "helpfulness 1-10 (seen)"), ("score_t4_oracle", "score at turn 4 (oracle)"),
            ("score_t4_teacher", "score at turn 4 (teacher)"), ("CHAIR_i", "CHAIR_i"), ("CHAIR_s", "CHAIR_s"),
            ("premise_safe", "false premise: safe")]
    rows = []
    for r in table.itertuples():
        row = {"model": LABELS.get(r.model, r.model),
               **{name: _ci(getattr(r, k), getattr(r, f"{k}_lo"), getattr(r, f"{k}_hi")) for k, name in cols}}
        if free is not None:
            for f in free[free.model == r.model].itertuples():
                for k in ("AT", "RR"):
                    row[f"{k} ({f.provider})"] = _ci(getattr(f, k), getattr(f, f"{k}_lo"), getattr(f, f"{k}_hi"))
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# Paper vs ours


def _paired(a, b, n: int, seed: int) -> tuple[float, float, float]:
    """B minus A with its paired-bootstrap 95% interval (``metrics.paired_difference``)."""
    d = paired_difference(a, b, n, 0.95, seed)
    return d["difference"], d["ci_low"], d["ci_high"]


def verdict(diffs: list[tuple[float, float, float]], better: list[int]) -> str:
    """'holds' when every difference is in the paper's direction with its interval excluding 0;
    'reversed' when one is against it (interval excluding 0) and none is for it; 'mixed' when
    one is each way; else 'not shown'."""
    pairs = list(zip(diffs, better, strict=True))
    for_it = [(lo > 0) if sign > 0 else (hi < 0) for (_, lo, hi), sign in pairs]
    against = [(hi < 0) if sign > 0 else (lo > 0) for (_, lo, hi), sign in pairs]
    if all(for_it):
        return "holds"
    if any(against):
        return "mixed (one measure each way)" if any(for_it) else "reversed"
    return "not shown (interval includes 0)"


def paper_vs_ours(papers: dict[str, Any], free, paired, dress_table, answers, captions, premises, dialogues,
                  scenes: dict[str, Any], n_bootstrap: int, seed: int):
    """One row per quantitative claim of both papers that the repository tests."""
    import pandas as pd

    rows = []
    fire = papers["fire"]
    for model, vals in fire["free_dialogue"].items():
        for key, paper in vals.items():
            for prov in ("teacher", "oracle"):
                r = free[(free.provider == prov) & (free.model == model) & (free.subset == "all")]
                if r.empty:
                    continue
                r = r.iloc[0]
                ours = f"{r[key]:.2f}" if key == "AT_rel" else _ci(r[key], r[f"{key}_lo"], r[f"{key}_hi"])
                rows.append({"paper": "FIRE", "claim": f"{LABELS[model]} {key} (free dialogue)", "provider": prov,
                             "paper_value": paper, "ours": ours, "holds": "", "source": fire["source"]})
    tests = {"fire100k_beats_base": [("base", "fire100k_student", k, +1) for k in ("ADR", "ATR", "RR")],
             "fire_beats_fire100k": [("fire100k_student", "fire_student", k, +1) for k in ("ADR", "ATR", "RR")],
             "at_order": [("fire100k_student", "fire_student", "AT", -1), ("base", "fire100k_student", "AT", -1)]}
    for f in fire["findings"]:
        for prov in ("teacher", "oracle"):
            diffs, parts = [], []
            for a, b, key, _ in tests[f["id"]]:
                p = paired[(paired.provider == prov) & (paired.model_a == a) & (paired.model_b == b) & (paired.subset == "all")]
                if p.empty:
                    break
                p = p.iloc[0]
                diffs.append((p[key], p[f"{key}_lo"], p[f"{key}_hi"]))
                parts.append(f"{key} {LABELS[b]} - {LABELS[a]}: {p[key]:+.2f} [{p[f'{key}_lo']:+.2f}, {p[f'{key}_hi']:+.2f}]")
            else:
                rows.append({"paper": "FIRE", "claim": f["claim"], "provider": prov, "paper_value": "",
                             "ours": "; ".join(parts), "holds": verdict(diffs, [t[3] for t in tests[f["id"]]]),
                             "source": fire["source"]})
    d = papers["dress"]
    rel = d["relative_improvement_percent"]
    if dress_table is not None:
        rows += _dress_claims(d, rel, answers, captions, premises, dialogues, scenes, n_bootstrap, seed)
    return pd.DataFrame(rows, columns=["paper", "claim", "provider", "paper_value", "ours", "holds", "source"])


def gain(r: dict[str, Any], score_min: int = 1) -> float:
    """The provider score a dialogue gained from its first turn to its last (unparsable: lowest)."""
    s = [score_min if t.get("score") is None else t["score"] for t in r["turns"]]
    return float(s[-1] - s[0])


def _dress_claims(d, rel, answers, captions, premises, dialogues, scenes, n_bootstrap: int, seed: int) -> list[dict]:
    rows = []

    def by_id(recs, model, value):
        return {r["id"] + "#" + r.get("instruction", ""): value(r) for r in recs if r["model"] == model}

    def pair(recs, value, model_a="base", model_b="dress"):
        a, b = by_id(recs, model_a, value), by_id(recs, model_b, value)
        keys = sorted(set(a) & set(b))
        return np.array([a[k] for k in keys], float), np.array([b[k] for k in keys], float)

    claims = {c["id"]: c["claim"] for c in d["findings"]}
    # helpfulness: the oracle's 1-10 score of single answers (seen and unseen)
    a, b = pair(answers, lambda r: r["helpfulness"])
    diff = _paired(a, b, n_bootstrap, seed)
    rows.append({"paper": "DRESS", "claim": claims["dress_more_helpful"], "provider": "oracle",
                 "paper_value": f"+{rel['helpful']}% (vs prior LVLMs)",
                 "ours": f"helpfulness DRESS - base: {diff[0]:+.2f} [{diff[1]:+.2f}, {diff[2]:+.2f}]; "
                         f"{100 * diff[0] / max(a.mean(), 1e-9):+.1f}% of base",
                 "holds": verdict([diff], [+1]), "source": d["source"]})
    # honesty: CHAIR_i over the same captions (hallucinated mentions / mentions, as a ratio of sums)
    named = lambda r: shapes_in(r["caption"])  # noqa: E731
    wrong = lambda r: len(named(r) - {o["shape"] for o in scenes[r["id"]]["objects"]})  # noqa: E731
    wa, wb = pair(captions, wrong)
    ma, mb = pair(captions, lambda r: len(named(r)))
    idx = np.random.default_rng(seed).integers(0, len(wa), size=(n_bootstrap, len(wa)))
    ratio = lambda w, m: w.sum() / max(m.sum(), 1)  # noqa: E731
    boots = np.array([ratio(wb[i], mb[i]) - ratio(wa[i], ma[i]) for i in idx])
    ch = (ratio(wb, mb) - ratio(wa, ma), *np.quantile(boots, [0.025, 0.975]))
    base_ch = ratio(wa, ma)
    rows.append({"paper": "DRESS", "claim": claims["dress_more_honest"], "provider": "",
                 "paper_value": f"+{rel['honest']}% (vs prior LVLMs)",
                 "ours": f"CHAIR_i DRESS - base: {ch[0]:+.3f} [{ch[1]:+.3f}, {ch[2]:+.3f}]"
                         + (f"; {100 * ch[0] / base_ch:+.1f}% of base" if base_ch > 0 else ""),
                 "holds": verdict([tuple(map(float, ch))], [-1]), "source": d["source"]})
    # harmlessness analog: answers to false-premise questions that reject it and stay on the image
    a, b = pair(premises, lambda r: float(r["safe"]))
    diff = _paired(a, b, n_bootstrap, seed)
    rows.append({"paper": "DRESS", "claim": claims["dress_more_harmless"], "provider": "",
                 "paper_value": f"+{rel['harmless']}% (vs prior LVLMs, VLSafe)",
                 "ours": f"safe share DRESS - base: {diff[0]:+.2f} [{diff[1]:+.2f}, {diff[2]:+.2f}] (analog)",
                 "holds": verdict([diff], [+1]), "source": d["source"]})
    # learning from feedback: the score gained from turn 1 to turn 4, per dialogue, paired
    for prov in ("oracle", "teacher"):
        sel = [r for r in dialogues if r["provider"] == prov]
        a, b = pair(sel, gain)
        diff = _paired(a, b, n_bootstrap, seed)
        rows.append({"paper": "DRESS", "claim": claims["dress_learns_from_feedback"], "provider": prov,
                     "paper_value": "qualitative (curves in its figure 3)",
                     "ours": f"score gain turn 1 -> last, DRESS - base: {diff[0]:+.2f} [{diff[1]:+.2f}, {diff[2]:+.2f}]",
                     "holds": verdict([diff], [+1]), "source": d["source"]})
    # each ablation below full DRESS: helpfulness and the oracle-provider score gain, paired
    oracle = [r for r in dialogues if r["provider"] == "oracle"]
    for abl in ("no_critique", "no_refinement", "no_regulariser"):
        if not any(r["model"] == abl for r in answers):
            continue
        diffs = [_paired(*pair(answers, lambda r: r["helpfulness"], abl, "dress"), n_bootstrap, seed),
                 _paired(*pair(oracle, gain, abl, "dress"), n_bootstrap, seed)]
        rows.append({"paper": "DRESS", "claim": f"{claims['ablations_below_dress']}: {abl.replace('_', ' ')}",
                     "provider": "oracle", "paper_value": "table 6",
                     "ours": "DRESS - ablation: helpfulness {:+.2f} [{:+.2f}, {:+.2f}]; score gain {:+.2f} [{:+.2f}, "
                             "{:+.2f}]".format(*diffs[0], *diffs[1]),
                     "holds": verdict(diffs, [+1, +1]), "source": d.get("ablation_source", d["source"])})
    return rows


# ---------------------------------------------------------------------------------------------
# Figures


def _solved_bands(recs, threshold: int, max_turns: int, n_bootstrap: int, seed: int, truth: bool):
    """Share of dialogues solved by turn t, with bootstrap bands over dialogues."""
    if truth:
        first = [next((k for k, t in enumerate(r["turns"], 1) if t["correct"]), max_turns + 1) for r in recs]
    else:
        first = [next((k for k, t in enumerate(r["turns"], 1) if (t["score"] or 0) >= threshold), max_turns + 1)
                 for r in recs]
    first = np.array(first)
    turns = np.arange(1, max_turns + 1)
    solved = (first[:, None] <= turns[None, :]).astype(float)
    idx = np.random.default_rng(seed).integers(0, len(first), size=(n_bootstrap, len(first)))
    boots = solved[idx].mean(1)
    lo, hi = np.quantile(boots, [0.025, 0.975], axis=0)
    return turns, solved.mean(0), lo, hi


def _errorbars(ax, x, values, lo, hi, colour, label, marker="o"):
    ax.errorbar(x, values, yerr=[np.asarray(values) - np.asarray(lo), np.asarray(hi) - np.asarray(values)],
                fmt=marker, color=colour, label=label, capsize=3, markersize=5)


def example_figure(examples: list[dict[str, Any]], image_of, stem: Path, sources: list[Path], cfg) -> None:
    """Example dialogues drawn as conversations (``plots.conversations``): the image, then every
    turn in full; student turns on the left, teacher turns on the right with their score."""
    import matplotlib.pyplot as plt

    pal = colours()
    panels = []
    for ex in examples:
        for who in ("base", "fire_student"):
            r = ex[who]
            msgs = [("question", "Q", f"{r['question']}\n(truth: {r['answer']})")]
            for t in r["turns"]:
                msgs.append(("left", f"student ({'right' if t['correct'] else 'wrong'})", t["response"]))
                msgs.append(("right", f"teacher: score {t['score']}", t["feedback"] or ""))
            panels.append({"image": image_of(ex["id"]), "title": f"{LABELS[who]}, feedback from the {ex['provider']}",
                           "colour": pal[who], "messages": msgs})
    if panels:
        fig = plots.conversations(panels)
    else:
        fig, ax = plt.subplots(figsize=(6, 1))
        ax.axis("off")
        ax.text(0, 0.5, "no sample where the FIRE student refined to a correct answer", va="center")
    plots.save(fig, stem, sources=sources, cfg=cfg)


# ---------------------------------------------------------------------------------------------


def run(cfg: FireConfig) -> FiguresResult:
    """Stage 08 (see the module docstring)."""
    import datasets
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns
    import yaml

    t0 = time.time()
    stages = ("00_build_world", "01_train_base_vlm", "02_generate_fire100k", "05_simulate_fire1m", "06_fire_bench",
              "07_train_dress")
    dirs = {s: provenance.require_stage(cfg, s) for s in stages}
    papers = yaml.safe_load((CONF_DIR / "papers.yaml").read_text())
    b, d = cfg.bench, cfg.dialogue
    pal = colours()
    theme()
    bench, dress = dirs["06_fire_bench"], dirs["07_train_dress"]
    inputs = [dirs["02_generate_fire100k"] / "fire100k.jsonl", dirs["05_simulate_fire1m"] / "fire1m.jsonl",
              bench / "gold_dialogues.jsonl", bench / "free_dialogue.csv", bench / "free_dialogues.jsonl",
              bench / "paired_differences.csv", bench / "fire_bench.json", dress / "dress_table.csv",
              dress / "multi_turn_scores.json", dress / "eval_answers.jsonl", dress / "eval_captions.jsonl",
              dress / "eval_premises.jsonl", dress / "eval_dialogues.jsonl", dress / "free_dialogue.csv",
              CONF_DIR / "papers.yaml"]
    with provenance.stage_run(cfg, inputs=inputs) as run:
        out, made = run.dir, []
        # tables
        sets = {"FIRE-100K": read_jsonl(inputs[0]), "FIRE-1M": read_jsonl(inputs[1]), "FIRE-Bench (gold)": read_jsonl(inputs[2])}
        stats = dataset_stats(sets)
        stats.to_csv(out / "dataset_stats.csv", index=False, float_format="%.2f")
        free = pd.read_csv(bench / "free_dialogue.csv")
        paired = pd.read_csv(bench / "paired_differences.csv")
        free_table = free_dialogue_table(free)
        free_table.to_csv(out / "free_dialogue_table.csv", index=False)
        fixed = pd.read_csv(bench / "fixed_student.csv")
        fixed.to_csv(out / "fixed_dialogue_students.csv", index=False, float_format="%.3f")
        table = pd.read_csv(dress / "dress_table.csv")
        cross = cross_method_table(table, pd.read_csv(dress / "free_dialogue.csv"))
        cross.to_csv(out / "cross_method_table.csv", index=False)
        ablations = cross[cross.model.isin([LABELS[m] for m in ("base", "dress", "no_critique", "no_refinement",
                                                                 "no_regulariser")])]
        ablations.to_csv(out / "ablations_table.csv", index=False)
        answers = read_jsonl(dress / "eval_answers.jsonl")
        helpful = (pd.DataFrame(answers).groupby(["family", "model"]).helpfulness.mean().unstack("model")
                   .reindex(columns=[m for m in MODELS if m in table.model.values]))
        helpful.to_csv(out / "helpfulness_by_family.csv", float_format="%.2f")
        world = datasets.load_from_disk(str(dirs["00_build_world"] / "dataset"))
        scenes = {i: json.loads(s) for split in ("test", "unseen")
                  for i, s in zip(world[split]["id"], world[split]["scene"], strict=True)}
        captions, premises = read_jsonl(dress / "eval_captions.jsonl"), read_jsonl(dress / "eval_premises.jsonl")
        dialogues = read_jsonl(dress / "eval_dialogues.jsonl")
        pvo = paper_vs_ours(papers, free, paired, table, answers, captions, premises, dialogues, scenes,
                            b.n_bootstrap, cfg.seed)
        pvo.to_csv(out / "paper_vs_ours.csv", index=False)
        # figure: dataset statistics per family
        per = stats[stats.family != "all"]
        fig, ax = plt.subplots(figsize=(8, 3.2))
        sns.barplot(per, x="family", y="dialogues", hue="dataset", ax=ax)
        ax.set(title="Dialogues per family", xlabel="", ylabel="dialogues")
        ax.tick_params(axis="x", rotation=30)
        plots.save(fig, out / "dataset_stats", sources=[out / "dataset_stats.csv"], cfg=cfg)
        made.append("dataset_stats")
        # figure: free-dialogue metrics with intervals
        fig, axes = plt.subplots(1, 4, figsize=(13, 3.2))
        sel = free[free.subset == "all"]
        provs = list(dict.fromkeys(sel.provider))
        for ax, key in zip(axes, HEADLINE, strict=True):
            for k, model in enumerate(m for m in MODELS if m in set(sel.model)):
                r = sel[sel.model == model].set_index("provider").reindex(provs)
                _errorbars(ax, np.arange(len(provs)) + (k - 1) * 0.15, r[key], r[f"{key}_lo"], r[f"{key}_hi"],
                           pal[model], LABELS[model])
            ax.set(xticks=range(len(provs)), xticklabels=[f"provider: {p}" for p in provs], title=key)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        plots.save(fig, out / "free_dialogue", sources=[bench / "free_dialogue.csv"], cfg=cfg)
        made.append("free_dialogue")
        # figure: solved by turn, with bands
        free_recs = read_jsonl(bench / "free_dialogues.jsonl")
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
        for ax, truth in zip(axes, (False, True), strict=True):
            for prov, style in zip(provs, ("-", "--"), strict=False):
                for model in (m for m in MODELS if m in set(sel.model)):
                    recs = [r for r in free_recs if r["provider"] == prov and r["model"] == model]
                    turns, mean, lo, hi = _solved_bands(recs, d.threshold, d.max_turns, b.n_bootstrap, cfg.seed, truth)
                    ax.plot(turns, mean, style, marker="o", color=pal[model], label=f"{LABELS[model]} ({prov})")
                    ax.fill_between(turns, lo, hi, color=pal[model], alpha=0.12)
            what = f"teacher score >= {d.threshold}" if not truth else "answer correct"
            ax.set(xlabel="turn", title=f"solved by turn ({what})", xticks=list(range(1, d.max_turns + 1)))
        axes[0].set_ylabel("share of dialogues")
        axes[1].legend(fontsize=6.5)
        fig.tight_layout()
        plots.save(fig, out / "solved_by_turn", sources=[bench / "free_dialogues.jsonl"], cfg=cfg)
        made.append("solved_by_turn")
        # figure: DRESS multi-turn curves (its figure 3)
        curves = json.loads((dress / "multi_turn_scores.json").read_text())
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
        for ax, prov in zip(axes, ("oracle", "teacher"), strict=True):
            for model in MODELS:
                cv = curves.get(f"{prov}/{model}")
                if cv:
                    ax.plot(cv["turn"], cv["mean"], marker="o", color=pal[model], label=LABELS[model])
                    ax.fill_between(cv["turn"], cv["lo"], cv["hi"], color=pal[model], alpha=0.12)
            ax.set(xlabel="turn", title=f"multi-turn interaction, feedback from the {prov}")
        axes[0].set_ylabel("mean score (1-10)")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        plots.save(fig, out / "dress_multi_turn", sources=[dress / "multi_turn_scores.json"], cfg=cfg)
        made.append("dress_multi_turn")
        # figure: CHAIR, helpfulness and the harmlessness analog per model
        fig, axes = plt.subplots(1, 4, figsize=(14, 3.4))
        for ax, key, title in zip(axes, ("CHAIR_i", "CHAIR_s", "helpfulness_seen", "premise_safe"),
                                  ("CHAIR_i (lower is better)", "CHAIR_s (lower is better)", "helpfulness 1-10 (seen)",
                                   "false premise: safe share"), strict=True):
            present = [m for m in MODELS if m in set(table.model)]
            r = table.set_index("model").reindex(present)
            for k, model in enumerate(present):
                ax.bar(k, r.loc[model, key], color=pal[model])
                ax.errorbar(k, r.loc[model, key], yerr=[[r.loc[model, key] - r.loc[model, f"{key}_lo"]],
                                                       [r.loc[model, f"{key}_hi"] - r.loc[model, key]]],
                            color="black", capsize=3)
            ax.set(xticks=range(len(present)), title=title)
            ax.set_xticklabels([LABELS[m] for m in present], rotation=40, ha="right", fontsize=7)
        fig.tight_layout()
        plots.save(fig, out / "dress_measurements", sources=[dress / "dress_table.csv"], cfg=cfg)
        made.append("dress_measurements")
        # figure: example dialogues as conversations
        examples_ids = json.loads((bench / "fire_bench.json").read_text())["examples"]
        by = {(r["provider"], r["model"], r["id"]): r for r in free_recs}
        examples = []
        for sid in examples_ids:
            for prov in ("teacher", "oracle"):
                if (prov, "base", sid) in by and (prov, "fire_student", sid) in by:
                    examples.append({"id": sid, "provider": prov, "base": by[(prov, "base", sid)],
                                     "fire_student": by[(prov, "fire_student", sid)]})
                    break
        images = {i: k for k, i in enumerate(world["test"]["id"])}
        uimages = {i: k for k, i in enumerate(world["unseen"]["id"])}

        def image_of(sid):
            split, index = ("test", images[sid]) if sid in images else ("unseen", uimages[sid])
            return world[split][index]["image"].convert("RGB")

        example_figure(examples[:2], image_of, out / "example_dialogues",
                       sources=[bench / "free_dialogues.jsonl", bench / "fire_bench.json"], cfg=cfg)
        made.append("example_dialogues")
        summary = {"figures": made, "tables": sorted(p.name for p in out.glob("*.csv")),
                   "paper_vs_ours": pvo.to_dict("records")}
        provenance.write_json_atomic(out / "figures.json", summary)
        run.extra.update({"figures": made, "seconds": round(time.time() - t0, 1),
                          "holds": pvo[pvo.holds != ""].holds.value_counts().to_dict()})
    return FiguresResult(dir=run.dir, dataset_stats=stats, free_dialogue=free_table, cross_method=cross,
                         paper_vs_ours=pvo, figures=made, seconds=time.time() - t0)
