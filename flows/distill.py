"""The distillation DAG: prepare → teacher labels → train student → evaluate → gate and promote.

Composition only: each task calls one stage. Stages take typed inputs and return
typed, frozen outputs (tasks.contracts) that are also their on-disk records; the
cacheable ones run through tasks.stage_cache, which reuses finished work by content key.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from flows.console import stage_started
from storage.atomic import write_json
from tasks import gate_and_promote as promotion
from tasks import prepare
from tasks.augment import flow_stage as mixkd_stage
from tasks.config import PipelineConfig
from tasks.contracts import Evaluation, PreparedData, PromotionOutcome, StudentInit, TeacherLabels, TrainedStudent
from tasks.curate import flow_stage as curate_stage
from tasks.evaluate import stage as eval_stage
from tasks.expand import flow_stage as expand_stage
from tasks.faults import FaultPlan
from tasks.init import stage as init_stage
from tasks.onpolicy import rounds as onpolicy_stage
from tasks.ray_logs import ray_output_to
from tasks.runs import claim_run_dir, write_failure, write_success
from tasks.select import labels as select_labels
from tasks.select import stage as select_stage
from tasks.stage_cache import run_cached
from tasks.teacher import ensemble as ensemble_stage
from tasks.teacher import stage as teacher_stage
from tasks.tracking import track_run
from tasks.train import stage as train_stage
from tasks.user_errors_log import quiet_user_error_tracebacks


def _log():
    stage_started()  # every task calls _log() first: the CLI console's stage line (flows.console); no log record
    return get_run_logger().info


def _cache(config: PipelineConfig, faults: FaultPlan) -> dict:
    return {"cache_root": Path(config.data_dir) / "cache", "log": _log(), "faults": faults, "ray_address": config.train.ray_address}


@task(name="prepare-data")
def prepare_data(config: PipelineConfig, run_dir: str) -> PreparedData:
    return prepare.run(config, Path(run_dir), log=_log())


@task(name="student-init")
def student_init(config: PipelineConfig, prepared: PreparedData, faults: FaultPlan) -> StudentInit:
    if config.train.init == "as_is":
        return StudentInit(key=f"as-is-{prepared.student_dir}", student_dir=prepared.student_dir,
                           init=init_stage.init_label(config.train.student))
    with ray_output_to(_log()):
        return run_cached(init_stage.STAGE, init_stage.sft_config(config.train), prepared, **_cache(config, faults))


@task(name="expand-prompts")
def expand_prompts(config: PipelineConfig, prepared: PreparedData, faults: FaultPlan) -> expand_stage.ExpandedPrompts:
    template = expand_stage.prompt_frame(config.data, prepared.checks.get("format", "prompt"))
    inputs = expand_stage.ExpandInputs(prepared=prepared, teacher=config.teacher, template=template)
    with ray_output_to(_log()):
        return run_cached(expand_stage.STAGE, config.expand, inputs, **_cache(config, faults))


@task(name="curate-prompts")
def curate_prompts(config: PipelineConfig, prepared: PreparedData, expanded: expand_stage.ExpandedPrompts | None,
                   faults: FaultPlan) -> curate_stage.CuratedPrompts:
    inputs = curate_stage.CurateInputs(prepared=prepared, expanded=expanded, data=config.data,
                                       max_new_tokens=config.teacher.max_new_tokens)
    return run_cached(curate_stage.STAGE, config.curate, inputs, **_cache(config, faults))


@task(name="mixkd-labels")
def mixkd_labels(config: PipelineConfig, prepared: PreparedData, labels: TeacherLabels, faults: FaultPlan) -> mixkd_stage.MixKDLabels:
    inputs = mixkd_stage.MixKDInputs(teacher_dir=prepared.teacher_dir, teacher_model=config.teacher.model, labels=labels)
    with ray_output_to(_log()):
        return run_cached(mixkd_stage.STAGE, config.train.mixkd, inputs, **_cache(config, faults))


@task(name="teacher-labels")
def teacher_labels(config: PipelineConfig, prepared: PreparedData, faults: FaultPlan) -> TeacherLabels:
    with ray_output_to(_log()):
        return run_cached(teacher_stage.STAGE, config.teacher, prepared, **_cache(config, faults))


@task(name="check-teachers")
def check_teachers(config: PipelineConfig, prepared: PreparedData) -> list[str]:
    """Multi-teacher members resolved and checked against the student's tokenizer before any teacher compute."""
    return ensemble_stage.check_members(config, prepared, log=_log())


@task(name="select-prompts")
def select_prompts(config: PipelineConfig, prepared: PreparedData, init: StudentInit, faults: FaultPlan) -> select_stage.SelectedPrompts:
    inputs = select_stage.SelectInputs(prepared=prepared, student_dir=init.student_dir)
    with ray_output_to(_log()):
        return run_cached(select_stage.STAGE, config.select, inputs, **_cache(config, faults))


@task(name="teacher-labels")
def selected_teacher_labels(config: PipelineConfig, prepared: PreparedData, selection: select_stage.SelectedPrompts,
                            init: StudentInit, member_dirs: list[str], faults: FaultPlan) -> TeacherLabels:
    """The teacher labels each selection increment once (earlier ones come from the stage cache), then one label set.
    With `teachers:` the extra teachers score each increment's responses and the merged (or routed) increments are
    what the label set links: a larger select.fraction scores only the new increment, with every teacher."""
    with ray_output_to(_log()):
        parts = []
        for increment in selection.increments:
            increment_prepared = prepared.model_copy(update={"train": increment})
            part = run_cached(teacher_stage.STAGE, config.teacher, increment_prepared, **_cache(config, faults))
            if member_dirs:
                part = run_ensemble(config, increment_prepared, part, member_dirs, faults)
            parts.append(part)
        inputs = select_labels.SelectedLabelsInputs(selection=selection, parts=parts, student_dir=init.student_dir,
                                                    reference_prefix=config.teacher.reference_prefix)
        return run_cached(select_labels.STAGE, config.select, inputs, **_cache(config, faults))


def run_ensemble(config: PipelineConfig, prepared: PreparedData, labels: TeacherLabels, member_dirs: list[str],
                 faults: FaultPlan) -> TeacherLabels:
    """The multi-teacher stage on one label set (the main teacher's labels of `prepared.train`)."""
    stage_config = ensemble_stage.EnsembleStageConfig(main=config.teacher, members=config.teachers, ensemble=config.ensemble,
                                                      pair=config.train.dynamic_teacher != "off")
    routing = Path(prepared.source) / f"{prepared.train_split}.jsonl"
    inputs = ensemble_stage.EnsembleInputs(prepared=prepared, labels=labels, member_dirs=member_dirs,
                                           routing_rows=str(routing) if routing.exists() else None)
    return run_cached(ensemble_stage.STAGE, stage_config, inputs, **_cache(config, faults))


@task(name="multi-teacher")
def multi_teacher_labels(config: PipelineConfig, prepared: PreparedData, labels: TeacherLabels, member_dirs: list[str],
                         faults: FaultPlan) -> TeacherLabels:
    with ray_output_to(_log()):
        return run_ensemble(config, prepared, labels, member_dirs, faults)


@task(name="train-student")
def train_student(config: PipelineConfig, init: StudentInit, labels: TeacherLabels, faults: FaultPlan,
                  mixkd: mixkd_stage.MixKDLabels | None = None) -> TrainedStudent:
    inputs = train_stage.TrainInputs(student_dir=init.student_dir, labels=labels, mixkd=mixkd)
    with ray_output_to(_log()):
        return run_cached(train_stage.STAGE, config.train, inputs, **_cache(config, faults))


@task(name="onpolicy-rounds")
def onpolicy_rounds(config: PipelineConfig, prepared: PreparedData, init: StudentInit, labels: TeacherLabels,
                    faults: FaultPlan) -> TrainedStudent:
    """On-policy distillation: rounds of student rollouts, teacher scoring and updates; one table row per round."""
    inputs = onpolicy_stage.OnPolicyInputs(student_dir=init.student_dir, prompts=prepared.train, teacher_dir=prepared.teacher_dir,
                                           teacher_hash=prepared.teacher_hash, labels_manifest=labels.train_manifest,
                                           labels_key=labels.key)
    with ray_output_to(_log()):
        student = run_cached(onpolicy_stage.STAGE, config.onpolicy, inputs, **_cache(config, faults))
    create_table_artifact(key="onpolicy-rounds", table=onpolicy_stage.round_rows(student.log),
                          description="On-policy rounds: reward, reverse KL to the teacher, response length, policy version, seconds")
    return student


@task(name="evaluate")
def evaluate(config: PipelineConfig, prepared: PreparedData, labels: TeacherLabels, student: TrainedStudent) -> Evaluation:
    inputs = eval_stage.EvalInputs(prepared=prepared, labels=labels, student=student)
    with ray_output_to(_log()):
        evaluation = run_cached(eval_stage.STAGE, config.eval, inputs, **_cache(config, FaultPlan()))
    create_table_artifact(key="eval-metrics", table=promotion.metric_rows(evaluation),
                          description="Held-out metrics with 95% bootstrap intervals")
    return evaluation


@task(name="gate-and-promote")
def gate_and_promote(config: PipelineConfig, inputs: promotion.PromotionInputs, run_dir: str) -> PromotionOutcome:
    outcome, report = promotion.run(config, inputs, Path(run_dir), log=_log())
    create_markdown_artifact(key="run-report", markdown=report["markdown"])
    create_table_artifact(key="run-comparison", table=report["table"])
    return outcome


@flow(name="distill", log_prints=True)
def distill(config: PipelineConfig = PipelineConfig(), faults: FaultPlan = FaultPlan()) -> str:
    """Distil a student from a teacher and decide whether to promote it; returns the run.json path.

    `faults` is for tests only (tasks.faults); leave it empty."""
    started = time.time()
    quiet_user_error_tracebacks()
    run_dir = claim_run_dir(Path(config.data_dir) / "runs", config.run_name, owner=str(flow_run.get_id() or started))
    write_json(run_dir / "config.json", config.model_dump(mode="json"))
    stage = "prepare-data"
    try:
        prepared = prepare_data(config, str(run_dir))
        stage = "student-init"
        init = student_init(config, prepared, faults)
        expanded = curated = mixkd = None
        if config.expand is not None:
            stage = "expand-prompts"
            expanded = expand_prompts(config, prepared, faults)
        if config.curate is not None:
            stage = "curate-prompts"
            curated = curate_prompts(config, prepared, expanded, faults)
        member_dirs = check_teachers(config, prepared) if config.teachers else []
        stage = "teacher-labels"
        to_label = prepared.model_copy(update={"train": curated.train}) if curated else prepared
        if config.select.enabled:  # lazy labelling: the teacher sees only the prompts the student is least sure of
            stage = "select-prompts"
            selection = select_prompts(config, to_label, init, faults)
            stage = "teacher-labels"
            labels = selected_teacher_labels(config, to_label, selection, init, member_dirs, faults)
        else:
            labels = teacher_labels(config, to_label, faults)
        if config.teachers and not config.select.enabled:  # extra teachers score the main teacher's responses;
            # merged, routed or paired (with selection: per increment, inside teacher-labels)
            stage = "multi-teacher"
            labels = multi_teacher_labels(config, to_label, labels, member_dirs, faults)
        if config.train.mixkd is not None:
            stage = "mixkd-labels"
            mixkd = mixkd_labels(config, prepared, labels, faults)
        if config.onpolicy is not None:
            stage = "onpolicy-rounds"
            student = onpolicy_rounds(config, to_label, init, labels, faults)
        else:
            stage = "train-student"
            student = train_student(config, init, labels, faults, mixkd)
        stage = "evaluate"
        evaluation = evaluate(config, prepared, labels, student)
        reused = [name for name, out in (("teacher-labels", labels), ("train-student", student), ("evaluate", evaluation)) if out.reused]
        if len(reused) == 3:
            get_run_logger().info("nothing new since an earlier run (same data, teacher, student and settings): "
                                  "labels, student and evaluation all reused from the stage cache")
        stage = "gate-and-promote"
        outcome = gate_and_promote(config, promotion.PromotionInputs(prepared=prepared, labels=labels, student=student,
                                                                     evaluation=evaluation, reused_stages=reused), str(run_dir))
    except BaseException as exc:
        write_failure(run_dir, stage, exc)
        raise
    path = write_success(run_dir, {
        "run_name": run_dir.name,
        "run_dir": str(run_dir),
        "soft_labels_manifest": labels.train_manifest,
        "heldout_labels_manifest": labels.eval_manifest,
        "student_checkpoint": student.checkpoint,
        "train_log": student.log,
        "metrics_file": evaluation.metrics_file,
        "metrics": {who: evaluation.values(who) for who in ("student", "teacher")},
        "data_checks": prepared.checks,
        "expansion": None if expanded is None else {"rows": expanded.prompts.rows, "prompts": expanded.prompts.path,
                                                    "stats": expanded.stats, "complete": expanded.complete},
        "curation": None if curated is None else curated.summary(),
        "mixkd": None if mixkd is None else mixkd.model_dump(mode="json", exclude={"reused", "key"}),
        "student_init": {"init": init.init, "student_dir": init.student_dir, "reused": init.reused},
        "decision": outcome.decision,
        "reused_stages": reused,
        "wall_seconds": round(time.time() - started, 1),
    })
    track_run(config.tracking, config.data_dir, path, config.model_dump(mode="json"), registry_dir=prepare.registry_dir(config),
              log_fn=get_run_logger().warning)
    get_run_logger().info(f"run written to {path}")
    return str(path)
