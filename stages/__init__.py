"""The pipeline's stages: plain Python, no Prefect, MLflow or `flows/` imports.

One GRPO iteration, stage by stage (each a module here; `flows/train.py` calls them in order):

    rollout    policy samples G completions per prompt   → runs/iterations/NNNN/rollouts.parquet
    reward     each weighted component scores them       → rewards.parquet
    advantage  group-relative advantages                 → advantages.parquet
    update     mu epochs of the clipped objective        → runs/checkpoints/NNNN/, update.json

before them `prepare` (data/prompts) and `reference` (models/reference, SFT), after them
`evaluate` (metrics/eval.json); `objective` is the loss as a few tensor functions, `config`
what a valid param is, `params` reading params.yaml, `errors` the one-line errors, `policy`
the trainer's state at an iteration, `replay`/`rescore` an iteration recomputed from its files.

The machinery lives in three rooms, each importing only `config`, `errors` and the rooms
listed after it (never a stage):

    rewards/  the reward components (rules, the user's functions, reward models, judges) and
              the scoring process they run in                      may import model, records
    model/    the model: loading, log-probs, sampling, adapters, torch.distributed, vLLM
                                                                    may import records
    records/  the run on disk: artefact layout and atomic writes, manifests, the run lock,
              metrics files, the group contract                     imports no room
"""
