"""Teacher stage entry point: label the training prompts (sampled or scored) and the held-out prompts (greedy).

The held-out labels double as the teacher's greedy answers for evaluation, so
the teacher engines start once per run. They depend only on the teacher, the
held-out prompts and the settings that shape a greedy capture, so they live in a
folder of their own keyed by exactly those (`heldout_folder`): runs whose training
prompts differ (each increment of a growing Dynamic KD selection, expanded data)
reuse one held-out capture instead of relabelling it. Engines live in Ray actors, one per
replica (data parallel: shards go to whichever replica is free), killed
afterwards, which frees the engines' memory reliably. The driver writes the
manifest once every shard is done, so a manifest always lists a whole capture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from storage import soft_labels
from storage.atomic import sha256_json
from tasks.config import TeacherConfig
from tasks.contracts import PreparedData, TeacherLabels
from tasks.data import read_prompts
from tasks.identity import model_content_hash, model_identity
from tasks.models import load_tokenizer, tokenizer_hash
from tasks.stage_cache import StageContext, StageSpec


class TeacherReplica:
    """One vLLM engine holding the teacher; methods run inside a Ray actor."""

    def __init__(self, model_dir: str, cfg: TeacherConfig, replica: int = 0):
        from tasks.teacher.engine import build_engine

        self.replica = replica
        self.llm = build_engine(model_dir, cfg.engine, max_logprobs=cfg.top_k, logprobs_mode=cfg.logprobs_mode)

    def check(self, prompts, k, mode, max_new_tokens) -> None:
        from tasks.teacher.capture import check_request

        check_request(self.llm, prompts, k=k, mode=mode, max_new_tokens=max_new_tokens)

    def capture_shard(self, chunk, index, num_shards, out_dir, split, metadata, sampling, mode="generate",
                      pause_after_shard_s=0.0):
        """Label one shard; returns (replica index, manifest record, the shard's log lines)."""
        from tasks.teacher.capture import capture_shard

        lines: list[str] = []

        def log(line: str) -> None:  # printed as it happens: Ray forwards it to the driver (tasks.ray_logs: the run log)
            print(f"{line} [replica {self.replica}]", flush=True)
            lines.append(line)

        record = capture_shard(self.llm, chunk, index, num_shards, Path(out_dir), split=split, metadata=metadata,
                               log_fn=log, mode=mode, pause_after_shard_s=pause_after_shard_s, **sampling)
        return self.replica, record, lines


def label_metadata(cfg: TeacherConfig, teacher_dir: str, split: str, sampling: dict[str, Any],
                   mode: str = "generate", teacher_hash: str | None = None) -> dict[str, Any]:
    from tasks.teacher.engine import vllm_version

    tok = load_tokenizer(teacher_dir, cfg.engine.trust_remote_code)
    meta = {
        "schema_version": soft_labels.SCHEMA_VERSION,
        "codec": cfg.codec,
        "split": split,
        "mode": mode,
        "response_source": "reference" if mode == "score" else "teacher_sample",
        "teacher_model": cfg.model,
        "teacher_revision": cfg.revision,
        "teacher_hash": teacher_hash or model_content_hash(teacher_dir),
        "tokenizer_hash": tokenizer_hash(tok),
        "chat_template_hash": sha256_json(getattr(tok, "chat_template", None))[:16],
        "vocab_size": len(tok),
        "vllm_version": vllm_version(),
        "logprobs_mode": cfg.logprobs_mode,
        "k": cfg.top_k,
        "sampling": sampling,
    }
    if mode == "score":
        meta["reference_prefix"] = cfg.reference_prefix
    keyed = ("teacher_hash", "tokenizer_hash", "logprobs_mode", "k", "sampling", "mode", "reference_prefix")
    meta["teacher_key"] = sha256_json({k: meta.get(k) for k in keyed})[:16]
    return meta


def reference_prompts(prompts: list[dict[str, Any]], tokenizer, prefix: str) -> list[dict[str, Any]]:
    """Attach response_ids = tokens of prefix + first reference, then EOS (the demo teacher's training format)."""
    from tasks.teacher.capture import CaptureError

    if tokenizer.eos_token_id is None:
        raise CaptureError("score mode: the teacher tokenizer has no eos_token; cannot end the reference responses")
    out = []
    for p in prompts:
        refs = p.get("references") or []
        if not refs or not refs[0].strip():
            raise CaptureError(
                f"example {p['example_id']}: score mode needs a non-empty first reference; "
                "set data.reference_field or use teacher.mode=generate"
            )
        ids = tokenizer(prefix + refs[0], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append({**p, "response_ids": ids})
    return out


def capture_on_replicas(replicas: list, prompts: list[dict[str, Any]], out_dir: Path, *, split: str,
                        metadata: dict[str, Any], shard_rows: int, sampling: dict[str, Any], mode: str = "generate",
                        pause_after_shard_s: float = 0.0) -> tuple[Path, dict[int, int], list[str]]:
    """Spread the shards of one capture over TeacherReplica actors; write the manifest when all are done.

    Returns the manifest path, how many shards each replica labelled and the
    shards' log lines in shard order. The
    shards are the same whatever the number of replicas (each prompt's seed
    derives from its content), so the manifest is too.
    """
    import ray
    from ray.util import ActorPool

    from tasks.teacher.capture import shard_chunks

    ray.get(replicas[0].check.remote(prompts, int(metadata["k"]), mode, int(sampling.get("max_new_tokens", 0))))
    chunks = shard_chunks(prompts, shard_rows)
    pool = ActorPool(replicas)
    work = list(enumerate(chunks))
    results = pool.map_unordered(
        lambda actor, item: actor.capture_shard.remote(item[1], item[0], len(chunks), str(out_dir), split, metadata,
                                                       sampling, mode, pause_after_shard_s),
        work,
    )
    records: dict[str, dict[str, Any]] = {}
    lines: dict[str, list[str]] = {}
    per_replica: dict[int, int] = {}
    for replica, record, shard_lines in results:
        records[record["path"]] = record
        lines[record["path"]] = shard_lines
        per_replica[replica] = per_replica.get(replica, 0) + 1
    names = [soft_labels.shard_name(i) for i in range(len(chunks))]
    manifest = soft_labels.write_manifest(Path(out_dir), [records[n] for n in names], metadata)
    return manifest, per_replica, [line for n in names for line in lines[n]]


def start_replicas(cfg: TeacherConfig, teacher_dir: str) -> list:
    """One TeacherReplica actor per replica; refuses more replicas than the Ray cluster can place."""
    import ray

    from tasks.ray_runtime import cluster_resources

    gpus = cfg.engine.tensor_parallel_size if cfg.use_gpu else 0
    available = cluster_resources()
    need = {"CPU": cfg.replicas * cfg.cpus_per_replica, "GPU": cfg.replicas * gpus}
    for resource, amount in need.items():
        if amount > available.get(resource, 0):
            raise ValueError(
                f"teacher.replicas={cfg.replicas} needs {amount:g} {resource} but the Ray cluster offers "
                f"{available.get(resource, 0):g}; lower teacher.replicas (or cpus_per_replica)"
            )
    actor_cls = ray.remote(TeacherReplica).options(num_cpus=cfg.cpus_per_replica, num_gpus=gpus)
    return [actor_cls.remote(teacher_dir, cfg, i) for i in range(cfg.replicas)]


# TeacherConfig fields that only shape the training labels (sampling, score mode); the held-out capture is greedy.
TRAIN_ONLY_FIELDS = frozenset({"temperature", "top_p", "samples_per_prompt", "mode", "reference_prefix"})


def heldout_folder(cfg: TeacherConfig, prepared: PreparedData, stage_dir: Path) -> Path:
    """Where the held-out capture of this teacher, these prompts and these greedy settings lives: `labels-heldout/KEY`
    beside the stage's own cache folder (cache/labels/KEY), KEY made of exactly what decides its content."""
    from tasks.stage_cache import content_fields

    settings = {k: v for k, v in content_fields(cfg).items() if k not in TRAIN_ONLY_FIELDS}
    key = sha256_json({"teacher_model": model_identity(prepared.teacher_dir), "prompts": prepared.eval.sha256,
                       "split": prepared.eval_split, "settings": settings})[:16]
    return stage_dir.parent.parent / "labels-heldout" / key


def run_teacher_stage(cfg: TeacherConfig, prepared: PreparedData, ctx: StageContext) -> TeacherLabels:
    """Label the training prompts (sampled or scored) and the held-out prompts (greedy) into ctx.out_dir/{train,eval}."""
    import ray

    from tasks.ray_runtime import ensure_ray

    ensure_ray(ctx.ray_address)
    teacher_dir = prepared.teacher_dir
    plans = {
        "train": (prepared.train, prepared.train_split, cfg.mode, dict(temperature=cfg.temperature, top_p=cfg.top_p, n=cfg.samples_per_prompt)),
        "eval": (prepared.eval, prepared.eval_split, "generate", dict(temperature=0.0, top_p=1.0, n=1)),
    }
    work = []
    for role, (split_file, split, mode, sampling) in plans.items():
        prompts = read_prompts(split_file.path)
        if mode == "score":
            sampling = {}
            prompts = reference_prompts(prompts, load_tokenizer(teacher_dir, cfg.engine.trust_remote_code), cfg.reference_prefix)
        else:
            sampling = {**sampling, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.engine.seed}
        work.append((role, split, mode, sampling, prompts))
    folders = {"train": ctx.out_dir / "train", "eval": heldout_folder(cfg, prepared, ctx.out_dir) / "eval"}
    manifests = {}
    if _intact(folders["eval"] / soft_labels.MANIFEST_NAME):
        manifests["eval"] = str(folders["eval"] / soft_labels.MANIFEST_NAME)
        ctx.log(f"teacher: eval labels reused (same teacher, held-out prompts and settings): {manifests['eval']}")
        work = [w for w in work if w[0] != "eval"]
    replicas = start_replicas(cfg, teacher_dir)
    try:
        for role, split, mode, sampling, prompts in work:
            metadata = label_metadata(cfg, teacher_dir, split, sampling, mode, teacher_hash=prepared.teacher_hash)
            manifest, per_replica, _ = capture_on_replicas(
                replicas, prompts, folders[role], split=split, metadata=metadata, shard_rows=cfg.shard_rows,
                sampling=sampling, mode=mode, pause_after_shard_s=ctx.faults.shard_pause_s,
            )
            manifests[role] = str(manifest)
            spread = ", ".join(f"replica {r}: {n}" for r, n in sorted(per_replica.items()))
            ctx.log(f"teacher: {role} labels complete ({spread} shards): {manifests[role]}")
    finally:
        for replica in replicas:
            ray.kill(replica)
    return TeacherLabels(key=ctx.key, train_manifest=manifests["train"], eval_manifest=manifests["eval"])


def labels_intact(output: TeacherLabels) -> bool:
    """Both manifests exist and every shard they list is finished with the recorded checksum."""
    return all(_intact(Path(p)) for p in (output.train_manifest, output.eval_manifest))


def _intact(path: Path) -> bool:
    if not path.exists():
        return False
    try:
        manifest = soft_labels.load_manifest(path)
    except ValueError:
        return False
    for index, record in enumerate(manifest["shards"]):
        done = soft_labels.finished_shard(path.parent, index)
        if done is None or done["sha256"] != record["sha256"]:
            return False
    return True


def _key_parts(cfg: TeacherConfig, prepared: PreparedData) -> dict[str, Any]:
    return {"teacher_model": model_identity(prepared.teacher_dir), "prompts": {"train": prepared.train.sha256, "eval": prepared.eval.sha256}}


STAGE = StageSpec(name="labels", version=2, output_type=TeacherLabels, run=run_teacher_stage, key_parts=_key_parts,
                  verify=labels_intact, describe="labels")
