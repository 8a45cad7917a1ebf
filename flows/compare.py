"""Method comparison in the papers' protocol: every objective from the same initial students, steps and labels.

`make compare` runs this. Per demo task family (qa and transform by default):
- labels: one teacher-stage capture (demo teacher, top-k), reused by every run;
- inits: `base` (the demo's LM-pretrained student, never trained on the task's
  question -> answer pairs), `sft` (base fine-tuned with cross-entropy on the
  training references, tasks.init.sft, MiniLLM's starting point) and `random`;
- groups of runs, each (method, init, lr) with --seeds seeds:
  * main: every objective from base;
  * sft: the reverse-KL family (rkl, skew_rkl, akl), plus ce and fkl as references, from sft;
  * init: ce, fkl, rkl, akl from random (with main and sft: random vs base vs sft at equal steps);
  * lr: rkl, tvd, jsd (and fkl as the control) from base at --alt-lr instead of train.learning_rate.
Each run trains with the production loop in this process (LocalRuntime) and is
scored on the held-out prompts (unseen in training) by greedy decoding (exact
match, ROUGE-L) and KL to the teacher's held-out soft labels. "Gap closed" is
(EM - EM_ce) / (EM_teacher - EM_ce) with ce from the same init and lr: the
share of the teacher-student gap an objective closes beyond plain
cross-entropy. Finished runs are kept (keyed by their settings), so a rerun
only trains what is missing. Writes docs/results/methods.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from flows import compare_limited, compare_onpolicy

METHODS = ("ce", "fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd", "akl", "akl+ce")
RKL_FAMILY = ("rkl", "skew_rkl", "akl")
INIT_METHODS = ("fkl", "rkl", "akl")
LR_METHODS = ("rkl", "tvd", "jsd")
TASKS = ("qa", "transform")
GROUPS = ("main", "sft", "init", "lr")


@torch.no_grad()
def greedy_scores(student_dir: str, prompts: list[dict], max_new_tokens: int) -> dict[str, float]:
    from tasks.evaluate.metrics import exact_match, rouge_l
    from tasks.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(student_dir)
    model = load_causal_lm(student_dir).eval()
    em, rl = [], []
    for start in range(0, len(prompts), 64):
        chunk = prompts[start : start + 64]
        width = max(len(p["prompt_ids"]) for p in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(chunk):  # left padding for batched decoding
            ids[i, width - len(p["prompt_ids"]) :] = torch.tensor(p["prompt_ids"])
            attn[i, width - len(p["prompt_ids"]) :] = 1
        out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        for p, row in zip(chunk, out[:, width:]):
            text = tok.decode(row, skip_special_tokens=True).strip()
            em.append(exact_match(text, p["references"]))
            rl.append(rouge_l(text, p["references"]))
    return {"exact_match": sum(em) / len(em), "rouge_l": sum(rl) / len(rl)}


def scores(model_dir: str, prompts: list[dict], eval_manifest: str, max_new_tokens: int) -> dict[str, float]:
    from tasks.evaluate.distribution import distribution_scores

    out = greedy_scores(model_dir, prompts, max_new_tokens)
    out["kl_to_teacher"] = statistics.fmean(d["kl_to_teacher"] for d in distribution_scores(model_dir, eval_manifest))
    return {k: round(v, 4) for k, v in out.items()}


@torch.no_grad()
def hf_labels(teacher_dir: str, prompts_path: str, out_dir: Path, *, split: str, k: int, temperature: float, seed: int,
              max_new_tokens: int, log=print) -> str:
    """Teacher labels in the soft-label format from HF transformers in this process (`--labels hf`).

    The same content as the teacher stage's vLLM capture (sampled or greedy response, then the teacher's top-k
    log-probabilities, realised-token log-probability and tail mass at every response position, temperature 1),
    for machines where vLLM in a Ray actor cannot get CPU time. Reused when the manifest exists.
    """
    from storage import soft_labels
    from storage.atomic import sha256_json
    from tasks.data import read_prompts
    from tasks.models import load_causal_lm, load_tokenizer, tokenizer_hash
    from tasks.teacher.capture import sample_id
    from tasks.teacher.extract import tail_logmass

    tok = load_tokenizer(teacher_dir)
    meta = {"schema_version": soft_labels.SCHEMA_VERSION, "codec": "compact-v1", "k": k, "split": split, "mode": "generate",
            "response_source": "teacher_sample", "teacher_model": teacher_dir, "tokenizer_hash": tokenizer_hash(tok),
            "vocab_size": len(tok), "logprobs_mode": "raw_logprobs", "labeller": "transformers (flows.compare --labels hf)",
            "sampling": {"temperature": temperature, "top_p": 1.0, "n": 1, "max_new_tokens": max_new_tokens, "seed": seed}}
    meta["teacher_key"] = sha256_json({f: meta[f] for f in ("teacher_model", "tokenizer_hash", "k", "sampling", "labeller")})[:16]
    if (out_dir / "manifest.json").exists():
        return str(out_dir / "manifest.json")
    model = load_causal_lm(teacher_dir).eval()
    prompts = read_prompts(prompts_path)
    torch.manual_seed(seed)
    rows = []
    for start in range(0, len(prompts), 64):
        chunk = prompts[start : start + 64]
        width = max(len(p["prompt_ids"]) for p in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, width - len(p["prompt_ids"]) :] = torch.tensor(p["prompt_ids"])
            attn[i, width - len(p["prompt_ids"]) :] = 1
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
        out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, **sampling)[:, width:].tolist()
        for p, generated in zip(chunk, out):
            response = generated[: generated.index(tok.eos_token_id) + 1] if tok.eos_token_id in generated else generated
            response = response or [tok.eos_token_id]
            seq = torch.tensor([list(p["prompt_ids"]) + response])
            logp = torch.log_softmax(model(input_ids=seq).logits[0, len(p["prompt_ids"]) - 1 : -1].double(), -1)
            top = logp.topk(k, -1)
            rows.append({"sample_id": sample_id(p["prompt_ids"], response, "teacher_sample", meta["teacher_key"]),
                         "example_id": p["example_id"], "split": split, "response_source": "teacher_sample",
                         "prompt_ids": list(p["prompt_ids"]), "response_ids": response,
                         "topk_ids": top.indices.numpy(), "topk_logprobs": top.values.float().numpy(),
                         "token_logprob": logp.gather(1, torch.tensor(response)[:, None])[:, 0].float().numpy(),
                         "tail_logmass": tail_logmass(top.values.numpy()).astype("float32")})
        log(f"compare: {split} labels {len(rows)}/{len(prompts)}")
    records = [soft_labels.write_shard(out_dir, i, rows[j : j + 2048], meta) for i, j in enumerate(range(0, len(rows), 2048))]
    return str(soft_labels.write_manifest(out_dir, records, meta))


def prepare_task(data_dir: Path, task_name: str, args, log=print) -> dict:
    """Demo assets, prompt shards and teacher labels of one task family (built once, reused)."""
    from tasks import prepare
    from tasks.config import PipelineConfig
    from tasks.demo.assets import ensure_demo_assets
    from tasks.stage_cache import StageContext
    from tasks.teacher.stage import run_teacher_stage

    config = PipelineConfig.model_validate({
        "data_dir": str(data_dir), "run_name": f"compare-{task_name}",
        "data": {"demo_task": task_name, "demo_teacher_steps": args.teacher_steps or 1500,
                 "max_train_examples": args.train_examples, "max_eval_examples": args.eval_examples},
    })
    demo = ensure_demo_assets(data_dir, seed=config.data.demo_seed, teacher_steps=config.data.demo_teacher_steps,
                              log_fn=log, task_name=task_name)
    root = data_dir / "compare" / task_name
    prepared = prepare.run(config, root / "prepare", log=log)
    if args.labels == "hf":
        from storage.atomic import sha256_json
        from tasks.contracts import TeacherLabels

        t = config.teacher
        where = root / f"labels-hf-{sha256_json([prepared.key, prepared.teacher_hash, t.top_k, t.temperature])[:12]}"
        common = dict(k=t.top_k, max_new_tokens=t.max_new_tokens, seed=t.engine.seed, log=log)
        labels = TeacherLabels(key=where.name, train_manifest=hf_labels(prepared.teacher_dir, prepared.train.path, where / "train",
                                                                        split=prepared.train_split, temperature=t.temperature, **common),
                               eval_manifest=hf_labels(prepared.teacher_dir, prepared.eval.path, where / "eval",
                                                       split=prepared.eval_split, temperature=0.0, **common))
    else:
        labels = run_teacher_stage(config.teacher, prepared, StageContext(out_dir=root / "labels", key=f"compare-{task_name}", log=log))
    return {"config": config, "prepared": prepared, "labels": labels, "demo": demo, "root": root}


def ensure_inits(setup: dict, sft_steps: int, log=print) -> dict[str, str]:
    """Initial students: base and random from the demo assets, sft = base + cross-entropy on the references (cached)."""
    from storage.atomic import read_json, sha256_json, write_json
    from tasks.init.sft import run_sft

    demo, cfg = setup["demo"], setup["config"].train.model_copy(update={"sft_steps": sft_steps, "init": "sft"})
    inits = {"base": demo["student_base"], "random": demo["student_random"]}
    sft_dir = setup["root"] / "init-sft"
    key = sha256_json({"base": demo["student_base"], "train": setup["prepared"].train.sha256, "cfg": cfg.model_dump()})
    stamp = sft_dir / "done.json"
    if not (stamp.exists() and read_json(stamp).get("key") == key):
        result = run_sft(cfg, demo["student_base"], setup["prepared"].train.path, sft_dir, log_fn=log, threads=torch.get_num_threads())
        write_json(stamp, {"key": key, **result})
    inits["sft"] = read_json(stamp)["checkpoint"]
    return inits


def plan(grid: str, tasks: list[str]) -> list[dict]:
    """(task, group, method, init, lr) rows; lr None = train.learning_rate."""
    rows = []
    for task_name in tasks:
        rows += [dict(task=task_name, group="main", method=m, init="base", lr=None) for m in METHODS]
        rows += [dict(task=task_name, group="sft", method=m, init="sft", lr=None) for m in ("ce", "fkl", *RKL_FAMILY)]
        rows += [dict(task=task_name, group="init", method=m, init="random", lr=None) for m in ("ce", *INIT_METHODS)]
        if grid == "full" or task_name == tasks[0]:
            rows += [dict(task=task_name, group="lr", method=m, init="base", lr="alt") for m in ("ce", "fkl", *LR_METHODS)]
    return rows


def run_one(setup: dict, inits: dict, row: dict, seed: int, steps: int, lr: float, prompts: list[dict], log=print,
            train_set: dict | None = None) -> dict:
    """Train one (method, init, lr, seed) with the production loop, score it; a finished identical run is reused.

    train_set: extra TrainConfig fields for every run (--train-set), e.g. packing; such runs get their own folders.
    """
    from storage.atomic import read_json, sha256_json, write_json
    from tasks.config import TrainConfig
    from tasks.identity import model_identity
    from tasks.train.loop import train
    from tasks.train.loop_config import LoopConfig
    from tasks.train.runtime import LocalRuntime

    update = {**(train_set or {}), "objective": row["method"], "steps": steps, "seed": seed, "learning_rate": lr,
              "checkpoint_every": steps}
    cfg = TrainConfig.model_validate({**setup["config"].train.model_dump(), **update})
    variant = f"-set{sha256_json(train_set)[:8]}" if train_set else ""
    out_dir = setup["root"] / "runs" / f"{row['init']}-{row['method']}-lr{lr:g}{variant}-seed{seed}"
    # the init's identity (config, weight sizes and mtimes), not its path: a retrained sft init in the same folder is new
    key = sha256_json({"init": model_identity(inits[row["init"]]), "labels": setup["labels"].train_manifest, "train": cfg.model_dump(),
                       "eval": setup["prepared"].eval.sha256})
    done = out_dir / "result.json"
    if done.exists() and read_json(done).get("key") == key:
        return read_json(done)["result"]
    (out_dir / "train_log.jsonl").unlink(missing_ok=True)
    started = time.time()
    train(LoopConfig.build(cfg, student_dir=inits[row["init"]], manifest=setup["labels"].train_manifest, out_dir=out_dir,
                           threads_per_worker=torch.get_num_threads()), LocalRuntime())
    result = {"seed": seed, "init": row["init"], "learning_rate": lr,
              **scores(str(out_dir / "student"), prompts, setup["labels"].eval_manifest, setup["config"].eval.max_new_tokens),
              "train_seconds": round(time.time() - started, 1)}
    write_json(done, {"key": key, "result": result})
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--tasks", nargs="*", default=list(TASKS), choices=("qa", "transform", "classify", "mix"))
    parser.add_argument("--grid", choices=("full", "reduced"), default="full",
                        help="reduced: the lr check on the first task only")
    parser.add_argument("--groups", nargs="*", default=list(GROUPS), choices=GROUPS)
    parser.add_argument("--methods", nargs="*", default=None, help="restrict every group to these objectives")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300, help="training steps of every run (the flow's train.steps default)")
    parser.add_argument("--sft-steps", type=int, default=300, help="steps of the sft init (cross-entropy on references)")
    parser.add_argument("--alt-lr", type=float, default=1e-3, help="learning rate of the lr-check group")
    parser.add_argument("--train-examples", type=int, default=None, help="cap on training prompts (default: all 6000)")
    parser.add_argument("--eval-examples", type=int, default=None, help="cap on held-out prompts (default: all 300)")
    parser.add_argument("--teacher-steps", type=int, default=None, help="demo teacher steps (default: data.demo_teacher_steps)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine two threads ran 10x slower)")
    parser.add_argument("--labels", choices=("vllm", "hf"), default="vllm",
                        help="teacher labels from the teacher stage (vLLM in Ray actors) or from transformers in this "
                             "process (same format and content; for machines where the Ray actors get no CPU time)")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained in parallel (processes)")
    parser.add_argument("--out", default=None,
                        help="where methods.json and the table go (default: docs/results; for the objectives family "
                        "restricted by --tasks, --methods, --groups or --train-set, DATA_DIR/compare-results, so a partial run "
                        "does not replace the committed table)")
    parser.add_argument("--train-set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="train config fields for every run of the objectives family, e.g. packing=true fused_head=true "
                        "(values parsed as YAML); such runs are trained in their own folders and recorded under 'train_set'")
    parser.add_argument("--family", choices=("objectives", "dynamic", "limited", "onpolicy"), default="objectives",
                        help="dynamic: the Dynamic KD / multi-teacher rows (flows/compare_dynamic.py) on the first task, "
                        "merged into methods.json under 'dynamic'; limited: issue 17's limited-data rows (ce, fkl, mixkd, "
                        "fkl on expanded+curated prompts; flows/compare_limited.py), merged under 'limited_data'; onpolicy: issue 15's "
                        "minillm, gkd, onpolicy_rkl and MiniLLM's two ablations beside ce, fkl, akl from the sft init "
                        "(flows/compare_onpolicy.py), merged under 'onpolicy'")
    compare_limited.add_arguments(parser)
    compare_onpolicy.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.family != "objectives" or not restricted(args):
        args.out = args.out or "docs/results"
    if args.family == "limited":
        return compare_limited.run(args, sys.argv[1:] if argv is None else argv)

    from flows.cli import configure_runtime
    from tasks.config import default_data_dir
    from tasks.data import read_prompts
    from tasks.identity import code_version

    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = Path(args.data_dir or default_data_dir()).resolve()
    configure_runtime(str(data_dir))
    args.out = args.out or str(data_dir / "compare-results")
    print(f"compare: results go to {args.out}", flush=True)
    if args.family == "dynamic":
        return dynamic_family(args, data_dir, argv)
    if args.family == "onpolicy":
        return compare_onpolicy.run(args, data_dir, argv)
    setups = {t: prepare_task(data_dir, t, args) for t in args.tasks}
    import ray

    ray.shutdown()  # free the cores for training
    rows = [r for r in plan(args.grid, args.tasks) if r["group"] in args.groups and (not args.methods or r["method"] in args.methods)]
    train_set = parse_train_set(args.train_set)
    command = "python -m flows.compare " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    results = {"primary_metric": "exact_match", "steps": args.steps, "sft_steps": args.sft_steps, "seeds": args.seeds,
               "alt_lr": args.alt_lr, "grid": args.grid, "command": command.strip(), "commit": code_version()[:7],
               "date": time.strftime("%Y-%m-%d"), "train_set": train_set, "tasks": {}}
    inits, prompts = {}, {}
    for task_name, setup in setups.items():
        cfg = setup["config"]
        inits[task_name] = ensure_inits(setup, args.sft_steps)
        prompts[task_name] = read_prompts(setup["prepared"].eval.path)
        eval_manifest, n = setup["labels"].eval_manifest, cfg.eval.max_new_tokens
        results["tasks"][task_name] = {
            "batch_size": cfg.train.batch_size, "support": cfg.train.support, "top_k": cfg.teacher.top_k,
            "learning_rate": cfg.train.learning_rate, "train_examples": setup["prepared"].train.rows,
            "eval_examples": len(prompts[task_name]), "eval_prompts_seen_in_train": _seen(setup),
            "teacher": scores(setup["demo"]["teacher"], prompts[task_name], eval_manifest, n),
            "inits": {name: {"init": name, **scores(path, prompts[task_name], eval_manifest, n)}
                      for name, path in inits[task_name].items()},
            "runs": {}}
        print(f"compare[{task_name}]: teacher {results['tasks'][task_name]['teacher']}, "
              f"inits {results['tasks'][task_name]['inits']}", flush=True)
    # Rows in priority order (every task's main group first, then sft, init, lr), so a cut-short run has the core rows.
    work = {}
    for row in sorted(rows, key=lambda r: GROUPS.index(r["group"])):
        default_lr = setups[row["task"]]["config"].train.learning_rate
        lr = args.alt_lr if row["lr"] == "alt" else default_lr
        work.setdefault((row["task"], run_name(row["method"], row["init"], lr, default_lr)), (row, lr))
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                             initargs=(args.threads,)) as pool:
        futures = {(key, seed): pool.submit(run_one, setups[key[0]], inits[key[0]], row, seed, args.steps, lr, prompts[key[0]],
                                                train_set=train_set)
                   for key, (row, lr) in work.items() for seed in range(args.seeds)}
        for (task_name, name), (row, lr) in work.items():
            runs = []
            for seed in range(args.seeds):
                runs.append(futures[((task_name, name), seed)].result())
                print(f"compare[{task_name}]: {name} seed {seed}: {runs[-1]}", flush=True)
            results["tasks"][task_name]["runs"][name] = {"group": row["group"], "method": row["method"], "init": row["init"],
                                                         "learning_rate": lr, "runs": runs}
            write_results(results, Path(args.out))  # after every row: an interrupted run leaves a partial table
    print(render_table(results))
    return 0


def dynamic_family(args, data_dir: Path, argv=None) -> int:
    """The Dynamic KD / multi-teacher rows, merged into methods.json (key 'dynamic') without touching other rows."""
    from flows.compare_dynamic import render, run_dynamic_family
    from tasks.identity import code_version

    entry = run_dynamic_family(args, data_dir)
    entry.update(command="python -m flows.compare " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
                 commit=code_version()[:7], date=time.strftime("%Y-%m-%d"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "methods.json"
    existing = json.loads(path.read_text()) if path.exists() else {}
    existing["dynamic"] = entry
    path.write_text(json.dumps(existing, indent=2) + "\n")
    (out / "methods_dynamic_table.md").write_text(render(entry))
    print(render(entry))
    return 0


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _seen(setup: dict) -> int:
    from tasks.data import read_prompts
    from tasks.textnorm import seen_in

    train = [p["prompt"] for p in read_prompts(setup["prepared"].train.path)]
    return seen_in([p["prompt"] for p in read_prompts(setup["prepared"].eval.path)], train)


def parse_train_set(items: list[str]) -> dict:
    """FIELD=VALUE pairs (values as YAML) checked against TrainConfig before any work."""
    import yaml

    from tasks.config import TrainConfig

    out = {}
    for item in items:
        field, sep, value = item.partition("=")
        if not sep or field not in TrainConfig.model_fields:
            raise SystemExit(f"--train-set {item!r}: expected FIELD=VALUE with FIELD a train config field")
        out[field] = yaml.safe_load(value)
    TrainConfig.model_validate(out)
    return out


def restricted(args) -> bool:
    """An objectives-family run of part of the grid (some tasks, methods or groups) or with other train settings."""
    return bool(args.methods or args.train_set or set(args.groups) != set(GROUPS) or set(args.tasks) != set(TASKS))


def run_name(method: str, init: str, lr: float, default_lr: float) -> str:
    return f"{method} [{init}]" + ("" if lr == default_lr else f" lr={lr:g}")


def write_results(results: dict, out: Path) -> None:
    """methods.json keeps the entries other comparison families merged into it (e.g. 'dynamic'); ours are replaced."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "methods.json"
    kept = {}
    if path.exists():
        try:
            kept = {k: v for k, v in json.loads(path.read_text()).items() if k not in results and k != "methods"}
        except ValueError:
            kept = {}
    path.write_text(json.dumps({**results, **kept}, indent=2) + "\n")
    (out / "methods_table.md").write_text(render_table(results))


def mean_and_spread(entry: dict, metric: str) -> tuple[float, float]:
    """Mean and sample standard deviation of one method's metric over its seeds (spread 0 for one seed)."""
    values = [r[metric] for r in entry["runs"]]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def gap_closed(task: dict, name: str, metric: str = "exact_match") -> float | None:
    """(M - M_ce) / (M_teacher - M_ce), ce from the same init and learning rate; None without that ce row or gap."""
    entry = task["runs"][name]
    ce = run_name("ce", entry["init"], entry["learning_rate"], task["learning_rate"])
    if ce not in task["runs"]:
        return None
    ce_mean = mean_and_spread(task["runs"][ce], metric)[0]
    gap = task["teacher"][metric] - ce_mean
    if abs(gap) < 1e-9:
        return None
    return (mean_and_spread(entry, metric)[0] - ce_mean) / gap


def render_table(results: dict) -> str:
    lines = [f"## Measured: {results['steps']} steps per run (sft init: {results['sft_steps']} steps), "
             f"{results['seeds']} seeds, commit {results['commit']}, {results['date']}", "",
             f"Command: `{results['command']}`", "",
             "Mean ± sample standard deviation over seeds, on held-out prompts that never occur in training. "
             "Gap closed = (EM − EM_ce) / (EM_teacher − EM_ce), ce from the same init and learning rate.", ""]
    for task_name, task in results["tasks"].items():
        lines += [f"### Task `{task_name}` ({task['train_examples']} training prompts, {task['eval_examples']} held-out, "
                  f"{task['eval_prompts_seen_in_train']} of them seen in training; batch {task['batch_size']}, "
                  f"k={task['top_k']}, lr {task['learning_rate']:g})", "",
                  f"Teacher: exact match {task['teacher']['exact_match']:.3f}, ROUGE-L {task['teacher']['rouge_l']:.3f}. "
                  "Initial students before any training on the task: "
                  + ", ".join(f"{n} EM {s['exact_match']:.3f} / ROUGE-L {s['rouge_l']:.3f} / KL {s['kl_to_teacher']:.2f}"
                              for n, s in task["inits"].items()) + ".", "",
                  "| run | group | exact match | ROUGE-L | KL to teacher | gap closed vs ce |", "|---|---|---|---|---|---|"]
        for name, entry in task["runs"].items():
            cells = []
            for metric in ("exact_match", "rouge_l", "kl_to_teacher"):
                mean, spread = mean_and_spread(entry, metric)
                cells.append(f"{mean:.3f} ± {spread:.3f}")
            closed = gap_closed(task, name)
            cells.append("—" if closed is None or entry["method"] == "ce" else f"{closed:+.2f}")
            lines.append(f"| {name} | {entry['group']} | " + " | ".join(cells) + " |")
        lines += ["", *ordering(task), ""]
    return "\n".join(lines) + "\n"


def ordering(task: dict, init: str = "base") -> list[str]:
    """The objectives from one init ranked by exact match, and whether AKL >= FKL > RKL holds beyond the seed spread."""
    runs = {e["method"]: e for n, e in task["runs"].items() if e["init"] == init and e["learning_rate"] == task["learning_rate"]}
    if not runs:
        return []
    stats = {m: mean_and_spread(e, "exact_match") for m, e in runs.items()}
    ranked = sorted(stats, key=lambda m: -stats[m][0])
    out = [f"Ordering from {init} (exact match): " + " > ".join(f"{m} {stats[m][0]:.3f}" for m in ranked) + "."]
    if {"akl", "fkl", "rkl"} <= set(stats):
        akl, fkl, rkl = stats["akl"], stats["fkl"], stats["rkl"]
        holds = akl[0] >= fkl[0] and fkl[0] > rkl[0]
        clear = fkl[0] - rkl[0] > max(fkl[1], rkl[1])
        out.append(f"AKL ≥ FKL > RKL (the AKL paper's order): {'holds' if holds else 'does not hold'} "
                   f"(akl {akl[0]:.3f}, fkl {fkl[0]:.3f}, rkl {rkl[0]:.3f}; FKL − RKL "
                   f"{'exceeds' if clear else 'is within'} the larger seed spread).")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
