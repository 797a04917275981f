"""The reward components and the process they are scored in.

`rules` is the registry and the built-in rules (accuracy by math-verify, format, language,
overlong), the user's functions by dotted path, and `resolve` (a run's components by name);
`models` the components backed by a model (`reward.models`: reward models; `reward.judges`:
LLM judges); `scoring` the scoring process every component runs in, under a deadline, and
`score_component` (one component on one iteration's completions); `dynamic_sampling` which
groups carry a reward signal. The reward stage (`stages.reward`) calls `scoring`, which calls
`rules` and `models`: one way.

Add a reward here (a rule in `rules`, or a model-backed kind in `models`). May import
`stages.config`, `stages.errors`, `stages.model` and `stages.records`; never a stage.
"""
