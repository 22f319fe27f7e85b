"""Registered jobs: what ``mmalign <domain> <job>`` runs.

A job is a pair of lazy targets: a config dataclass (a :class:`mmalign.config.Config`) and a function
``run(cfg, run_dir: pathlib.Path) -> dict`` that does the work, writes into ``run_dir`` and returns summary metrics.
Job names are ``<domain>.<job>``. Targets are import strings so that the CLI imports a domain only when it runs it.

The module of a job's ``run`` may also define ``validate(cfg, resume: bool) -> None``, called before the run folder
is made: it checks the job's data, model paths and env ids, and refuses ``--resume`` if the job cannot resume, raising
``ValueError``/``FileNotFoundError`` naming the field. An optional ``has_progress(run_dir) -> bool`` says what a
``--resume`` would continue from (default: a checkpoint or rows in ``results.jsonl``); a new run that fails without
progress has its folder removed (:mod:`mmalign.train.run_folder`).
"""

from __future__ import annotations

from mmalign.registry import JOBS


def job(name: str, run: str, config: str, summary: str, default_config: str | None = None) -> None:
    """Register a job; ``default_config`` is the YAML under ``configs/`` its docs and README point to."""
    JOBS.register(name, run, summary=summary, config=config, default_config=default_config)


job(
    "train.demo",
    "mmalign.train.demo:run",
    "mmalign.train.demo:DemoConfig",
    "DPO-family training of a tiny policy on generated preference pairs (exercises the trainer end to end)",
)

job(
    "diffusion.train",
    "mmalign.diffusion.train:run",
    "mmalign.diffusion.train:DiffusionTrainConfig",
    "MaPO / Diffusion-DPO / SFT preference fine-tuning of a diffusers pipeline's UNet (LoRA or full) on image pairs",
    default_config="configs/diffusion/train_mapo.yaml",
)
job(
    "diffusion.sample",
    "mmalign.diffusion.sample:run",
    "mmalign.diffusion.sample:SampleConfig",
    "images from a diffusers pipeline (+ a trained LoRA/UNet artifact) for prompts x seeds, a PNG grid; compare=true "
    "puts the base model beside",
)
job(
    "diffusion.benchmark",
    "mmalign.diffusion.benchmark:run",
    "mmalign.diffusion.benchmark:BenchmarkConfig",
    "offline reference-mismatch benchmark: MaPO vs Diffusion-DPO (beta sweep) vs SFT on procedural shapes",
    default_config="configs/diffusion/benchmark.yaml",
)
job(
    "hindsight.market",
    "mmalign.hindsight.experiment:run",
    "mmalign.hindsight.config:HindsightMarketConfig",
    "RLHS marketplace: seller trained by DPO and BT-RM+PPO on foresight vs hindsight feedback; trust and "
    "world-model accuracy sweeps",
    default_config="configs/hindsight/market.yaml",
)
job(
    "robotics.main",
    "mmalign.robotics.main_job:run",
    "mmalign.robotics.main_job:MainConfig",
    "the main job: SAC learning Reacher from a noisy simulated human vs true reward vs random, with a report",
    default_config="configs/robotics/main.yaml",
)
job(
    "robotics.pebble",
    "mmalign.robotics.pebble:run",
    "mmalign.robotics.pebble:PebbleConfig",
    "online preference-based RL (PEBBLE-style) on SB3 SAC or PPO with a B-Pref simulated teacher",
    default_config="configs/robotics/pebble.yaml",
)
job(
    "robotics.reward",
    "mmalign.robotics.reward_job:run",
    "mmalign.robotics.reward_job:RewardJobConfig",
    "Bradley-Terry reward ensemble from a segment preference file (e.g. `label export`), saved as a reward-model "
    "folder for LearnedReward-v0",
    default_config="configs/robotics/reward.yaml",
)
job(
    "vlm.train",
    "mmalign.vision_lm.train:run",
    "mmalign.vision_lm.train:VLMTrainConfig",
    "preference-train a VLM: DPO/IPO/cDPO/robust DPO, Re-Align (visual DPO), RRPO, BDHS offline/online/mixed",
    default_config="configs/vision_lm/train_dpo.yaml",
)
job(
    "vlm.benchmark",
    "mmalign.vision_lm.benchmark:run",
    "mmalign.vision_lm.benchmark:BenchmarkConfig",
    "offline hallucination benchmark: tiny LLaVA on prior-planted scenes, CHAIR/POPE for every method",
    default_config="configs/vision_lm/benchmark.yaml",
)
job(
    "vlm.generate",
    "mmalign.vision_lm.generate_job:run_generate",
    "mmalign.vision_lm.generate_job:GenerateConfig",
    "answers of a VLM (model folder, Hub id, merged or adapter folder) for prompts over images from a data file",
)
job(
    "vlm.eval",
    "mmalign.vision_lm.generate_job:run_eval",
    "mmalign.vision_lm.generate_job:EvalConfig",
    "POPE-style yes/no evaluation of a VLM on image/question/answer rows: accuracy, F1, yes-ratio",
)
job(
    "robotics.cpl",
    "mmalign.robotics.cpl:run",
    "mmalign.robotics.cpl:CPLConfig",
    "offline CPL vs BC, %BC and P-IQL on MuJoCo segments labelled by a regret teacher (oracle SAC advantage)",
    default_config="configs/robotics/cpl.yaml",
)
job(
    "hindsight.text",
    "mmalign.hindsight.text_experiment:run",
    "mmalign.hindsight.config:HindsightTextConfig",
    "RLHS marketplace as text: tiny GPT-2 seller (SFT, then DPO core) on foresight vs hindsight dialogue pairs",
    default_config="configs/hindsight/text.yaml",
)
job(
    "robotics.rapl",
    "mmalign.robotics.rapl:run",
    "mmalign.robotics.rapl:RaplConfig",
    "RAPL: preference-aligned encoder + OT reward vs BT-on-pixels vs unaligned OT on PushAvoid (2 embodiments)",
    default_config="configs/robotics/rapl.yaml",
)
job(
    "robotics.pearl",
    "mmalign.robotics.pearl:run",
    "mmalign.robotics.pearl:PearlConfig",
    "PEARL: Gromov-Wasserstein cross-task label transfer + Gaussian robust reward, zero target labels",
    default_config="configs/robotics/pearl.yaml",
)
job(
    "label.serve",
    "mmalign.label.jobs:serve",
    "mmalign.label.jobs:ServeConfig",
    "the labelling web app: people answer clip, image and answer pairs (SQLite or PostgreSQL; admin at /admin)",
)
job(
    "label.push",
    "mmalign.label.jobs:push",
    "mmalign.label.jobs:PushConfig",
    "enqueue the pairs of a preference data file (text, image or segment kind) for people to label",
)
job(
    "label.export",
    "mmalign.label.jobs:export",
    "mmalign.label.jobs:ExportConfig",
    "write a labelling project's answers as a preference data file that vlm/diffusion/robotics jobs read",
)
