"""`make compare COMPARE_ARGS="--family onpolicy"`: on-policy distillation beside ce, fkl and akl (issue 15, item 6).

All rows start from the same init, `sft` (the demo's base student fine-tuned with cross-entropy on the
training references, tasks/init/sft.py `run_sft`, MiniLLM's starting point; cached by `make compare`'s
`ensure_inits`), on the same training prompts, and are scored like `make compare` on the held-out prompts
(unseen in training): greedy exact match and ROUGE-L, KL to the teacher's held-out soft labels.

Rows, each with --seeds seeds:
  ce, fkl, akl         offline, the production loop on the stored teacher labels (flows.compare.run_one);
  minillm              tasks/onpolicy: teacher-mixed sampling (alpha 0.2), single-step term, length-normalised
                       long-term reward, PPO clip, LM term on the references;
  minillm-no-mix       the same with teacher_mix: off (the paper's ablation: -4.2 Dolly ROUGE-L);
  minillm-no-lennorm   the same with length_norm: false (the paper's ablation: -9.9 Dolly ROUGE-L);
  onpolicy_rkl-1epoch  sampled-token reverse KL with every rollout used once (inner_epochs 1, rounds x inner_epochs
                       rounds: the same number of updates, each on fresh rollouts; tinker's form);
  onpolicy_rkl-lr0.1x  sampled-token reverse KL at a tenth of the learning rate (the only row at another rate);
  minillm-no-lm        the same with lm_coef 0: no cross-entropy on the training references (the LM term here is on
                       the references the sft init was trained on, so it is extra supervision the offline rows lack);
  gkd                  JSD(beta 0.5) on rollouts with probability lambda 0.5, on the stored teacher labels otherwise;
  onpolicy_rkl         sampled-token reverse KL (advantage log p - log q).
  ROW@lr0.3x           any row above at 0.3 (any factor) times the learning rate: the learning-rate check, e.g.
                       --op-rows fkl fkl@lr0.3x fkl@lr0.1x minillm minillm@lr0.3x minillm@lr0.1x.

Budget: every row makes the same number of optimizer updates, U = rounds * inner_epochs * ceil(prompts_per_round /
batch) with batch = train.batch_size (the offline rows run U steps of the same batch size, the same learning rate
and warmup). The on-policy rows see rounds * prompts_per_round prompts, each inner_epochs times.

Engines: the rounds run in this process with transformers (`--op-engine hf`): the student (or teacher-mixed, in
lockstep, tasks.onpolicy.mixed_sampling.mixed_decode) samples, the teacher scores prompt + rollout into an
ordinary soft-label shard (top-k, sampled-token log-prob, tail mass) with policy_version r, and the round's
update is the stage's own code (tasks.onpolicy.update: attach_advantages, round_metrics, run_update; the
rollout table and the labels are read back through tasks.onpolicy.rounds.load_round_records, so its staleness
checks apply). Only the sampler and the scorer differ from the stage (vLLM in Ray actors, restarted per round on
CPU): the same reason as `--labels hf`, a shared 2-core machine where engine start-up per round would dominate.
Merged into docs/results/methods.json under "onpolicy" (other keys kept); per-run JSON in docs/results/onpolicy_qa_runs.json.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

OFFLINE = ("ce", "fkl", "akl")
VARIANTS = {
    "minillm": {"method": "minillm"},
    "gkd": {"method": "gkd", "gkd_lambda": 0.5},
    "onpolicy_rkl": {"method": "onpolicy_rkl"},
    "minillm-no-mix": {"method": "minillm", "teacher_mix": "off"},
    "minillm-no-lennorm": {"method": "minillm", "length_norm": False},
    "minillm-no-lm": {"method": "minillm", "lm_coef": 0.0},
    "onpolicy_rkl-1epoch": {"method": "onpolicy_rkl", "one_epoch": True},
    "onpolicy_rkl-lr0.1x": {"method": "onpolicy_rkl", "lr_scale": 0.1},
}


def add_arguments(parser) -> None:
    g = parser.add_argument_group("onpolicy family (--family onpolicy)")
    g.add_argument("--op-rounds", type=int, default=3, help="rollout -> scoring -> update rounds per on-policy run")
    g.add_argument("--op-prompts", type=int, default=128, help="prompts per round")
    g.add_argument("--op-inner-epochs", type=int, default=4, help="passes over each round's rollouts (MiniLLM: 4)")
    g.add_argument("--op-max-new-tokens", type=int, default=24, help="rollout length cap")
    g.add_argument("--op-rows", nargs="*", default=[*OFFLINE, *VARIANTS], type=row_name,
                   help=f"rows: {', '.join([*OFFLINE, *VARIANTS])}, each optionally with @lr<factor>x (e.g. gkd@lr0.3x)")
    g.add_argument("--op-seeds", type=int, default=None, help="seeds of the on-policy rows (default --seeds)")


def split_row(name: str) -> tuple[str, float]:
    """'gkd@lr0.3x' -> ('gkd', 0.3); 'gkd' -> ('gkd', 1.0)."""
    base, _, suffix = name.partition("@")
    if not suffix:
        return base, 1.0
    if not (suffix.startswith("lr") and suffix.endswith("x")):
        raise ValueError(f"{name!r}: a row suffix is @lr<factor>x, e.g. @lr0.3x")
    try:
        factor = float(suffix[2:-1])
    except ValueError:
        raise ValueError(f"{name!r}: {suffix[2:-1]!r} is not a number") from None
    if not factor > 0:
        raise ValueError(f"{name!r}: the learning-rate factor must be positive")
    return base, factor


def row_name(name: str) -> str:
    """argparse type of --op-rows: a known row, optionally @lr<factor>x."""
    import argparse

    try:
        base, _ = split_row(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if base not in OFFLINE and base not in VARIANTS:
        raise argparse.ArgumentTypeError(f"{name!r}: unknown row {base!r}; rows: {', '.join([*OFFLINE, *VARIANTS])}")
    return name


def op_config(variant: str, args, train_cfg, seed: int):
    from tasks.onpolicy.config import OnPolicyConfig

    variant, factor = split_row(variant)
    settings = dict(VARIANTS[variant])
    settings["lr_scale"] = settings.get("lr_scale", 1.0) * factor
    rounds, epochs = args.op_rounds, args.op_inner_epochs
    if settings.pop("one_epoch", False):  # same number of updates, each rollout used once
        rounds, epochs = rounds * epochs, 1
    lr = train_cfg.learning_rate * settings.pop("lr_scale", 1.0)
    return OnPolicyConfig(**settings, rounds=rounds, prompts_per_round=args.op_prompts,
                          max_new_tokens=args.op_max_new_tokens, inner_epochs=epochs,
                          batch_size=train_cfg.batch_size, lm_batch_size=train_cfg.batch_size,
                          learning_rate=lr, warmup_steps=train_cfg.warmup_steps,
                          top_k=20, seed=seed)


def updates(args, batch: int) -> int:
    return args.op_rounds * args.op_inner_epochs * math.ceil(args.op_prompts / batch)


@torch.no_grad()
def score_rollouts(teacher, rows: list[dict], k: int) -> list[dict]:
    """The teacher's top-k log-probs, sampled-token log-prob and tail mass at every response position (teacher
    forcing of prompt + rollout, temperature 1): the content of the stage's vLLM score-mode capture."""
    from tasks.teacher.extract import tail_logmass

    out = []
    for row in rows:
        seq = torch.tensor([list(row["prompt_ids"]) + list(row["response_ids"])])
        p = len(row["prompt_ids"])
        logp = torch.log_softmax(teacher(input_ids=seq).logits[0, p - 1 : -1].double(), -1)
        top = logp.topk(k, -1)
        out.append({"topk_ids": top.indices.numpy(), "topk_logprobs": top.values.float().numpy(),
                    "token_logprob": logp.gather(1, torch.tensor(row["response_ids"])[:, None])[:, 0].float().numpy(),
                    "tail_logmass": tail_logmass(top.values.numpy()).astype("float32")})
    return out


def run_onpolicy_hf(cfg, student_dir: str, teacher_dir: str, prompts_path: str, labels_manifest: str, out_dir: Path,
                    log=print) -> dict:
    """cfg.rounds rounds in this process; returns {student, rounds: [round records]}."""
    from storage import soft_labels
    from tasks.data import read_prompts
    from tasks.models import load_causal_lm, load_tokenizer, save_pretrained_atomic, tokenizer_hash
    from tasks.onpolicy.mixed_sampling import mixed_decode
    from tasks.onpolicy.rollout import ROLLOUTS_FILE, choose_prompts, rollout_seed, write_rollouts
    from tasks.onpolicy.rounds import build_optimizer, load_round_records, reference_records, round_dir, sampling_settings
    from tasks.onpolicy.update import attach_advantages, round_metrics, run_update
    from tasks.teacher.capture import sample_id

    prompts = read_prompts(prompts_path)
    tokenizer = load_tokenizer(student_dir)
    teacher = load_causal_lm(teacher_dir).eval()
    model = load_causal_lm(student_dir)
    optimizer, scheduler = build_optimizer(cfg, model)
    stored = list(soft_labels.read(labels_manifest)) if cfg.method == "gkd" and cfg.gkd_lambda < 1 else None
    references = reference_records(cfg, prompts, tokenizer) if cfg.method == "minillm" and cfg.lm_coef > 0 else None
    alpha = cfg.mix_alpha if cfg.mixes else 0.0
    teacher_key = f"hf:{Path(teacher_dir).name}"
    records_out = []
    for r in range(cfg.rounds):
        folder = round_dir(out_dir, r)
        t0 = time.time()
        model.eval()
        chosen = choose_prompts(prompts, r, cfg.prompts_per_round, cfg.seed)
        seeds = [rollout_seed(cfg.seed, r, p["example_id"]) for p in chosen]
        rows = []
        for p, s in zip(chosen, seeds):
            sample = mixed_decode(model, teacher, list(p["prompt_ids"]), alpha=alpha, max_new_tokens=cfg.max_new_tokens,
                                  eos_id=tokenizer.eos_token_id, generator=torch.Generator().manual_seed(int(s)),
                                  temperature=cfg.temperature)
            sample.pop("teacher_logprob")
            rows.append({"example_id": p["example_id"], "policy_version": r, "seed": s, "prompt_ids": list(p["prompt_ids"]),
                         "sample_id": sample_id(p["prompt_ids"], sample["response_ids"], "student_rollout", teacher_key),
                         **sample})
        write_rollouts(folder / ROLLOUTS_FILE, rows, {"policy_version": r, "sampling": sampling_settings(cfg)})
        t_rollout = time.time() - t0

        t0 = time.time()
        meta = {"k": cfg.top_k, "codec": "plain-f32", "tokenizer_hash": tokenizer_hash(tokenizer), "split": "train",
                "response_source": "student_rollout", "policy_version": r, "teacher_key": teacher_key, "mode": "score",
                "labeller": "transformers (flows.compare_onpolicy)", "rollout_sampling": sampling_settings(cfg)}
        scored = score_rollouts(teacher, rows, cfg.top_k)
        shard_rows = [{"sample_id": row["sample_id"], "example_id": row["example_id"], "split": "train",
                       "response_source": "student_rollout", "prompt_ids": row["prompt_ids"],
                       "response_ids": row["response_ids"], **s} for row, s in zip(rows, scored)]
        shard = soft_labels.write_shard(folder / "labels", 0, shard_rows, meta)
        soft_labels.write_manifest(folder / "labels", [shard], meta)
        t_scoring = time.time() - t0

        t0 = time.time()
        records = load_round_records(folder, r)
        attach_advantages(cfg, records)
        torch.manual_seed(cfg.seed + r)
        metrics = round_metrics(model, records, tokenizer.pad_token_id, cfg.top_k, cfg.batch_size)
        stats = run_update(cfg, model, optimizer, scheduler, records, r, pad_id=tokenizer.pad_token_id, k=cfg.top_k,
                           where=str(folder), references=references, stored_labels=stored)
        t_update = time.time() - t0
        record = {"round": r, "policy_version": r, "rollouts": len(records), **metrics, **stats,
                  "seconds": {"rollout": round(t_rollout, 2), "scoring": round(t_scoring, 2), "update": round(t_update, 2)}}
        records_out.append(record)
        log(f"onpolicy[{cfg.method} seed {cfg.seed}]: round {r + 1}/{cfg.rounds} reward {metrics['reward']:.3f} "
            f"rkl {metrics['reverse_kl']:.3f} len {metrics['mean_response_length']:.1f} | rollout {t_rollout:.1f}s "
            f"scoring {t_scoring:.1f}s update {t_update:.1f}s")
    save_pretrained_atomic(model, tokenizer, out_dir / "student")
    return {"student": str(out_dir / "student"), "rounds": records_out}


def run_variant(setup: dict, init_dir: str, variant: str, seed: int, args, prompts: list[dict]) -> dict:
    """One on-policy run (cached by its settings) and its scores."""
    from flows.compare import scores
    from storage.atomic import read_json, sha256_json, write_json
    from tasks.identity import model_identity

    cfg = op_config(variant, args, setup["config"].train, seed)
    out_dir = setup["root"] / "runs" / f"sft-{variant}-seed{seed}"
    key = sha256_json({"init": model_identity(init_dir), "teacher": setup["prepared"].teacher_dir, "prompts": setup["prepared"].train.sha256,
                       "labels": setup["labels"].train_manifest, "cfg": cfg.model_dump(mode="json"),
                       "eval": setup["prepared"].eval.sha256, "engine": "hf"})
    done = out_dir / "result.json"
    if done.exists() and read_json(done).get("key") == key:
        return read_json(done)["result"]
    started = time.time()
    run = run_onpolicy_hf(cfg, init_dir, setup["prepared"].teacher_dir, setup["prepared"].train.path,
                          setup["labels"].train_manifest, out_dir)
    result = {"seed": seed, "init": "sft", "learning_rate": cfg.learning_rate,
              **scores(run["student"], prompts, setup["labels"].eval_manifest, setup["config"].eval.max_new_tokens),
              "train_seconds": round(time.time() - started, 1), "rounds": run["rounds"]}
    write_json(done, {"key": key, "result": result})
    return result


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def run(args, data_dir: Path, argv=None) -> int:
    from flows.compare import _seen, ensure_inits, prepare_task, run_one, scores
    from tasks.data import read_prompts
    from tasks.identity import code_version

    task_name = args.tasks[0]
    setup = prepare_task(data_dir, task_name, args)
    import ray

    ray.shutdown()
    inits = ensure_inits(setup, args.sft_steps)
    op_setup = {**setup, "root": data_dir / "compare-onpolicy" / task_name}  # own runs folder: never the objectives' runs
    train_cfg = setup["config"].train
    n_updates = updates(args, train_cfg.batch_size)
    prompts = read_prompts(setup["prepared"].eval.path)
    eval_manifest, max_new = setup["labels"].eval_manifest, setup["config"].eval.max_new_tokens
    op_seeds = args.op_seeds or args.seeds
    entry = {
        "task": task_name, "init": "sft", "sft_steps": args.sft_steps, "updates_per_run": n_updates,
        "batch_size": train_cfg.batch_size, "learning_rate": train_cfg.learning_rate, "warmup_steps": train_cfg.warmup_steps,
        "rounds": args.op_rounds, "prompts_per_round": args.op_prompts, "inner_epochs": args.op_inner_epochs,
        "rollout_max_new_tokens": args.op_max_new_tokens, "engine": "hf (transformers in-process sampler and scorer; "
        "update code = tasks.onpolicy.update)", "train_examples": setup["prepared"].train.rows, "eval_examples": len(prompts),
        "eval_prompts_seen_in_train": _seen(setup), "teacher_steps": args.teacher_steps,
        "teacher": scores(setup["demo"]["teacher"], prompts, eval_manifest, max_new),
        "inits": {"sft": scores(inits["sft"], prompts, eval_manifest, max_new)},
        "command": "python -m flows.compare " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "commit": code_version()[:7], "date": time.strftime("%Y-%m-%d"), "runs": {}}
    print(f"compare[onpolicy]: {n_updates} updates per run; teacher {entry['teacher']}; sft {entry['inits']['sft']}", flush=True)
    futures = {}
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                             initargs=(args.threads,)) as pool:
        for name in args.op_rows:
            base, factor = split_row(name)
            if base in OFFLINE:
                row = dict(task=task_name, group="onpolicy", method=base, init="sft", lr=None)
                for seed in range(args.seeds):
                    futures[(name, seed)] = pool.submit(run_one, op_setup, inits, row, seed, n_updates,
                                                        train_cfg.learning_rate * factor, prompts)
            else:
                for seed in range(op_seeds):
                    futures[(name, seed)] = pool.submit(run_variant, op_setup, inits["sft"], name, seed, args, prompts)
        for name in args.op_rows:
            runs = []
            base, factor = split_row(name)
            for seed in range(args.seeds if base in OFFLINE else op_seeds):
                try:
                    runs.append(futures[(name, seed)].result())
                except Exception as exc:  # noqa: BLE001 - one failed run must not lose the others' rows
                    print(f"compare[onpolicy]: {name} seed {seed} FAILED: {exc!r}", flush=True)
                    continue
                print(f"compare[onpolicy]: {name} seed {seed}: " + json.dumps({k: v for k, v in runs[-1].items() if k != 'rounds'}), flush=True)
            settings = {k: v for k, v in VARIANTS.get(base, {}).items() if k != "method"}
            if factor != 1.0:
                settings["lr_scale"] = settings.get("lr_scale", 1.0) * factor
            entry["runs"][name] = {"method": VARIANTS.get(base, {"method": base})["method"], "init": "sft",
                                   "settings": settings, "runs": runs}
            write_entry(entry, Path(args.out))
    print(render(entry))
    return 0


def write_entry(entry: dict, out: Path) -> None:
    """methods.json: read, replace the 'onpolicy' key (per-round records left out), write; the per-run rounds go
    to onpolicy_qa_runs.json."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "methods.json"
    existing = json.loads(path.read_text()) if path.exists() else {}
    slim = {**entry, "runs": {n: {**e, "runs": [{k: v for k, v in r.items() if k != "rounds"} for r in e["runs"]]}
                              for n, e in entry["runs"].items()}}
    existing["onpolicy"] = slim
    path.write_text(json.dumps(existing, indent=2) + "\n")
    (out / "onpolicy_qa_runs.json").write_text(json.dumps(entry, indent=2) + "\n")


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "—"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def render(entry: dict) -> str:
    lines = [f"Teacher: EM {entry['teacher']['exact_match']:.3f}, ROUGE-L {entry['teacher']['rouge_l']:.3f}. "
             f"sft init: EM {entry['inits']['sft']['exact_match']:.3f}, ROUGE-L {entry['inits']['sft']['rouge_l']:.3f}, "
             f"KL {entry['inits']['sft']['kl_to_teacher']:.3f}.", "",
             "| row | method | init | seeds | exact match | ROUGE-L | KL to teacher | last-round rollout length |",
             "|---|---|---|---|---|---|---|---|"]
    for name, e in entry["runs"].items():
        runs = e["runs"]
        lengths = [r["rounds"][-1]["mean_response_length"] for r in runs if r.get("rounds")]
        lines.append(f"| {name} | {e['method']} | {e['init']} | {len(runs)} | "
                     + " | ".join(_mean_sd([r[m] for r in runs]) for m in ("exact_match", "rouge_l", "kl_to_teacher"))
                     + f" | {_mean_sd(lengths) if lengths else '—'} |")
    return "\n".join(lines) + "\n"
