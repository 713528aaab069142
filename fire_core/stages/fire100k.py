"""Stage 02: FIRE-100K, the base VLM's first answers annotated into feedback dialogues."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fire_core import feedback, files, models, plots, prompts, provenance, world
from fire_core.annotate import (
    PROMPT_VERSION,
    GenStats,
    apply_filter,
    check_failure_rates,
    filter_reason,
    openai_dialogues,
    oracle_dialogue,
    score_by_turn,
    statistics,
    validate,
)
from fire_core.client import AnnotatorError, run_async
from fire_core.config import FireConfig
from fire_core.files import ShardStore, request_id, write_jsonl
from fire_core.records import dialogue_record, sample_record, select_per_family
from fire_core.stages import common as stage_common


@dataclass
class Fire100kResult:
    dir: Path
    kept: list[dict[str, Any]]
    dropped: Counter
    stats: Any  # DataFrame
    gen_stats: GenStats
    seconds: float


def image_ok(row: dict[str, Any]):
    """The decoded image, or None when it is missing or corrupt (rows are read undecoded, so a
    bad image cannot stop the run before this check)."""
    import io

    from PIL import Image, UnidentifiedImageError

    value = row.get("image")
    try:
        if isinstance(value, dict):
            if value.get("bytes"):
                img = Image.open(io.BytesIO(value["bytes"]))
            elif value.get("path"):
                img = Image.open(value["path"])
            else:
                return None
        elif value is None:
            return None
        else:
            img = value
        img.load()
        return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return None


def save_failures(out: Path, stats: GenStats, rejects: list[dict[str, Any]]) -> None:
    """Raw text of every failed reply (appended to rejects.jsonl, so a rerun keeps the earlier
    ones) and the counts of this run (gen_stats.json)."""

    files.write_jsonl(out / "rejects.jsonl", rejects, append=True)
    provenance.write_json_atomic(out / "gen_stats.json", stats.as_dict())


def _write(store: ShardStore, stats: GenStats, row: dict[str, Any], turns: list[dict[str, Any]], rid: str,
           model_name: str, d) -> None:
    rec = dialogue_record(row, turns, rid, f"world/{model_name}", prompt_version=PROMPT_VERSION)
    bad = validate(rec, d.score_min, d.score_max)
    if bad:  # never write a malformed record
        stats.failures["unparsable"] += 1
        return
    if any(feedback.leaks_answer(t["feedback"], rec["answer"], rec["task"], rec["question"])
           for t in turns if not t.get("correct")):
        stats.failures["leaked_answer"] += 1  # written, then dropped by the filter with its reason
    store.append(rec)
    stats.written += 1



def run(cfg: FireConfig) -> Fire100kResult:
    """Stage 02: generate, filter and describe the FIRE-100K analog."""
    import time

    import datasets
    import matplotlib.pyplot as plt
    from tqdm.auto import tqdm


    t0 = time.time()
    if cfg.data.source == "hub":
        return _released(cfg, t0)
    world_dir = provenance.require_stage(cfg, "00_build_world")
    base_dir = provenance.require_stage(cfg, "01_train_base_vlm")
    ds = world.load(cfg)["train"]
    a, d = cfg.annotator, cfg.dialogue
    idx = sorted(select_per_family(ds, cfg.world.seen_families, a.samples_per_family,
                                 provenance.derived_seed(cfg.seed, "fire100k_samples")))
    rows = ds.select(idx).cast_column("image", datasets.Image(decode=False))  # decoded by image_ok
    with provenance.stage_run(cfg, inputs=[world_dir / "dataset", base_dir / "model"]) as run:
        store = ShardStore(run.dir / "raw", a.n_shards)
        stats = GenStats(requested=len(rows), torn_bytes_dropped=store.repair())
        done = store.done_ids()
        model_name = a.model if a.backend == "openai" else "oracle"
        # the world's ids are stable hashes of seed/family/split/index, so they stand for the image
        ids = rows["id"]
        rid_of = {i: request_id(i, PROMPT_VERSION, model_name, a.temperature, d.max_turns, cfg.seed) for i in ids}
        stats.skipped_done = sum(rid_of[i] in done for i in ids)
        model, processor = stage_common.load_base(cfg, base_dir)
        bs = cfg.model.generate_batch_size
        rejects: list[dict[str, Any]] = []
        # Batches are fixed slices of all samples, not of the unfinished ones: a batch's float
        # rounding depends on its other rows, so a rerun recomputes an unfinished batch whole
        # (the same first answers as an uninterrupted run) and writes only what is missing.
        for start in tqdm(range(0, len(ids), bs), desc="FIRE-100K dialogues", unit="batch"):
            if all(rid_of[i] in done for i in ids[start:start + bs]):
                continue
            batch = [rows[i] for i in range(start, min(start + bs, len(ids)))]
            good = []
            for r in batch:
                img = image_ok(r)
                if img is None:
                    stats.bad_images.append(r["id"])
                    continue
                good.append((r, img))
            if not good:
                continue
            convs = [prompts.base_messages([(r["question"], "")])[:-1] for r, _ in good]
            firsts = models.generate(model, processor, convs, [im for _, im in good],
                                     max_new_tokens=cfg.train.max_new_tokens, batch_size=bs)
            firsts = [f if f.strip() else "I am not sure." for f in firsts]
            missing = [k for k, (r, _) in enumerate(good) if rid_of[r["id"]] not in done]
            good, firsts = [good[k] for k in missing], [firsts[k] for k in missing]
            if a.backend == "oracle":
                for (r, _), first in zip(good, firsts, strict=True):
                    turns = oracle_dialogue(sample_record(r), first, d.threshold, d.max_turns, cfg.seed, a.fix_prob)
                    _write(store, stats, r, turns, rid_of[r["id"]], model_name, d)
            else:
                by_rid = {rid_of[r["id"]]: r for r, _ in good}
                jobs = [(rid_of[r["id"]], sample_record(r), first, img) for (r, img), first in zip(good, firsts, strict=True)]

                def on_done(rid, turns, by_rid=by_rid):
                    if turns is not None:
                        _write(store, stats, by_rid[rid], turns, rid, model_name, d)

                rejects += run_async(openai_dialogues(jobs, a, d, cfg.seed, stats, on_done))
                try:
                    check_failure_rates(stats, a.max_failure_rate)
                except AnnotatorError:
                    save_failures(run.dir, stats, rejects)  # what failed, for the user to read
                    raise
        save_failures(run.dir, stats, rejects)
        # only this plan's requests: shards may still hold records of an older prompt or config
        wanted = set(rid_of.values())
        records = [r for r in store.all_sorted() if r["request_id"] in wanted]
        kept, dropped = apply_filter(records, lambda rec: filter_reason(rec, d.threshold))
        write_jsonl(run.dir / "fire100k.jsonl", kept)
        table = statistics(kept)
        table.to_csv(run.dir / "fire100k_stats.csv", index=False, float_format="%.2f")
        score_by_turn(kept).to_csv(run.dir / "score_by_turn.csv")
        provenance.write_json_atomic(run.dir / "gen_stats.json", {
            **stats.as_dict(), "generated": len(records), "kept": len(kept), "dropped": dict(dropped)})
        run.extra["generation_run"] = {**stats.run_dict(), "seconds": round(time.time() - t0, 1)}
        # a few example dialogues, image plus turns
        shown = kept[:3] or records[:3]  # the kept ones if any
        fig, axes = plt.subplots(max(1, len(shown)), 2, figsize=(11, 2.2 * max(1, len(shown))), squeeze=False,
                                 gridspec_kw={"width_ratios": [1, 4]})
        by_id = {rid: i for i, rid in enumerate(ids)}
        for ax_row, rec in zip(axes, shown, strict=False):
            img = image_ok(rows[by_id[rec["id"]]])
            if img is not None:
                ax_row[0].imshow(img, interpolation="nearest")
            ax_row[0].axis("off")
            lines = [f"Q: {rec['question'].splitlines()[0]}  (truth: {rec['answer']})"]
            for k, t in enumerate(rec["turns"], 1):
                lines.append(f"S{k}: {t['response'][:95]}")
                lines.append(f"T{k}: Score {t['score']}. {t['feedback'][:90]}")
            ax_row[1].text(0, 0.5, "\n".join(lines), va="center", fontsize=7, family="monospace")
            ax_row[1].axis("off")
        if not shown:
            for ax in axes[0]:
                ax.axis("off")
            axes[0][1].text(0, 0.5, "no dialogues were generated", va="center")
        fig.tight_layout()
        plots.save(fig, run.dir / "example_dialogues", sources=[run.dir / "fire100k.jsonl"], cfg=cfg)
        run.extra.update({"kept": len(kept), "generated": len(records), "dropped": dict(dropped),
                          "bad_images": len(stats.bad_images)})
    return Fire100kResult(dir=run.dir, kept=kept, dropped=dropped, stats=table, gen_stats=stats,
                          seconds=time.time() - t0)


def _released(cfg: FireConfig, t0: float) -> Fire100kResult:
    """``data.source=hub``: FIRE-100K is the released FIRE-train-100K (GPT-4V's dialogues), read
    into the same ``fire100k.jsonl`` that stages 03-05 train on, with its statistics. Nothing is
    generated; every image is checked before anything is written."""
    import time

    provenance.require_stage(cfg, "01_train_base_vlm")
    src = cfg.data.files()["fire_train"]
    recs = stage_common.hub_fire(cfg, "fire_train", "train")  # every image checked before the stage starts
    with provenance.stage_run(cfg, inputs=[src]) as run:
        write_jsonl(run.dir / "fire100k.jsonl", recs)
        table = statistics(recs)
        table.to_csv(run.dir / "fire100k_stats.csv", index=False, float_format="%.2f")
        score_by_turn(recs).to_csv(run.dir / "score_by_turn.csv")
        stats = GenStats(requested=len(recs))
        provenance.write_json_atomic(run.dir / "gen_stats.json", {
            "source": src.name, "records": len(recs), "unscored_turns": sum(t["score"] is None for r in recs
                                                                            for t in r["turns"])})
        run.extra.update({"kept": len(recs), "source": str(src), "seconds": round(time.time() - t0, 1)})
    return Fire100kResult(dir=run.dir, kept=recs, dropped=Counter(), stats=table, gen_stats=stats,
                          seconds=time.time() - t0)
