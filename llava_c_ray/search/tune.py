"""The α search: a Ray Tune experiment whose trials lease quick evaluation actors.

Per stage the SVD factors are computed once (the consolidation engine's cache); a pool of
`SearchActor`s loads θ̃_{t-1} once each; every trial takes an actor from the pool, has it apply
θ̃(α) and answer a small validation subset of the new, old and general tasks, and reports the
weighted objective (`search.objective`). With `search.asha` the subset grows over three rungs and
ASHA stops weak α early. The best α is the argmax of the recorded objective; with
`search.general_floor` the stage-start model's probe score is measured first (ModelMix at α = 0 is
θ̃_{t-1} exactly) and candidates below floor × that score rank after those above it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava_c_ray import console
from llava_c_ray.config import JobConfig
from llava_c_ray.data.scoring import score
from llava_c_ray.errors import LlavaCError
from llava_c_ray.evaluate.evaluator import (
    GENERAL,
    EvalTask,
    ModelLoader,
    Query,
    load_hf_model,
    task_queries,
)
from llava_c_ray.files import write_json_atomic
from llava_c_ray.ray_session import environment
from llava_c_ray.search.objective import (
    best_trial,
    general_threshold,
    group_means,
    keeps_floor,
    objective,
    subset_rungs,
)

STAGE_START = (0.0, "modelmix")
"""(α, rule) of the candidate that is the stage-start model θ̃_{t-1} itself: W̃ = W̃_{t-1} + 0·Δ."""
TRIAL_CPU = 0.05
"""A trial only waits on an actor; the actors hold the CPUs/GPUs that do the work. On CPUs an
actor reserves the rest of its core, so each concurrent (trial, actor) pair takes one CPU."""


@dataclass(frozen=True)
class SearchPlan:
    """Everything a trial needs: the validation queries and how to score and weigh them."""

    queries: dict[str, list[Query]]
    scoring: dict[str, str]
    groups: dict[str, list[str]]
    rungs: list[int]
    weights: dict[str, float]
    rules: tuple[str, ...]
    max_new_tokens: int
    batch_size: int


@dataclass
class SearchResult:
    best_alpha: float
    trials: list[dict[str, Any]]
    experiment_path: Path
    general_reference: float | None = None
    """The stage-start model's probe score on the search's records (with a general floor)."""
    general_threshold: float | None = None
    """general_floor × general_reference: the probe score a candidate had to keep."""
    choice: str = ""
    """The chosen α and its validation scores in one line (`choice_line`)."""


@dataclass
class Tally:
    """Running per-task score sums of one candidate over the rungs scored so far."""

    sums: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    build_seconds: float = 0.0
    eval_seconds: float = 0.0

    def add(self, queries: list[Query], reply: dict, scoring: dict[str, str]) -> None:
        for query, answer in zip(queries, reply["answers"], strict=True):
            self.sums[query.task] += score(answer, query.reference, scoring[query.task])
            self.counts[query.task] += 1
        self.build_seconds += reply["build_seconds"]
        self.eval_seconds += reply["eval_seconds"]

    def scores(self) -> dict[str, float]:
        return {name: 100.0 * self.sums[name] / self.counts[name] for name in self.counts}


def search_alpha(
    job: JobConfig,
    *,
    new: list[str],
    old: list[str],
    base: Path,
    factors: Path,
    out: Path,
    rule: str = "sac",
    adapter: Path | None = None,
    tuned: Path | None = None,
    loader: ModelLoader = load_hf_model,
) -> SearchResult:
    """Search α of consolidation `rule` for a stage that trained `new` after `old`.

    Writes `out/trials.json` and the Tune experiment under `out/tune`.
    """
    import ray

    from llava_c_ray.ray_session import ensure_ray

    plan = search_plan(job, new, old, rule)
    ensure_factors(base, factors, adapter=adapter, tuned=tuned)
    ensure_ray()
    actors = start_actors(job, base, factors, loader)
    try:
        reference = stage_start_general(job, plan, actors[0])
        results = run_tuner(job, plan, actors, out)
    finally:
        for actor in actors:
            ray.kill(actor)
    threshold = general_threshold(reference, job.search.general_floor)
    trials = sorted((trial_record(r.metrics) for r in results), key=lambda t: t["alpha"])
    if threshold is not None:
        for trial in trials:
            trial["keeps_floor"] = keeps_floor(trial, threshold)
    best = best_trial(trials, threshold)
    result = SearchResult(
        best["alpha"],
        trials,
        Path(results.experiment_path),
        reference,
        threshold,
        choice_line(new, best, threshold),
    )
    write_trials(out / "trials.json", job, rule, result, new, old)
    return result


def quiet_tune() -> tuple[int, dict[str, str]]:
    """Tune's verbosity and environment: its trial tables on the console only with -v (the trials
    are in trials.json and the experiment directory either way). Tune's default reporter prints
    the experiment's heading even at verbose=0; its legacy reporter (RAY_AIR_NEW_OUTPUT=0) prints
    nothing there."""
    return (2, {}) if console.LOGS.verbose else (0, {"RAY_AIR_NEW_OUTPUT": "0"})


def stage_start_general(job: JobConfig, plan: SearchPlan, actor) -> float | None:
    """The probe score of θ̃_{t-1} on the search's probe records, when a general floor needs it."""
    if job.search.general_floor is None or not plan.groups["general"]:
        return None
    queries = plan.queries[GENERAL][: plan.rungs[-1]]
    tally = Tally()
    tally.add(queries, answers(actor, *STAGE_START, queries, plan), plan.scoring)
    return tally.scores()[GENERAL]


def choice_line(new: list[str], best: dict[str, Any], threshold: float | None) -> str:
    """`α = 0.35: new 34.4  old 25.0  general 68.1  (probe floor 66.6 kept)`."""
    scores = "  ".join(
        f"{g} {best[g]:.1f}" for g in ("new", "old", "general") if best.get(g) is not None
    )
    floor = ""
    if threshold is not None:
        kept = "kept" if best.get("keeps_floor", True) else "no candidate kept"
        floor = f"  (probe floor {threshold:.1f} {kept})"
    return f"α = {best['alpha']:g}: {scores}{floor}"


def check_weights(groups: dict[str, list[str]], weights: dict[str, float]) -> None:
    """Some group with a positive weight must have tasks at this stage (stage 1 has no old)."""
    try:
        objective(dict.fromkeys((g for g in groups if groups[g]), 0.0), weights)
    except ValueError as exc:
        present = [g for g in groups if groups[g]]
        raise LlavaCError(
            f"search.objective: {exc} (this stage scores {present})",
            fix="give a positive weight to one of those groups",
        ) from exc


def search_plan(job: JobConfig, new: list[str], old: list[str], rule: str) -> SearchPlan:
    """Validation queries of every group (read and checked before any actor starts)."""
    s = job.search
    tasks = [job.task(name) for name in new + old]
    evals = [EvalTask(t.name, t.val, t.image_folder, t.scoring, t.instruction) for t in tasks]
    groups = {"new": list(new), "old": list(old), "general": []}
    probe = job.general_probe
    wants_probe = s.objective.general > 0 or s.general_floor is not None
    if wants_probe and probe is not None and probe.val is not None:
        evals.append(EvalTask(GENERAL, probe.val, probe.image_folder, probe.scoring))
        groups["general"] = [GENERAL]
    queries = {e.name: task_queries(e, s.subset_size) for e in evals}
    empty = [e.path for e in evals if not queries[e.name]]
    if empty:
        raise LlavaCError(
            "a validation file used by the α search has no records",
            path=empty[0],
            fix="give every task (and the probe) a non-empty `val` split",
        )
    rules = tuple(dict.fromkeys((rule, *(["modelmix"] if s.compare_modelmix else []))))
    weights = s.objective.model_dump()
    check_weights(groups, weights)
    return SearchPlan(
        queries,
        {e.name: e.scoring for e in evals},
        groups,
        subset_rungs(s.subset_size, s.asha),
        weights,
        rules,
        job.eval.max_new_tokens,
        job.eval.batch_size,
    )


def ensure_factors(base: Path, factors: Path, *, adapter: Path | None, tuned: Path | None) -> None:
    """Compute the α-independent SVD factors once per stage (reused by the consolidation)."""
    from llava_c_ray.consolidate.factors import VECTORS_NAME, compute_factors

    if not (Path(factors) / VECTORS_NAME).is_file():
        compute_factors(base, factors, tuned=tuned, adapter=adapter)


def start_actors(job: JobConfig, base: Path, factors: Path, loader: ModelLoader) -> list:
    import ray

    from llava_c_ray.search.actor import SearchActor

    resources = {"num_gpus": 1} if job.cluster.use_gpu else {"num_cpus": 1 - TRIAL_CPU}
    check_capacity(job)
    actor_class = ray.remote(**resources)(SearchActor)
    return [
        actor_class.remote(
            str(base), str(factors), job.model.template, job.consolidation.boundary, loader
        )
        for _ in range(job.search.num_actors)
    ]


def check_capacity(job: JobConfig) -> None:
    """On CPUs, N actors need N CPUs in the cluster, or the trials would wait forever."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    if not job.cluster.use_gpu and cpus < job.search.num_actors:
        raise LlavaCError(
            f"search.num_actors={job.search.num_actors} needs as many CPUs; the Ray cluster has "
            f"{cpus:g}",
            fix=f"set search.num_actors={max(1, int(cpus))} or add CPUs",
        )


def run_tuner(job: JobConfig, plan: SearchPlan, actors: list, out: Path):
    from ray import tune
    from ray.util.queue import Queue

    pool = Queue(actor_options={"num_cpus": 0})
    for actor in actors:
        pool.put(actor)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, plan=plan, pool=pool), {"cpu": TRIAL_CPU}
    )
    space, search_alg, num_samples = sampler(job)
    verbose, quiet_env = quiet_tune()
    tuner = tune.Tuner(
        trainable,
        param_space={"alpha": space},
        tune_config=tune.TuneConfig(
            metric="objective",
            mode="max",
            num_samples=num_samples,
            search_alg=search_alg,
            scheduler=asha(plan),
            max_concurrent_trials=len(actors),
        ),
        run_config=tune.RunConfig(
            name="tune", storage_path=str(Path(out).absolute()), verbose=verbose
        ),
    )
    with environment(**quiet_env):
        results = tuner.fit()
    if results.errors:
        raise LlavaCError(
            f"{len(results.errors)} α-search trial(s) failed; the first: {results.errors[0]}",
            path=Path(results.experiment_path),
            fix="see the trial logs in the Tune experiment directory",
        )
    return results


def sampler(job: JobConfig):
    """(α space, search algorithm, samples) for the grid, random or Optuna sampler."""
    from ray import tune

    s = job.search
    if s.sampler == "grid":
        return tune.grid_search(s.space), None, 1
    low, high = s.space
    if s.sampler == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return tune.uniform(low, high), BasicVariantGenerator(random_state=s.seed), s.num_samples
    from ray.tune.search.optuna import OptunaSearch

    return tune.uniform(low, high), OptunaSearch(seed=s.seed), s.num_samples


def asha(plan: SearchPlan):
    if len(plan.rungs) < 2:
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="training_iteration", max_t=len(plan.rungs), grace_period=1, reduction_factor=2
    )


def run_trial(config: dict, *, plan: SearchPlan, pool) -> None:
    """One α: score θ̃(α) on each rung's new records and report the objective after each rung."""
    from ray import tune

    alpha = float(config["alpha"])
    tallies = {rule: Tally() for rule in plan.rules}
    start = 0
    for stop in plan.rungs:
        part = [q for rows in plan.queries.values() for q in rows[start:stop]]
        for rule, tally in tallies.items():
            tally.add(part, ask(pool, alpha, rule, part, plan), plan.scoring)
        tune.report(trial_metrics(alpha, stop, tallies, plan))
        start = stop


def ask(pool, alpha: float, rule: str, queries: list[Query], plan: SearchPlan) -> dict:
    """Lease an actor from the pool for one candidate's answers."""
    actor = pool.get()
    try:
        return answers(actor, alpha, rule, queries, plan)
    finally:
        pool.put(actor)


def answers(actor, alpha: float, rule: str, queries: list[Query], plan: SearchPlan) -> dict:
    """One actor's answers of θ̃(α) under `rule` to `queries` (the actor's `score_candidate`)."""
    import ray

    return ray.get(
        actor.score_candidate.remote(alpha, rule, queries, plan.max_new_tokens, plan.batch_size)
    )


def trial_metrics(alpha: float, rung: int, tallies: dict[str, Tally], plan: SearchPlan) -> dict:
    metrics: dict[str, Any] = {"alpha": alpha, "rung": rung}
    for i, (rule, tally) in enumerate(tallies.items()):
        scores = tally.scores()
        means = group_means(scores, plan.groups)
        entry = {"objective": objective(means, plan.weights), **means, "scores": scores}
        if i == 0:
            metrics |= entry | {
                "build_seconds": tally.build_seconds,
                "eval_seconds": tally.eval_seconds,
            }
        else:
            metrics[rule] = entry
    return metrics


TRIAL_KEYS = ("alpha", "rung", "objective", "new", "old", "general", "scores")


def trial_record(metrics: dict[str, Any]) -> dict[str, Any]:
    """The parts of a trial's last report worth keeping in the manifest."""
    keep = (*TRIAL_KEYS, "build_seconds", "eval_seconds", "modelmix")
    return {k: metrics[k] for k in keep if k in metrics}


def write_trials(
    path: Path, job: JobConfig, rule: str, result: SearchResult, new: list[str], old: list[str]
) -> None:
    write_json_atomic(
        path,
        {
            "best_alpha": result.best_alpha,
            "rule": rule,
            "method": job.method.name,
            "new": new,
            "old": old,
            "objective": job.search.objective.model_dump(),
            "general_floor": job.search.general_floor,
            "general_reference": result.general_reference,
            "general_threshold": result.general_threshold,
            "experiment": str(result.experiment_path),
            "trials": result.trials,
        },
    )
