"""Per-component eval losses of continued-pretraining runs against their entropy floors, as a markdown table.

    python experiments/continued_pretraining/table.py runs/cpt-base runs/cpt-r0 runs/cpt-r0.25 runs/cpt-r0.5

Each argument is a run directory of configs/continued_pretrain.py; every eval step of each run is one row.
"""
import sys

from llm_jax.train.metrics import read_metrics


def rows(run_dir: str) -> list[str]:
    metrics = read_metrics(run_dir)
    first = metrics[0]
    floors = {name: first[f"{name}_source_entropy_nats_per_token"] for name in ("replay", "domain")}
    share = first["replay_share"]
    out = []
    for m in metrics:
        if "eval_replay_loss" not in m:
            continue
        gaps = {name: m[f"eval_{name}_loss"] - floors[name] for name in floors}
        out.append(f"| {run_dir} | {share:.2f} | {m['step']} | {m['eval_replay_loss']:.4f} | {gaps['replay']:.4f} | "
                   f"{m['eval_domain_loss']:.4f} | {gaps['domain']:.4f} |")
    return out


def main(run_dirs: list[str]) -> None:
    print("| run | replay share | step | eval_replay_loss | above floor | eval_domain_loss | above floor |")
    print("|---|---|---|---|---|---|---|")
    for run_dir in run_dirs:
        print("\n".join(rows(run_dir)))


if __name__ == "__main__":
    main(sys.argv[1:])
