"""Teachers: anything that turns a batch of segment pairs into preference labels (simulated humans and friends).

The interface (other modules code against it)
---------------------------------------------
A teacher is called on ``N`` pairs of ``H``-step segments, vectorised (no loop over ``N``)::

    out = teacher(rewards_first, rewards_second,            # [N, H] true per-step rewards (numpy or torch)
                  mask_first=None, mask_second=None,        # [N, H] bool, False = padded step (None = all valid)
                  obs_first=None, obs_second=None,          # [N, H, ...] (needed by RegretTeacher, learned teachers)
                  act_first=None, act_second=None,          # [N, H, ...]
                  qpos_first=None, qvel_first=None, ...     # [N, H, nq] / [N, H, nv] MuJoCo states (human teacher)
                  rng=seed_or_torch_Generator)              # required iff teacher.stochastic
    out.labels    # [N] float32 P(first ≻ second) in [0, 1]; 0.5 = tie; NaN where skipped
    out.answered  # [N] bool; False = skipped (never silently 0.5): train on labels[answered]
    out.probs     # [N] float32 the teacher's own P(first ≻ second) before sampling (NaN where skipped)
    out.metrics   # {"teacher/label_entropy", "teacher/skip_rate", "teacher/num_answered", ...}

Inputs are converted zero-copy from numpy and validated once (shape mismatch, NaN/inf -> ``ValueError`` naming the
argument). Outputs are torch tensors on the rewards' device. Randomness comes only from ``rng``.

``teacher/label_entropy`` is the mean binary entropy (nats) of the teacher's label *distribution* per answered pair
(``out.probs`` after mistakes/flips): 0 for an oracle, ``H(ε)`` for a rational teacher that errs with probability
``ε``, ``ln 2`` for ties.

Teachers here: :class:`SimulatedHuman` (B-Pref; presets ``oracle, stochastic, mistake, skip, myopic, equal``),
:class:`RegretTeacher` (Knox et al.), :class:`LabelFlipTeacher` (known flip rate), :class:`HindsightTeacher` (RLHS),
:class:`RewardModelTeacher` (a learned reward model as a cheap labeller), :class:`HumanTeacher` (people
answering in the labelling app, ``mmalign label serve``). Names in ``mmalign.registry.TEACHERS``.
"""

from __future__ import annotations

import inspect

from mmalign.core.teachers.base import SegmentPairBatch, Teacher, TeacherLabels, binary_entropy, from_bpref_labels
from mmalign.core.teachers.human import HumanTeacher
from mmalign.core.teachers.learned import RewardModelTeacher
from mmalign.core.teachers.bpref import BPREF_PRESETS, SimulatedHuman, bpref_teacher, segment_return_scale
from mmalign.core.teachers.regret import RegretTeacher
from mmalign.core.teachers.wrappers import HINDSIGHT_MODES, HindsightTeacher, LabelFlipTeacher
from mmalign.registry import TEACHERS

__all__ = [
    "Teacher",
    "TeacherLabels",
    "SegmentPairBatch",
    "SimulatedHuman",
    "BPREF_PRESETS",
    "bpref_teacher",
    "segment_return_scale",
    "RegretTeacher",
    "LabelFlipTeacher",
    "HindsightTeacher",
    "HINDSIGHT_MODES",
    "RewardModelTeacher",
    "HumanTeacher",
    "binary_entropy",
    "from_bpref_labels",
]


def _preset_factory(name: str):  # type: ignore[no-untyped-def]
    def factory(**overrides: object) -> SimulatedHuman:
        return SimulatedHuman.preset(name, **overrides)

    # SimulatedHuman's keyword arguments, so a config can check `teacher.<field>` overrides without building one
    factory.__signature__ = inspect.signature(SimulatedHuman)  # type: ignore[attr-defined]
    factory.__name__ = f"{name}_teacher"
    factory.__doc__ = f"B-Pref {name} teacher: SimulatedHuman({BPREF_PRESETS[name] or 'beta=inf'}) + overrides."
    return factory


for _name in BPREF_PRESETS:
    TEACHERS.register(_name, _preset_factory(_name))
TEACHERS.register("simulated_human", SimulatedHuman)
TEACHERS.register("regret", RegretTeacher)
TEACHERS.register("label_flip", LabelFlipTeacher)
TEACHERS.register("hindsight", HindsightTeacher)
TEACHERS.register("reward_model", RewardModelTeacher)
TEACHERS.register("human", HumanTeacher)
