"""Benchmarks, run by ``make bench``; each writes JSON under ``results/bench/``.

    python -m fire_core.bench            # every benchmark
    python -m fire_core.bench world      # one

``world``: time to render the default-scale world (stage 00), samples per second, and
per-family render cost.
``train``: training throughput of the default-scale base VLM on real world chats (fp32 and
bf16 autocast), the measured fp32/bf16 GEMM peak of this machine, and MFU (model FLOPs per
second of training over the fp32 GEMM peak).
``generate``: new tokens per second of batched generation at batch 1 and batch 32.
``generate_data``: FIRE-100K dialogues per second for the oracle backend in process, and for
the openai backend against the local server (``fire_core.serve``, 50 ms added per request so
that concurrency matters) at concurrency 1 and 16.
``simulate``: the dialogue engine (batched, refilled, KV cache kept between turns) against a
sequential loop that runs one dialogue at a time with a full re-encode per turn (as the
official FIRE chat class does), on the same student and teacher (stage 04 and 03 models at
scale=default when they exist, else untrained default-size models) and the same samples:
dialogues/s, generated tokens/s, their ratio ``speedup``, and where the engine's time goes.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time

from fire_core import (
    annotate,
    client,
    config,
    dialogue,
    feedback,
    files,
    models,
    prompts,
    provenance,
    records,
    sft,
    world,
)

log = logging.getLogger(__name__)
OUT = config.REPO_ROOT / "results" / "bench"


def bench_world() -> dict:
    per_family = {}
    for fam in world.FAMILIES:
        t = time.perf_counter()
        for i in range(200):
            world.make_sample(fam, "train", i, 0, 96)
        per_family[fam] = round((time.perf_counter() - t) / 200 * 1000, 3)
    cfg = config.load("00_build_world", ["scale=default"])
    t = time.perf_counter()
    by_split, replaced = world.generate(cfg)  # what stage 00 spends its time on: rendering every split
    seconds = time.perf_counter() - t
    n = sum(len(rows) for rows in by_split.values())
    png_mb = sum(len(r["image"]["bytes"]) for rows in by_split.values() for r in rows) / 2**20
    return {"benchmark": "world", "scale": "default", "samples": n, "render_seconds": round(seconds, 2),
            "samples_per_s": round(n / seconds, 1), "png_mb": round(png_mb, 1), "duplicates_replaced": replaced,
            "render_ms_per_sample": per_family, "workers": cfg.world.num_workers,
            "cpus": os.cpu_count(), "machine": platform.machine(), "peak_rss_mb": round(provenance.peak_rss_mb(), 1)}


def gemm_peak_gflops(dtype, n: int = 1024, reps: int = 20) -> float:
    """Best sustained GFLOP/s of a square matmul on this machine (the roofline for MFU)."""
    import torch

    best = 0.0
    for size in (n, 2 * n):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        torch.matmul(a, b)  # warm-up
        t = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        best = max(best, 2 * size**3 * reps / (time.perf_counter() - t) / 1e9)
    return best


def train_flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per sequence token: 6 per weight of every matmul a token passes through
    (forward 2, backward 4), plus causal attention scores; the vision tower's cost per image is
    spread over the sequence."""
    cfg = model.config
    tc, vc = cfg.text_config, cfg.vision_config
    lm = 0
    for n, p in model.named_parameters():
        if p.dim() == 2 and "language_model" in n and "embed_tokens" not in n:
            lm += p.numel()
    lm += tc.vocab_size * tc.hidden_size  # the (tied) output projection
    attn = 6 * 2 * tc.num_hidden_layers * seq_len * tc.hidden_size  # QK^T and AV, fwd+bwd, per token
    vis_params = sum(p.numel() for n, p in model.named_parameters()
                     if p.dim() == 2 and ("vision_tower" in n or "multi_modal_projector" in n))
    patches = 2 * (vc.image_size // vc.patch_size) ** 2  # base image + one anyres tile
    vision_per_image = 6 * vis_params * patches
    return 6 * lm + attn + vision_per_image / seq_len


def _base_chats(cfg, n: int):

    samples = [world.make_sample(f, "train", i, cfg.seed, cfg.world.image_size)
               for i in range(n) for f in cfg.world.seen_families][:n]
    return samples, [sft.Example(prompts.base_messages([(s.question, s.response)]), s.image) for s in samples]


def _default_kit():

    cfg = config.load("01_train_base_vlm", ["scale=default"])
    samples, examples = _base_chats(cfg, 512)
    tok = models.train_tokenizer([s.question + "\n" + s.response for s in samples], cfg.model.vocab_size)
    proc = models.build_processor(tok, cfg.model, cfg.world.image_size)
    return cfg, samples, examples, proc


def bench_train(steps: int = 12) -> dict:
    import torch


    torch.set_num_threads(2)
    cfg, _, examples, proc = _default_kit()
    ds = sft.SFTDataset(examples, proc, cfg.model.max_length)
    collate = sft.Collator(proc)
    bs = cfg.train.batch_size
    batches = [collate([ds[i] for i in range(k * bs, (k + 1) * bs)]) for k in range(steps + 2)]
    out = {"benchmark": "train", "scale": "default", "batch_size": bs, "steps": steps,
           "gemm_peak_fp32_gflops": round(gemm_peak_gflops(torch.float32), 1),
           "gemm_peak_bf16_gflops": round(gemm_peak_gflops(torch.bfloat16), 1)}
    for mode in ("fp32", "bf16_autocast"):
        torch.manual_seed(0)
        model = models.build_model(cfg.model, proc).train()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.learning_rate)
        tokens = flops = 0.0
        elapsed = 0.0
        for k, batch in enumerate(batches):
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=(mode != "fp32")):
                loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if k >= 2:  # the first steps warm up allocators and kernels
                elapsed += time.perf_counter() - t
                n = int(batch["attention_mask"].sum())
                tokens += n
                flops += n * train_flops_per_token(model, batch["input_ids"].shape[1])
        out[mode] = {"tokens_per_s": round(tokens / elapsed, 1), "model_gflops_per_s": round(flops / elapsed / 1e9, 2),
                     "seconds_per_step": round(elapsed / steps, 3), "final_loss": round(float(loss), 4)}
    best = max(("fp32", "bf16_autocast"), key=lambda m: out[m]["tokens_per_s"])
    out["tokens_per_s"] = out[best]["tokens_per_s"]
    out["faster_mode"] = best
    out["mfu_fp32"] = round(out["fp32"]["model_gflops_per_s"] / out["gemm_peak_fp32_gflops"], 4)
    out["mfu_bf16_autocast_vs_fp32_peak"] = round(out["bf16_autocast"]["model_gflops_per_s"] / out["gemm_peak_fp32_gflops"], 4)
    out["params"] = models.param_count(model)
    out["peak_rss_mb"] = round(provenance.peak_rss_mb(), 1)
    return out


def bench_generate(new_tokens: int = 32) -> dict:
    import torch


    torch.set_num_threads(2)
    cfg, samples, _, proc = _default_kit()
    torch.manual_seed(0)
    model = models.build_model(cfg.model, proc).eval()
    convs = [prompts.base_messages([(s.question, "")])[:-1] for s in samples[:64]]
    images = [s.image for s in samples[:64]]
    out = {"benchmark": "generate", "scale": "default", "new_tokens": new_tokens}
    for bs, n in ((1, 8), (32, 64)):
        models.generate(model, proc, convs[:bs], images[:bs], max_new_tokens=4, batch_size=bs)  # warm-up
        t = time.perf_counter()
        texts = models.generate(model, proc, convs[:n], images[:n], max_new_tokens=new_tokens, batch_size=bs,
                                stop_at_eos=False)  # a fixed number of new tokens per sequence
        dt = time.perf_counter() - t
        out[f"batch_{bs}"] = {"sequences": len(texts), "seconds": round(dt, 2),
                              "new_tokens_per_s": round(n * new_tokens / dt, 1)}
    out["speedup_32_vs_1"] = round(out["batch_32"]["new_tokens_per_s"] / out["batch_1"]["new_tokens_per_s"], 2)
    return out


def bench_generate_data(n: int = 96, server_delay: float = 0.05) -> dict:
    import os
    import random
    import socket
    import subprocess
    import sys

    import httpx


    cfg = config.load("02_generate_fire100k", ["scale=default"])
    samples = [world.make_sample(f, "train", i, 0, 96) for i in range(n // 9 + 1) for f in cfg.world.seen_families][:n]
    jobs = []
    for s in samples:
        rec = {"id": s.id, "family": s.family, "question": s.question, "answer": s.answer, "response": s.response,
               "scene": s.scene, "annotation": s.annotation}
        first = feedback.respond(rec, feedback.wrong_answer(rec, random.Random(0)))
        jobs.append((s.id, rec, first, s.image))
    out = {"benchmark": "generate_data", "dialogues": n, "server_delay_s": server_delay}
    t = time.perf_counter()
    for _, rec, first, _ in jobs:
        annotate.oracle_dialogue(rec, first, cfg.dialogue.threshold, cfg.dialogue.max_turns, 0)
    out["oracle_in_process_dialogues_per_s"] = round(n / (time.perf_counter() - t), 1)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "fire_core.serve", "--port", str(port), "--delay",
                               str(server_delay)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.setdefault("OPENAI_API_KEY", "local-bench-key")
    try:
        for _ in range(200):
            try:
                httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        for conc in (1, 16):
            acfg = config.load("02_generate_fire100k", ["scale=default", "annotator=openai", "annotator.model=oracle",
                                                        f"annotator.base_url=http://127.0.0.1:{port}/v1",
                                                        f"annotator.concurrency={conc}",
                                                        "annotator.requests_per_minute=100000"]).annotator
            stats = annotate.GenStats(requested=n)
            done = []
            t = time.perf_counter()
            client.run_async(annotate.openai_dialogues(jobs, acfg, cfg.dialogue, 0, stats,
                                                         lambda rid, turns, done=done: done.append(turns is not None)))
            dt = time.perf_counter() - t
            out[f"openai_local_concurrency_{conc}"] = {"dialogues_per_s": round(sum(done) / dt, 2),
                                                        "seconds": round(dt, 2), "failures": dict(stats.failures)}
    finally:
        server.kill()
    out["speedup_16_vs_1"] = round(out["openai_local_concurrency_16"]["dialogues_per_s"]
                                   / out["openai_local_concurrency_1"]["dialogues_per_s"], 2)
    return out


def bench_simulate(n_engine: int = 192, n_sequential: int = 32, batch_sizes=(32, 64)) -> dict:
    from dataclasses import replace

    import torch


    torch.set_num_threads(2)
    cfg = config.load("05_simulate_fire1m", ["scale=default"])
    s_dir, t_dir = cfg.stage_dir("04_train_student") / "model", cfg.stage_dir("03_train_teacher") / "model"
    trained = (cfg.stage_dir("04_train_student") / "DONE").is_file() and (cfg.stage_dir("03_train_teacher") / "DONE").is_file()
    if trained:
        (sm, sp), (tm, tp) = models.load(s_dir), models.load(t_dir)
        rows = world.load(cfg)["val"]
        rows = rows.select(range(0, len(rows), max(1, len(rows) // n_engine)))
        samples = list(records.world_samples(rows.select(range(min(n_engine, len(rows)))),
                                              lambda i: files.request_id(i, "bench")))
    else:  # no trained models yet: same-size untrained ones (they talk nonsense, but the cost is real)
        log.warning("no stage 03/04 models at scale=default; benchmarking untrained models of the same size")
        c, _, _, sp = _default_kit()
        sm = models.build_model(c.model, sp)
        tm, tp = models.build_model(c.model, sp), sp
        made = [world.make_sample(f, "val", i, 0, c.world.image_size) for i in range(n_engine)
                for f in c.world.seen_families][:n_engine]
        samples = [{"id": m.id, "request_id": m.id, "question": m.question, "answer": m.answer, "family": m.family,
                    "split": "val", "image": m.image} for m in made]
    d = cfg.dialogue
    student = dialogue.hf_role("student", sm, sp, d.student_max_new_tokens)
    teacher = dialogue.hf_role("teacher", tm, tp, d.teacher_max_new_tokens)
    dialogue.run(samples[:4], student, teacher, d, cfg.seed, progress=False)  # warm-up
    # the sequential loop runs an evenly spread subset (all families) of the engine's samples
    seq = dialogue.sequential(samples[::max(1, len(samples) // n_sequential)][:n_sequential], student, teacher, d,
                              cfg.seed)
    out = {"benchmark": "simulate", "trained_models": trained, "threshold": d.threshold, "max_turns": d.max_turns,
           "student_max_new_tokens": d.student_max_new_tokens, "teacher_max_new_tokens": d.teacher_max_new_tokens,
           "sequential": {"dialogues": len(seq.records), "seconds": round(seq.timing["total"], 2),
                          "dialogues_per_s": round(seq.dialogues_per_s, 3), "tokens_per_s": round(seq.tokens_per_s, 1),
                          "turns": sum(len(r["turns"]) for r in seq.records)}}
    seq_by_id = {r["id"]: r["turns"] for r in seq.records}
    for bs in batch_sizes:
        res = dialogue.run(samples, replace(student, generator=None), replace(teacher, generator=None),
                           replace(d, batch_size=bs), cfg.seed, progress=False)
        same = sum(1 for r in res.records if r["id"] in seq_by_id and
                   [(t["response"], t["score"]) for t in r["turns"]] ==
                   [(t["response"], t["score"]) for t in seq_by_id[r["id"]]])
        total = res.timing["total"]
        out[f"engine_batch{bs}"] = {
            "dialogues": len(res.records), "seconds": round(total, 2), "steps": res.steps,
            "turns": sum(len(r["turns"]) for r in res.records),
            "dialogues_per_s": round(res.dialogues_per_s, 3), "tokens_per_s": round(res.tokens_per_s, 1),
            "speedup": round(res.dialogues_per_s / seq.dialogues_per_s, 2),
            "token_speedup": round(res.tokens_per_s / seq.tokens_per_s, 2),
            "time_share": {k: round(res.timing[k] / total, 3) for k in ("student", "teacher", "other")},
            "same_dialogues_as_sequential": f"{same}/{len(seq.records)}"}
    # what the KV cache buys: the same engine with a full re-encode per turn
    plain = dialogue.run(samples, replace(student, cache_prefix=False), replace(teacher, cache_prefix=False),
                         replace(d, batch_size=batch_sizes[0]), cfg.seed, progress=False)
    out[f"engine_batch{batch_sizes[0]}_no_prefix_cache"] = {
        "seconds": round(plain.timing["total"], 2), "dialogues_per_s": round(plain.dialogues_per_s, 3),
        "speedup": round(plain.dialogues_per_s / seq.dialogues_per_s, 2),
        "time_share": {k: round(plain.timing[k] / plain.timing["total"], 3) for k in ("student", "teacher", "other")}}
    return out


BENCHMARKS = {"world": bench_world, "train": bench_train, "generate": bench_generate,
              "generate_data": bench_generate_data, "simulate": bench_simulate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"benchmarks to run, of {list(BENCHMARKS)} (default: all)")
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; known: {list(BENCHMARKS)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in args.names or list(BENCHMARKS):
        result = BENCHMARKS[name]()
        path = OUT / f"{name}.json"
        provenance.write_json_atomic(path, {**result, "git": provenance.git_state()})
        log.info("%s -> %s", name, path)


if __name__ == "__main__":
    main()
