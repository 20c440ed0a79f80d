"""The generation settings as a Dagster resource (shown, with descriptions, in the UI).

`GenerationResource.settings()` builds the plain `GenerationSettings` the stage functions take.
`demo_generation_resource` and `paper_generation_resource` are the two profiles' values.

At the start of every step that uses it, the resource checks its templates and backends.
Before a step's first request that the response cache cannot answer, `backend_factory` asks
the step's `openai_http` servers for their models (`server_problems`), so a server that is
down or serves the model under another name fails the step before any request, while a step
whose answers are all cached runs with the servers down. A describe step whose template shows
the model the pictures also asks whether the served model reads them (`image_input_problems`):
a text-only model behind `transformers serve` drops image parts without an error. A server
that does not answer that within `image_check_timeout_s` (one loading a large model on a CPU)
is checked on its first answer instead, before any answer is kept. A server that reports no
token counts cannot be checked at all: the step log gets a warning and the step goes on.

Settings beyond the models: `answer_language` (model answers in another language are
quarantined as `wrong_language`; see generation/language.py), `server_probe_timeout_s` (the
model-list check above; 0 turns every check off), `image_check_timeout_s` (the picture check)
and `stopped_probe_timeout_s` (after failed calls mid-step, how long each server has to answer
before the step calls it gone and fails).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg
from pydantic import Field

from megapairs_assets.generation.backends.base import BackendSpec, SamplingParams
from megapairs_assets.generation.language import (
    DEFAULT_LANGUAGE,
    LanguageCheck,
    require_known_language,
)
from megapairs_assets.generation.parsing import DescriptionLimits, InstructionLimits
from megapairs_assets.generation.settings import (
    ExportSettings,
    GenerationSettings,
    PairSample,
    StepSettings,
    demo_generation_settings,
    paper_generation_settings,
)
from megapairs_assets.lib.errors import ConfigurationError

if TYPE_CHECKING:
    from megapairs_assets.generation.backends.base import GenerationBackend
    from megapairs_assets.generation.backends.openai_http import (
        ImageCheckOnFirstAnswer,
        ServerProblem,
    )


class BackendConfig(dg.Config):
    """Which backend serves a step: `openai_http`, `transformers`, `vllm` or `heuristic`."""

    backend: str = Field(description="registry name: openai_http | transformers | vllm | heuristic")
    model_id: str = Field(description="the one model id used in request keys, lineage and the UI")
    label: str = Field(default="", description="what rows name as their generator")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="backend options, e.g. base_urls, max_in_flight, request_timeout_s, "
        "api_key_env (openai_http); model_path, batch_size, device (transformers); python, "
        "model_path, engine_args (vllm)",
    )

    def spec(self) -> BackendSpec:
        return BackendSpec(self.backend, self.model_id, self.label, dict(self.options))


class SamplingConfig(dg.Config):
    """Decoding settings (part of every request key)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0

    def params(self) -> SamplingParams:
        return SamplingParams(self.max_tokens, self.temperature, self.top_p)


class GenerationResource(dg.ConfigurableResource):
    """Pair descriptions, instructions, triplets and their export (method.md §4-6)."""

    describe_backend: BackendConfig
    describe_template: str = Field(
        default="describe_images", description="template file stem in generation/prompts"
    )
    describe_sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    instruct_backend: BackendConfig
    instruct_template: str = "instructions"
    instruct_sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    model_fraction: float = Field(
        default=1.0, description="share of each shard's pairs sent to the models (keyed by pair id)"
    )
    model_pairs_per_shard: int | None = Field(
        default=None, description="cap on model-generated pairs per shard (the demo's budget)"
    )
    heuristic_fill: bool = Field(
        default=False,
        description="pairs outside the model sample get caption-heuristic text (labelled so)",
    )
    demo_pool: str = "instruction_demos.jsonl"
    seed: int = 0
    max_attempts: int = Field(
        default=3, description="runs a failing request is tried in before it is quarantined"
    )
    flush_every: int = Field(default=64, description="results persisted at least this often")
    max_failure_fraction: float = Field(
        default=0.5, description="a step whose calls fail more often than this raises"
    )
    retry_quarantined: bool = False
    description_min_words: int = 12
    description_max_words: int = 150
    instruction_max_words: int = 25
    answer_language: str = Field(
        default=DEFAULT_LANGUAGE,
        description="ISO 639 code of the language model answers must be in; others are "
        "quarantined as wrong_language ('' turns the check off)",
    )
    answer_language_min_confidence: float = Field(
        default=LanguageCheck().min_confidence,
        description="how sure the language identifier must be that a text is in another "
        "language before it is quarantined (0.5 to below 1)",
    )
    export_image_side_px: int = 512
    export_dir: str | None = Field(
        default=None, description="release folder; default <data root>/data/triplet_export"
    )
    licence: str = Field(default="unspecified", description="licence line of the dataset card")
    dataset_name: str = "megapairs-triplets"
    server_probe_timeout_s: float = Field(
        default=5.0,
        ge=0,
        description="seconds each openai_http server has to list its models before a step's "
        "first uncached request (0: do not ask)",
    )
    image_check_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="seconds each openai_http server has for the picture check of a describe "
        "step that sends pictures (a server that loads its model on the first request is "
        "waited for; one still starting is asked again); a server that has not answered by "
        "then is checked on its first answer instead",
    )
    stopped_probe_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="after failed calls, seconds each openai_http server has to answer before "
        "the step calls it gone and fails (a server that stopped answering mid-step)",
    )
    server_setting_names: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description="step -> the settings named in a server problem's fix: base_urls, "
        "served_model, api_key (e.g. the profile's environment variables)",
    )

    def settings(self) -> GenerationSettings:
        """The plain settings the stage functions take."""
        return GenerationSettings(
            describe=StepSettings(
                self.describe_backend.spec(),
                self.describe_template,
                self.describe_sampling.params(),
            ),
            instruct=StepSettings(
                self.instruct_backend.spec(),
                self.instruct_template,
                self.instruct_sampling.params(),
            ),
            model_sample=PairSample(self.model_fraction, self.model_pairs_per_shard),
            heuristic_fill=self.heuristic_fill,
            demo_pool=self.demo_pool,
            seed=self.seed,
            max_attempts=self.max_attempts,
            flush_every=self.flush_every,
            max_failure_fraction=self.max_failure_fraction,
            stopped_probe_timeout_s=self.stopped_probe_timeout_s,
            retry_quarantined=self.retry_quarantined,
            description_limits=DescriptionLimits(
                self.description_min_words, self.description_max_words
            ),
            instruction_limits=replace(InstructionLimits(), max_words=self.instruction_max_words),
            answer_language=LanguageCheck(
                self.answer_language, self.answer_language_min_confidence
            ),
            export=ExportSettings(
                image_side_px=self.export_image_side_px,
                export_dir=self.export_dir,
                licence=self.licence,
                dataset_name=self.dataset_name,
            ),
            server_setting_names=self.server_setting_names,
        )

    @classmethod
    def from_settings(
        cls,
        settings: GenerationSettings,
        server_setting_names: dict[str, dict[str, str]] | None = None,
    ) -> GenerationResource:
        """The resource holding exactly these plain settings; `server_setting_names` (for
        error messages, the settings that set each step's servers: see `server_problems`)
        replaces the settings' own when given."""

        def backend(spec: BackendSpec) -> BackendConfig:
            return BackendConfig(
                backend=spec.backend,
                model_id=spec.model_id,
                label=spec.label,
                # An unset option is left out: Dagster's config maps cannot hold nulls (the
                # code location would not load), and a backend reads a missing option as unset.
                options={name: value for name, value in spec.options.items() if value is not None},
            )

        def sampling(params: SamplingParams) -> SamplingConfig:
            return SamplingConfig(**params.as_dict())

        return cls(
            describe_backend=backend(settings.describe.backend),
            describe_template=settings.describe.template,
            describe_sampling=sampling(settings.describe.sampling),
            instruct_backend=backend(settings.instruct.backend),
            instruct_template=settings.instruct.template,
            instruct_sampling=sampling(settings.instruct.sampling),
            model_fraction=settings.model_sample.fraction,
            model_pairs_per_shard=settings.model_sample.max_pairs_per_shard,
            heuristic_fill=settings.heuristic_fill,
            demo_pool=settings.demo_pool,
            seed=settings.seed,
            max_attempts=settings.max_attempts,
            flush_every=settings.flush_every,
            max_failure_fraction=settings.max_failure_fraction,
            stopped_probe_timeout_s=settings.stopped_probe_timeout_s,
            retry_quarantined=settings.retry_quarantined,
            description_min_words=settings.description_limits.min_words,
            description_max_words=settings.description_limits.max_words,
            instruction_max_words=settings.instruction_limits.max_words,
            answer_language=settings.answer_language.target,
            answer_language_min_confidence=settings.answer_language.min_confidence,
            export_image_side_px=settings.export.image_side_px,
            export_dir=settings.export.export_dir,
            licence=settings.export.licence,
            dataset_name=settings.export.dataset_name,
            server_setting_names={
                step: dict(names)
                for step, names in (server_setting_names or settings.server_setting_names).items()
            },
        )

    def server_problems(
        self, steps: tuple[str, ...] = ("describe", "instruct"), timeout_s: float | None = None
    ) -> list[str]:
        """What is wrong with the `openai_http` servers of `steps`, one line per server, each
        saying what to change; [] when every server lists its model (or lists none).

        Backends other than `openai_http` have no server to ask.
        """
        from megapairs_assets.generation.backends.openai_http import probe_servers

        timeout = self.server_probe_timeout_s if timeout_s is None else timeout_s
        return [
            self._problem_line(step, problem)
            for step in steps
            for problem in probe_servers(self._step_spec(step), timeout)
        ]

    def image_input_problems(
        self,
        step: str,
        timeout_s: float | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> list[str]:
        """When `step`'s template shows the model the pictures: one line per `openai_http`
        server whose model drops or refuses them, each saying what to change; else [].

        Unlike `server_problems` (a GET), this sends two one-token chat requests per server
        (`probe_image_input`, within `image_check_timeout_s` unless `timeout_s` is given), so
        it runs only before a step's first uncached request. A server whose answers cannot
        tell (no `usage.prompt_tokens`) or that did not answer in time is not a problem here:
        `warn` (default: the Dagster step log's warning) gets a line saying so (in a step, the
        second kind is checked on the server's first answer: see `backend_factory`).
        """
        return self._image_check(step, timeout_s, warn)[0]

    def _image_check(
        self,
        step: str,
        timeout_s: float | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> tuple[list[str], ImageCheckOnFirstAnswer | None]:
        """`image_input_problems`, and the check to make on the first answers of the servers
        that did not answer in time (None when there are none)."""
        from megapairs_assets.generation.backends.openai_http import (
            IMAGE_CHECK_DEFERRED,
            IMAGE_CHECK_SKIPPED,
            ImageCheckOnFirstAnswer,
            image_input_problems,
        )
        from megapairs_assets.generation.prompts import load_template

        step_settings = getattr(self.settings(), step)
        if load_template(step_settings.template).input_mode != "images":
            return [], None
        timeout = self.image_check_timeout_s if timeout_s is None else timeout_s
        tell = warn or dg.get_dagster_logger().warning
        problems, deferred = [], []
        for problem in image_input_problems(step_settings.backend, timeout):
            line = self._problem_line(step, problem)
            if problem.kind in (IMAGE_CHECK_SKIPPED, IMAGE_CHECK_DEFERRED):
                tell(line)
                if problem.kind == IMAGE_CHECK_DEFERRED:
                    deferred.append(problem.base_url.rstrip("/"))
            else:
                problems.append(line)
        if not deferred:
            return problems, None
        return problems, ImageCheckOnFirstAnswer(
            frozenset(deferred),
            error=lambda problem: SERVERS_NOT_READY + "\n  " + self._problem_line(step, problem),
            warn=lambda problem: tell(self._problem_line(step, problem)),
        )

    def _problem_line(self, step: str, problem: ServerProblem) -> str:
        """`describe (InternVL2-26B) at <url>: <what is wrong>; <what to change>`."""
        from megapairs_assets.generation.backends.openai_http import ServerSettingNames

        spec = self._step_spec(step)
        names = ServerSettingNames(**self.server_setting_names.get(step, {}))
        return f"{step} ({spec.display_name}) at {problem.base_url}: {problem.detail}; " + (
            names.fix(problem)
        )

    def backend_factory(self, step: str) -> Callable[[BackendSpec], GenerationBackend]:
        """What a step builds its backends with: the shared backend of a spec, after asking
        the step's servers for their models and, when its template sends pictures, whether
        their model reads them (once per factory; a server that did not answer that in time
        is checked on its first answer: `ImageCheckOnFirstAnswer`). It is called only when a
        request is not in the response cache, so a fully cached step never asks."""
        from megapairs_assets.generation.backends.base import shared_backend

        checked: set[str] = set()

        def build(spec: BackendSpec) -> GenerationBackend:
            probed, on_first_answer = False, None
            if spec.model_id not in checked and spec == self._step_spec(step):
                # A misspelt answer_language fails before any request, not after every answer.
                require_known_language(self.settings().answer_language)
                if self.server_probe_timeout_s > 0:
                    problems = self.server_problems((step,))
                    if not problems:
                        problems, on_first_answer = self._image_check(step)
                    if problems:
                        raise ConfigurationError(SERVERS_NOT_READY + "\n  " + "\n  ".join(problems))
                    probed = True
                checked.add(spec.model_id)
            backend = shared_backend(spec)
            if probed and hasattr(backend, "image_check"):
                # This step's verdict replaces one an earlier step of the process left behind.
                backend.image_check = on_first_answer
            return backend

        return build

    def _step_spec(self, step: str) -> BackendSpec:
        return getattr(self.settings(), step).backend

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # A malformed setting fails before any work (templates and backends are checked here).
        from megapairs_assets.generation.backends import create_backend
        from megapairs_assets.generation.prompts import TemplateError, load_demo_pool, load_template

        settings = self.settings()
        for step, name in (
            ("describe", settings.describe.template),
            ("instruct", settings.instruct.template),
        ):
            template = load_template(name)
            if template.step != step:
                raise TemplateError(
                    f"template {name!r} is written for step {template.step!r}, but it is set as "
                    f"the {step} template"
                )
        pool = load_demo_pool(settings.demo_pool)
        wanted = load_template(settings.instruct.template).instruction_count("demos_per_request")
        if wanted > len(pool.demos):
            raise TemplateError(
                f"template {settings.instruct.template!r} asks for {wanted} demonstrations per "
                f"request; the pool {settings.demo_pool!r} holds {len(pool.demos)}"
            )
        create_backend(settings.describe.backend)
        create_backend(settings.instruct.backend)


SERVERS_NOT_READY = "generation servers not ready:"


def demo_generation_resource(home: Path) -> GenerationResource:
    """The demo: SmolLM2-135M-Instruct (caption-based) on a few pairs per shard, the heuristic
    for the rest; models cached under `<home>/models`."""
    return GenerationResource.from_settings(demo_generation_settings(Path(home) / "models"))


def paper_generation_resource(
    describe_urls: list[str] | None = None,
    instruct_urls: list[str] | None = None,
    api_key_env: str | None = None,
) -> GenerationResource:
    """The paper: InternVL2-26B and Llama-3-8B-Instruct behind vLLM's OpenAI-compatible server."""
    return GenerationResource.from_settings(
        paper_generation_settings(describe_urls, instruct_urls, api_key_env)
    )
