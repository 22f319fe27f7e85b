"""Does the first-round learned reward depend on the action? (causal-confusion check for online PbRL)

Fits the pipeline's reward ensemble (:class:`mmalign.robotics.pebble.FeedbackState`, one feedback round with the
oracle teacher on random-policy segments, exactly as the first PEBBLE round) and measures, on fresh random-policy
segments, how much of the true labels the control cost decides and how much the learned reward depends on the
actions themselves (accuracy and segment returns with every action replaced by zero). A development diagnostic under
the robotics protocol (docs/benchmarks/robotics_protocol.md): it informs choices, so it runs on ``--dev-seeds``
(``--report-seeds``, disjoint, for a reported table).

    .venv/bin/python scripts/bench_pbrl_reward_diag.py --tasks Reacher-v5 Pusher-v5 --labels 250 --dev-seeds 0 1 2 \\
        [--normalize-act] [--action-squares] [--segment-length 10] --doc docs/benchmarks/robotics_pbrl_dev.md
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mmalign.robotics.protocol import add_seed_args, seed_plan_from_args

CTRL_WEIGHT = {"Reacher-v5": 1.0, "Pusher-v5": 0.1}  # gymnasium v5 defaults (reward_control_weight)


def diagnose(task: str, labels: int, epochs: int, seed: int, steps: int = 1000, lr: float = 3e-4,
             segment_length: int = 25, **rm_options: object) -> dict[str, float]:
    """Diagnostics of one first-round fit; ``rm_options`` are extra :class:`PebbleConfig` reward-model fields."""
    import gymnasium
    import torch

    from mmalign.robotics.pebble import FeedbackState, PebbleConfig
    from mmalign.robotics.segments import collect_episodes, random_pairs, segments_from_episodes

    torch.set_num_threads(1)
    env = gymnasium.make(task)
    env.action_space.seed(seed)
    horizon = env.spec.max_episode_steps
    rng = np.random.default_rng(seed)

    def random_segments(steps: int, start: int) -> object:
        eps = collect_episodes(env, lambda o: env.action_space.sample(), max(2, steps // horizon), seed=start)
        return segments_from_episodes(eps, segment_length, num=2000, rng=rng)

    train = random_segments(steps, seed)  # what the replay buffer holds at the first round
    cfg = PebbleConfig(env_id=task, label_budget=max(labels, 64), initial_labels=labels, rm_epochs=epochs, rm_lr=lr,
                       seed=seed, device="cpu", segment_length=segment_length, **rm_options)  # type: ignore[arg-type]
    state = FeedbackState(cfg, env.observation_space.shape[0], env.action_space.shape[0], torch.device("cpu"))
    fit = state.feedback_round(train)
    test = random_segments(2000, 10_000 + seed)
    i, j = random_pairs(len(test), 5000, rng)
    ret = test.true_rewards.sum(1)
    ctrl = -CTRL_WEIGHT[task] * (test.act ** 2).sum(-1).sum(1)
    label = ret[i] > ret[j]
    learned = state.trainer.member_rewards(test.obs, test.act).mean(0).sum(-1).numpy()
    zeroed = state.trainer.member_rewards(test.obs, np.zeros_like(test.act)).mean(0).sum(-1).numpy()
    return {
        "label = order by control cost alone": float(np.mean(label == (ctrl[i] > ctrl[j]))),
        "label = order by the rest of the reward alone": float(np.mean(label == ((ret - ctrl)[i] > (ret - ctrl)[j]))),
        "learned reward: pair accuracy": float(np.mean((learned[i] > learned[j]) == label)),
        "learned reward: pair accuracy, all actions zeroed": float(np.mean((zeroed[i] > zeroed[j]) == label)),
        "learned segment return: std": float(learned.std()),
        "learned segment return: std of the change when actions are zeroed": float((learned - zeroed).std()),
        "corr(learned segment return, control cost)": float(np.corrcoef(learned, ctrl)[0, 1]),
        "corr(learned segment return, true return)": float(np.corrcoef(learned, ret)[0, 1]),
        "true segment return: std of the change when actions are zeroed": float(ctrl.std()),
        # PbRL refits train on every label since session 7 (no hold-out): the pair accuracies above are on fresh segments
        "reward-model training accuracy (fit)": float(fit.get("train/pref_accuracy", float("nan"))),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["Reacher-v5", "Pusher-v5"])
    p.add_argument("--labels", type=int, default=250)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=3e-4, help="reward-model learning rate")
    p.add_argument("--steps", type=int, default=1000, help="random-policy env steps the labelled segments come from")
    p.add_argument("--segment-length", type=int, default=25)
    p.add_argument("--rm-hidden", type=int, default=64, help="PebbleConfig.rm_hidden (width of the 2 hidden layers)")
    p.add_argument("--normalize-act", action="store_true", help="PebbleConfig.normalize_act")
    p.add_argument("--act-weight", type=float, default=0.0, help="PebbleConfig.rm_act_weight (0 = balanced)")
    p.add_argument("--action-squares", action="store_true", help="PebbleConfig.rm_action_squares")
    p.add_argument("--doc", default=None)
    add_seed_args(p, dev_default=(0,))
    args = p.parse_args()
    try:
        plan = seed_plan_from_args(args)
    except ValueError as err:
        p.error(str(err))
    args.seeds = list(plan.seeds)
    opts = dict(normalize_act=args.normalize_act,  # rm_act_weight None = automatic
                rm_act_weight=(args.act_weight or None) if args.normalize_act else None,
                rm_action_squares=args.action_squares, rm_hidden=args.rm_hidden)
    results = {}
    for t in args.tasks:
        runs = [diagnose(t, args.labels, args.epochs, s, args.steps, args.lr, args.segment_length, **opts)
                for s in args.seeds]
        results[t] = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
    rows = list(next(iter(results.values())))
    lines = [f"| (random-policy {args.segment_length}-step segments, 5,000 random pairs; mean of seeds "
             f"{', '.join(map(str, args.seeds))}) | {' | '.join(args.tasks)} |",
             "|---|" + "---|" * len(args.tasks)]
    lines += [f"| {r} | " + " | ".join(f"{results[t][r]:.3f}" for t in args.tasks) + " |" for r in rows]
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    flags = "".join([" --normalize-act" if args.normalize_act else "",
                     f" --act-weight {args.act_weight:g}" if args.normalize_act and args.act_weight else "",
                     " --action-squares" if args.action_squares else "",
                     f" --segment-length {args.segment_length}" if args.segment_length != 25 else "",
                     f" --rm-hidden {args.rm_hidden}" if args.rm_hidden != 64 else ""])
    text = (f"Command: `python scripts/bench_pbrl_reward_diag.py --tasks {' '.join(args.tasks)} --labels {args.labels} "
            f"--epochs {args.epochs} {'--report' if plan.reporting else '--dev'}-seeds {' '.join(map(str, args.seeds))} --steps {args.steps} --lr {args.lr:g}"
            f"{flags}` (one oracle round of {args.labels} labels on {args.steps} random-policy steps, {args.epochs} "
            f"epochs; tested on segments of 2,000 other random-policy steps); {plan.describe()}. Date: {date}.\n\n" + "\n".join(lines))
    print(text)
    if args.doc:
        from doc_sections import write_marked_section

        key = f"bench_pbrl_reward_diag_{args.steps}_{args.labels}_{args.epochs}_{args.lr:g}"
        if len(args.seeds) > 1 or flags:
            key += "_s" + "-".join(map(str, args.seeds)) + flags.replace(" --", "_").replace(" ", "")
        write_marked_section(args.doc, key, text)


if __name__ == "__main__":
    main()
