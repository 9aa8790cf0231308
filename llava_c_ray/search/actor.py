"""Quick evaluation actors for the α search: the base model loaded once, any α applied cheaply."""

from __future__ import annotations

import time
from pathlib import Path

from llava_c_ray.evaluate.evaluator import EvalActor, ModelLoader, Query, batches, load_hf_model


class SearchActor(EvalActor):
    """Holds θ̃_{t-1} and the stage's SVD factors; answers questions with θ̃(α) for any α."""

    def __init__(
        self,
        model_dir: str,
        factors_dir: str,
        template: str,
        boundary: str,
        loader: ModelLoader = load_hf_model,
    ):
        from llava_c_ray.consolidate.factors import load_factors
        from llava_c_ray.search.candidate import CandidateModel

        super().__init__(model_dir, template, loader)
        matrices, vectors = load_factors(Path(factors_dir))
        self.candidate = CandidateModel(self.model, matrices, vectors)
        self.boundary = boundary
        self.current: tuple[float, str] | None = None

    def use(self, alpha: float, rule: str) -> float:
        """Switch to θ̃(α) under `rule`; returns the seconds it took."""
        started = time.perf_counter()
        if self.current != (alpha, rule):
            self.candidate.set_alpha(alpha, rule, self.boundary)
            self.current = (alpha, rule)
        return time.perf_counter() - started

    def score_candidate(
        self, alpha: float, rule: str, queries: list[Query], max_new_tokens: int, batch_size: int
    ) -> dict:
        """Answers of θ̃(α) to `queries` (in order), with build and evaluation seconds."""
        build = self.use(alpha, rule)
        started = time.perf_counter()
        answers = [a for b in batches(queries, batch_size) for a in self.answer(b, max_new_tokens)]
        return {
            "answers": answers,
            "build_seconds": build,
            "eval_seconds": time.perf_counter() - started,
        }

    def weights(self, alpha: float, rule: str, names: list[str]) -> dict:
        """The effective weights of θ̃(α) for `names` (to compare with the consolidation engine)."""
        self.use(alpha, rule)
        return {name: self.candidate.effective_weight(name).cpu() for name in names}
