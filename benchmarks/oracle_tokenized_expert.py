"""Oracle behind benchmarks/demo_full.md: the scripted expert's actions pushed through a checkpoint's action
tokenizer (encode -> decode, its statistics and bin count) and the simulator's own clip, closed loop in-process.
If this succeeds where the model fails, the de-tokenisation / clip / control path is not what limits the model.

    python benchmarks/oracle_tokenized_expert.py <checkpoint folder> [episodes] [seed]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from refinevla_core.data.stats import ActionStats
from refinevla_core.eval.runner import evaluate
from refinevla_core.model.tokenizer import ActionTokenizer
from refinevla_core.sim.config import SimConfig
from refinevla_core.sim.experts import ScriptedExpertPolicy


def main() -> None:
    checkpoint = Path(sys.argv[1])
    episodes = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
    bins = json.loads((checkpoint / "refinevla_config.json").read_text())["n_action_bins"]
    tokenizer = ActionTokenizer.from_stats(ActionStats.load(checkpoint / "stats.json"), n_bins=bins)

    class TokenizedExpert:
        def __init__(self, backend: object) -> None:
            self.expert = ScriptedExpertPolicy(backend.privileged_state)

        def reset(self) -> None:
            """Stateless."""

        def predict(self, image: object, instruction: str) -> object:
            out = self.expert.predict(image, instruction)
            out.action = tokenizer.decode(tokenizer.encode(out.action))
            return out

    sim = SimConfig(backend="maniskill", task="PushCube-v1", image_size=112, instruction_mode="canonical")
    results = evaluate(TokenizedExpert, ["PushCube-v1"], episodes, seed=seed, sim=sim)
    print(f"tokenized expert ({bins} bins): {sum(r.success for r in results)}/{len(results)} successes")


if __name__ == "__main__":
    main()
